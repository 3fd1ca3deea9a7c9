"""Gradient variance: mini-batch gradient noise, per-sample gradient variance and signal propagation.

The seed's hypothesis is that with multiplicative fusion "the gradient variance is uncontrolled".
This probe measures it per layer, for any model, without changing the model.

Notation. ``l_i(theta)`` is the loss of sample ``i`` (cross-entropy by default; pluggable), a
mini-batch ``b`` of ``B`` samples has the gradient ``g_b = (1/B) sum_{i in b} grad l_i``. All
quantities are per parameter tensor ("layer"; also grouped per owning module, and summed over the
whole model: traces and squared norms add over parameters).

1. **Mini-batch statistics** over ``K`` mini-batches of ``B`` samples drawn without replacement
   (the ``K*B`` samples are distinct; ``K*B <= N`` is required):

   * ``G = (1/K) sum_k g_k`` and ``grad_norm = |G|``;
   * ``trace_cov = tr(Sigma_B) = 1/(K-1) sum_k |g_k - G|^2``, the unbiased estimate of the trace of
     the covariance of a size-``B`` mini-batch gradient;
   * ``snr = |G|^2 / tr(Sigma_B)``;
   * the gradient noise scale of McCandlish et al. 2018 ("An Empirical Model of Large-Batch
     Training", eq. 2.8), ``B_simple = tr(Sigma_1) / |G|^2`` with ``Sigma_1`` the *per-sample*
     gradient covariance. A mini-batch of ``B`` i.i.d. samples has ``Sigma_B = Sigma_1 / B``, so the
     reported ``noise_scale`` is ``B * tr(Sigma_B) / |G|^2``. (For batches that are disjoint subsets
     of the ``N`` given samples, ``E[tr(Sigma_B) estimate] = tr(S) / B`` exactly, with ``S`` the
     per-sample covariance of the ``N`` samples with divisor ``N-1``: the finite-population
     correction of each batch's variance cancels against the negative covariance between disjoint
     batches.) ``|G|^2`` itself carries the noise of averaging only ``K*B`` samples
     (``E|G|^2 = |E g|^2 + tr(Sigma_1)/(K B)``), so SNR is biased up and ``B_simple`` down when
     ``K*B`` is not much larger than ``B_simple``;
   * ``rel_update = lr * rms_k |g_k| / |w|``: the size of one plain SGD step (no momentum, no weight
     decay) relative to the weight, with ``lr`` the run's learning rate at this checkpoint.

2. **Per-sample gradient variance** over all ``N`` samples: ``per_sample_var = tr(Sigma_1) =
   1/(N-1) sum_i |grad l_i - gbar|^2`` per layer, with the per-sample gradients from
   ``torch.func.vmap(torch.func.grad(...))`` over chunks of ``chunk`` samples (memory
   ``~ chunk * P``), accumulated in float64 around a shift (the first chunk's mean) so the
   subtraction does not cancel. ``noise_scale_ps = tr(Sigma_1) / |gbar|^2`` is the less biased
   noise scale (``gbar`` is the full-batch gradient over the ``N`` samples). Linear / Conv2d /
   BatchNorm layers take a closed-form fast path instead of vmap (:mod:`probe.autodiff`: each
   sample's gradient from the layer input and the back-propagated output gradient of one batched
   backward pass), checked against autograd before use.

3. **Signal propagation at initialisation**: per residual block (WRN / ResNet families; other
   models: per top-level child module), the variance of the block output over all its entries
   (samples, channels, positions) and the root-mean-square over samples of the per-sample gradient
   norm ``|d l_i / d h_i|`` w.r.t. the block output ``h``, vs depth, averaged over several fresh
   initialisations (``rebuild(seed)``; their BatchNorm statistics are estimated on ``x``, as the
   runner does for a model at init).

BatchNorm. ``bn="eval"`` (default): every module in eval mode, BatchNorm with its running
statistics (passed explicitly, as copies), dropout off; samples are independent.
``bn="train"``: BatchNorm normalises with the statistics of the batch it sees (the mini-batch;
for per-sample gradients and signal propagation, consecutive groups of ``batch_size`` samples of a
seeded permutation, the remainder left out) and its running statistics are neither read nor
updated; dropout stays off. A per-sample gradient is then ``d l_i / d theta`` through the batch
statistics of its group -- the term sample ``i`` contributes to that group's mini-batch gradient.
(The model's running-statistics buffers are detached for the duration of a call and put back
afterwards, also when the call raises.)

Purity. The model's parameters, buffers, ``requires_grad`` and train/eval flags are the same
afterwards and no ``.grad`` is left: everything runs on ``torch.func.functional_call`` with detached
copies of the parameters and buffers; signal propagation adds forward hooks to the blocks and
removes them again. Non-finite gradients are counted and left out (a whole mini-batch, or a whole
sample), never averaged in.

    >>> res = gradient_variance(model, x, y, GradVarParams(batches=8, batch_size=32))
    >>> print(res.text())
"""
import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from probe.checks import check_number
from probe.errors import UserError
from probe.functional import OutputSelector
from probe.inputs import takes_loader
from probe.runtime.precision import exact
from probe.probes.gradvar._common import GradVarParams, LossFn, _check_data, _module_of
from probe.probes.gradvar._minibatch import minibatch_gradient_stats
from probe.probes.gradvar._per_sample import per_sample_variance
from probe.probes.gradvar._signal import signal_propagation
from probe.probes.gradvar.result import GradVarResult, _ratio
from probe.probes.registry import Progress

__all__ = ["gradient_variance"]


@takes_loader("x", "y")
@exact
def gradient_variance(model: nn.Module, x: Tensor, y: Tensor, params: GradVarParams | None = None, *,
                      seed: int = 0, lr: float | None = None, rebuild: Callable[[int], nn.Module] | None = None,
                      at_init: bool | None = None, loss: LossFn | None = None,
                      device: torch.device | str | None = None, output: OutputSelector = None,
                      progress: Progress | None = None) -> GradVarResult:
    """All three parts (see the module docstring) as one :class:`GradVarResult`.

    ``lr`` is the run's learning rate at this checkpoint (``None``: ``params.lr``); ``seed`` seeds the
    mini-batch draw and the signal-propagation initialisations (``seed, seed+1, ...``);
    ``at_init`` (None = unknown) only words the notes when signal propagation measures the given
    model. ``output`` selects the tensor of a model's output that ``loss`` takes
    (:data:`probe.functional.OutputSelector`: a dict's ``"logits"`` or only tensor by default). ``x``
    may be a DataLoader of ``(x, y)`` batches with ``y`` left out (:mod:`probe.inputs`). The model is
    never changed.
    """
    params = params or GradVarParams()
    x, y = _check_data(x, y)
    if not isinstance(model, nn.Module):
        raise UserError(f"expected a torch.nn.Module, got {type(model).__name__}")
    lr_value, lr_source = (params.lr, "params") if lr is None else (check_number("lr", lr, 0, math.inf), "run")
    dtype = getattr(torch, params.dtype)
    notes: list[str] = []
    mb = minibatch_gradient_stats(model, x, y, batches=params.batches, batch_size=params.batch_size, seed=seed,
                                  loss=loss, dtype=dtype, device=device, bn=params.bn, output=output,
                                  progress=progress)
    L = len(mb.names)
    nan = np.full(L, np.nan)
    g2 = mb.grad_norm ** 2
    if mb.nonfinite_batches:
        notes.append(f"{mb.nonfinite_batches} of {params.batches} mini-batches had non-finite gradients and were "
                     "left out")
    if mb.batches_used < 2:
        notes.append(f"only {mb.batches_used} finite mini-batch(es): no covariance")
    trains = _trains(model, x, y, mb.grad_norm, params, seed=seed, loss=loss, dtype=dtype, device=device)
    if not trains.all():
        frozen = [n for n, t in zip(mb.names, trains) if not t]
        notes.append(f"{len(frozen)} parameter tensor(s) get no gradient in training (BatchNorm's batch statistics "
                     f"remove them: {', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''}); the relative-update "
                     "figure leaves them out")
    ps_var, ps_gn, ps_used, ps_bad = nan, nan, 0, 0
    ranks = {"mini-batch": mb.ranks}
    if params.per_sample:
        ps = per_sample_variance(model, x, y, chunk=params.chunk, loss=loss, dtype=dtype, device=device,
                                 bn=params.bn, batch_size=params.batch_size, seed=seed, output=output,
                                 progress=progress)
        ps_var, ps_gn, ps_used, ps_bad = ps.variance, ps.mean_grad_norm, ps.samples_used, ps.nonfinite_samples
        ranks["per-sample"] = ps.ranks
        if ps.closed_form:
            rest = L - len(ps.closed_form)
            notes.append(f"per-sample gradients: closed form (probe.autodiff) for {len(ps.closed_form)} of {L} "
                         "parameter tensors" + (f", vmap(grad) for the other {rest}" if rest else ""))
        if ps.failed_check:
            notes.append(f"closed form failed its self-check for {', '.join(ps.failed_check)} (vmap used)")
        if ps.grouped:
            notes.append(f"per-sample gradients through the batch statistics of groups of {params.batch_size} "
                         "samples (BatchNorm without running statistics or bn=train)")
        if ps_bad:
            notes.append(f"{ps_bad} samples had non-finite per-sample gradients and were left out")
    sig_src, block_names = "off", ()
    act = grd = np.zeros((0, 0))
    sig_seeds: tuple[int, ...] = ()
    sig_bad = 0
    if params.signal:
        seeds = [seed + i for i in range(params.seeds)]
        sig = signal_propagation(model, x, y, rebuild=rebuild, seeds=seeds, loss=loss, dtype=dtype, device=device,
                                 bn=params.bn, chunk=max(params.chunk, 1), batch_size=params.batch_size,
                                 output=output, progress=progress)
        sig_src = "rebuild" if rebuild is not None else "model"
        block_names, act, grd, sig_seeds, sig_bad = (sig.block_names, sig.act_var, sig.grad_norm, sig.seeds,
                                                     sig.nonfinite)
        if rebuild is None:
            when = {True: "at initialisation", False: "at this checkpoint, not at initialisation"}.get(
                at_init, "as given")
            notes.append(f"signal propagation on the given model only (no rebuild), {when}: one model, std 0")
        elif at_init is False:
            notes.append("signal propagation at initialisation (fresh models from the seeds), not at this checkpoint")
        if sig_bad:
            notes.append(f"{sig_bad} non-finite depth-curve values left out of the seed averages")
        ranks["signal-propagation"] = sig.ranks
    shared = [what for what, r in ranks.items() if r]
    if shared:
        notes.append(f"{', '.join(shared[:-1]) + ' and ' if len(shared) > 1 else ''}{shared[-1]} gradients shared out "
                     f"over {max(ranks.values())} rank(s), their moments merged")
    return GradVarResult(
        names=mb.names, modules=tuple(_module_of(n) for n in mb.names), numel=mb.numel,
        grad_norm=mb.grad_norm, trace_cov=mb.trace_cov, snr=_ratio(g2, mb.trace_cov),
        noise_scale=_ratio(params.batch_size * mb.trace_cov, g2), per_sample_var=np.asarray(ps_var, dtype=np.float64),
        per_sample_grad_norm=np.asarray(ps_gn, dtype=np.float64), noise_scale_ps=_ratio(ps_var, np.asarray(ps_gn) ** 2),
        rel_update=_ratio(lr_value * mb.batch_grad_rms, mb.weight_norm), weight_norm=mb.weight_norm,
        batch_grad_rms=mb.batch_grad_rms, nonfinite=mb.nonfinite,
        block_names=tuple(block_names), act_var_seeds=np.asarray(act, dtype=np.float64),
        block_grad_seeds=np.asarray(grd, dtype=np.float64), signal_seeds=tuple(sig_seeds),
        n=int(x.shape[0]), batches=params.batches, batch_size=params.batch_size, lr=lr_value, lr_source=lr_source,
        dtype=params.dtype, bn=params.bn, per_sample=params.per_sample, chunk=params.chunk, seed=int(seed),
        signal=params.signal, signal_source=sig_src, batches_used=mb.batches_used,
        nonfinite_batches=mb.nonfinite_batches, samples_used=ps_used, nonfinite_samples=ps_bad,
        signal_nonfinite=sig_bad, notes=tuple(notes), trains=trains)


#: A tensor whose training-mode gradient is below this fraction of the probe's own does not train.
FROZEN_RATIO = 1e-4


def _trains(model: nn.Module, x: Tensor, y: Tensor, grad_norm: np.ndarray, params: GradVarParams, *, seed: int,
            loss, dtype, device) -> np.ndarray:
    """(L,) bool: whether each parameter tensor gets a gradient in training. In training BatchNorm
    normalises by the batch's own statistics, so a bias added just before it (a conv bias before
    BatchNorm) has an exactly zero gradient there, while an eval-mode probe (running statistics)
    gives it one. Measured on two mini-batches in train mode (running statistics untouched): a
    tensor whose gradient norm there is below :data:`FROZEN_RATIO` of the probe's ``grad_norm``."""
    L = len(grad_norm)
    batchnorms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    if params.bn == "train" or not any(isinstance(m, batchnorms) for m in model.modules()):
        return np.ones(L, dtype=bool)
    tr = minibatch_gradient_stats(model, x, y, batches=2, batch_size=params.batch_size, seed=seed, loss=loss,
                                  dtype=dtype, device=device, bn="train")
    g_train, g_probe = np.asarray(tr.grad_norm, dtype=np.float64), np.asarray(grad_norm, dtype=np.float64)
    frozen = np.isfinite(g_train) & (g_train <= FROZEN_RATIO * g_probe)
    return ~frozen
