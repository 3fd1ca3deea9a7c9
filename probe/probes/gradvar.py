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
import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from probe import functional as _fn

from probe._checks import check_bool, check_choice, check_int, check_number
from probe.errors import UserError
from probe.figures.gradvar import gradvar_figure
from probe.probes.registry import Probe, ProbeContext, Progress, register

__all__ = ["GradVarParams", "GradVarResult", "MinibatchStats", "PerSampleStats", "SignalStats",
           "LossFn", "cross_entropy_per_sample", "minibatch_indices", "minibatch_gradient_stats",
           "per_sample_gradients", "per_sample_variance", "signal_propagation", "find_blocks",
           "bn_mode", "gradient_variance", "compute"]

#: ``loss(outputs (B, ...), targets (B, ...)) -> (B,)`` per-sample losses (a batch's loss is their mean).
LossFn = Callable[[Tensor, Tensor], Tensor]

_BN = nn.modules.batchnorm._BatchNorm
_BN_MODES = ("eval", "train")
_DTYPES = ("float32", "float64")


def cross_entropy_per_sample(out: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy of logits ``out`` (B, C) against labels ``y`` (B,): (B,)."""
    return F.cross_entropy(out, y, reduction="none")


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GradVarParams:
    """Options of the gradient-variance probe."""

    batches: int = field(default=8, metadata={
        "help": "number K of mini-batches (drawn without replacement; K * batch_size <= n); at least 2"})
    batch_size: int = field(default=32, metadata={"help": "mini-batch size B"})
    lr: float = field(default=0.1, metadata={
        "help": "learning rate for the relative update size |lr g| / |w| when the run does not give one"})
    per_sample: bool = field(default=True, metadata={
        "help": "also compute the per-sample gradient variance over all n samples (vmap)"})
    chunk: int = field(default=64, metadata={
        "help": "samples per vmap call for per-sample gradients (bounds memory to ~chunk x parameters)"})
    seeds: int = field(default=3, metadata={
        "help": "initialisations averaged for the signal-propagation depth curves"})
    signal: bool = field(default=True, metadata={
        "help": "compute the signal-propagation depth curves (activation variance, gradient norm per block)"})
    dtype: str = field(default="float32", metadata={"help": "compute dtype", "choices": _DTYPES})
    bn: str = field(default="eval", metadata={
        "help": "BatchNorm: eval = running statistics; train = batch statistics, running statistics not "
                "updated", "choices": _BN_MODES})

    def __post_init__(self):
        check_int("batches", self.batches, 2, 10 ** 6)
        check_int("batch_size", self.batch_size, 1, 10 ** 7)
        object.__setattr__(self, "lr", check_number("lr", self.lr, 0, math.inf, lo_open=True))
        check_bool("per_sample", self.per_sample)
        check_int("chunk", self.chunk, 1, 10 ** 7)
        check_int("seeds", self.seeds, 1, 1000)
        check_bool("signal", self.signal)
        check_choice("dtype", self.dtype, _DTYPES)
        check_choice("bn", self.bn, _BN_MODES)


# ------------------------------------------------------------------------------------------------
# Functional evaluation with a BatchNorm mode
# ------------------------------------------------------------------------------------------------

@contextmanager
def bn_mode(model: nn.Module, bn: str = "eval") -> Iterator[set[str]]:
    """Every module in eval mode for the duration; with ``bn="train"`` the BatchNorm modules use
    batch statistics and their running statistics are detached (set to None) so they are neither
    read nor updated. Yields the buffer names to leave out of a ``functional_call`` (the detached
    running statistics). Every flag and buffer is put back afterwards, also when the body raises.
    """
    check_choice("bn", bn, _BN_MODES)
    with _fn.eval_mode(model):
        if bn == "eval":
            yield set()
            return
        saved, skip = [], set()
        try:
            for name, m in model.named_modules():
                if isinstance(m, _BN):
                    saved.append((m, m.training, m.track_running_stats, m.running_mean, m.running_var))
                    prefix = f"{name}." if name else ""
                    skip.update({prefix + "running_mean", prefix + "running_var"})
                    m.training, m.track_running_stats = True, False
                    if m.running_mean is not None:
                        m.running_mean = None
                    if m.running_var is not None:
                        m.running_var = None
            yield skip
        finally:
            for m, training, track, mean, var in saved:
                m.training, m.track_running_stats = training, track
                if mean is not None:
                    m.running_mean = mean
                if var is not None:
                    m.running_var = var


def _couples_samples(model: nn.Module) -> bool:
    """True when the eval-mode forward mixes samples (BatchNorm without running statistics)."""
    return any(isinstance(m, _BN) and m.running_mean is None for m in model.modules())


class _Fwd:
    """``fwd(params, x)``: the model as a pure function (detached parameter/buffer copies)."""

    def __init__(self, model: nn.Module, dtype: str | torch.dtype | None, device, skip: set[str]):
        self.fm = _fn.functionalize(model, dtype=dtype, device=device)
        self.model = model
        self.params = self.fm.params
        self.buffers = {k: v for k, v in self.fm.buffers.items() if k not in skip}

    def __call__(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.model, ({**self.fm.fixed, **params}, self.buffers), (x,))

    def prepare(self, t: Tensor) -> Tensor:
        return self.fm.prepare(t)


def _check_data(x, y, min_n: int = 1) -> tuple[Tensor, Tensor]:
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
        raise UserError(f"inputs and targets must have the same number of samples, got shapes "
                        f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < min_n:
        raise UserError(f"need at least {min_n} samples, got {x.shape[0]}")
    return x, y


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _progress(progress: Progress | None, desc: str, done: int, total: int) -> None:
    if progress is not None:
        progress(desc, done, total)


def _norm64(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach().to(torch.float64)))


# ------------------------------------------------------------------------------------------------
# 1. Mini-batch gradient statistics
# ------------------------------------------------------------------------------------------------

def minibatch_indices(n: int, batches: int, batch_size: int, seed: int = 0) -> Tensor:
    """Indices (K, B) of ``batches`` mini-batches of ``batch_size`` distinct samples out of ``n``,
    the first ``K*B`` entries of a permutation seeded with ``seed`` (the global RNG is untouched).
    Refuses ``K*B > n``."""
    check_int("batches", batches, 1, 10 ** 6)
    check_int("batch_size", batch_size, 1, 10 ** 7)
    if batches * batch_size > n:
        raise UserError(f"batches * batch_size = {batches} * {batch_size} = {batches * batch_size} exceeds the "
                        f"{n} samples given (mini-batches are drawn without replacement); lower batches or "
                        f"batch_size, or give at least {batches * batch_size} samples")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    return perm[:batches * batch_size].reshape(batches, batch_size)


@dataclass(frozen=True, eq=False)
class MinibatchStats:
    """Per-parameter-tensor mini-batch statistics (arrays of length L, float64 unless noted)."""

    names: tuple[str, ...]
    numel: np.ndarray           # (L,) int64
    grad_norm: np.ndarray       # |G|, G = mean over the finite batches
    trace_cov: np.ndarray       # tr(Sigma_B), unbiased (divisor K_used - 1)
    batch_grad_rms: np.ndarray  # sqrt(mean_k |g_k|^2)
    weight_norm: np.ndarray     # |w|
    nonfinite: np.ndarray       # (L,) int64: batches in which this tensor's gradient was non-finite
    batches_used: int
    nonfinite_batches: int
    indices: np.ndarray         # (K, B) int64 sample indices of the batches


def _layer_moments_init(params: dict[str, Tensor]):
    return ({n: None for n in params},                     # shift per layer (float64)
            {n: torch.zeros(p.numel(), dtype=torch.float64, device=p.device) for n, p in params.items()},
            {n: 0.0 for n in params})                      # sum of squared shifted norms


def minibatch_gradient_stats(model: nn.Module, x: Tensor, y: Tensor, *, batches: int = 8, batch_size: int = 32,
                             seed: int = 0, loss: LossFn | None = None, dtype: str | torch.dtype | None = None,
                             device: torch.device | str | None = None, bn: str = "eval",
                             progress: Progress | None = None) -> MinibatchStats:
    """Gradients of ``K = batches`` mini-batch losses (mean of ``loss`` over ``batch_size`` samples
    drawn without replacement, :func:`minibatch_indices`) and their per-layer moments.

    Streaming, in float64 around the first finite batch (memory ~3 P): for each layer with
    ``d_k = g_k - g_1``: ``G = g_1 + mean_k d_k`` and
    ``tr(Sigma_B) = (sum_k |d_k|^2 - K |mean_k d_k|^2) / (K - 1)``. A batch with any non-finite
    gradient entry is left out (and counted, per layer and in total).
    """
    x, y = _check_data(x, y)
    loss = loss or cross_entropy_per_sample
    idx = minibatch_indices(x.shape[0], batches, batch_size, seed)          # (K, B)
    with bn_mode(model, bn) as skip:
        fwd = _Fwd(model, dtype, device, skip)
        params = fwd.params
        names = list(params)

        def batch_loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
            return loss(fwd(p, xb), yb).mean()

        g_fn = grad(batch_loss)
        shift, s1, s2 = _layer_moments_init(params)
        sq = {n: 0.0 for n in names}
        bad = {n: 0 for n in names}
        used = nonfinite = 0
        for k in range(batches):
            xb, yb = fwd.prepare(x[idx[k]]), fwd.prepare(y[idx[k]])
            g = g_fn(params, xb, yb)                                          # name -> shape of param
            finite = {n: bool(torch.isfinite(g[n]).all()) for n in names}
            if not all(finite.values()):
                nonfinite += 1
                for n in names:
                    bad[n] += not finite[n]
            else:
                used += 1
                for n in names:
                    gk = g[n].detach().reshape(-1).to(torch.float64)
                    if shift[n] is None:
                        shift[n] = gk.clone()
                    d = gk - shift[n]
                    s1[n] += d
                    s2[n] += float(d @ d)
                    sq[n] += float(gk @ gk)
            _progress(progress, "gradvar: mini-batch gradients", k + 1, batches)
        wn = np.array([_norm64(params[n]) for n in names], dtype=np.float64)
    gn, tc, rms = (np.full(len(names), np.nan) for _ in range(3))
    for j, n in enumerate(names):
        if used >= 1:
            mean_d = s1[n] / used
            gn[j] = _norm64(shift[n] + mean_d)
            rms[j] = math.sqrt(sq[n] / used)
        if used >= 2:
            tc[j] = max((s2[n] - used * float(mean_d @ mean_d)) / (used - 1), 0.0)
    return MinibatchStats(names=tuple(names), numel=np.array([params[n].numel() for n in names], dtype=np.int64),
                          grad_norm=gn, trace_cov=tc, batch_grad_rms=rms, weight_norm=wn,
                          nonfinite=np.array([bad[n] for n in names], dtype=np.int64), batches_used=used,
                          nonfinite_batches=nonfinite, indices=idx.numpy().astype(np.int64))


# ------------------------------------------------------------------------------------------------
# 2. Per-sample gradients and their variance
# ------------------------------------------------------------------------------------------------

def _groups(n: int, size: int, seed: int) -> list[Tensor]:
    """Consecutive groups of ``size`` of a seeded permutation of ``n`` (remainder left out; one
    group of all ``n`` when ``n < size``)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    if n < size:
        return [perm]
    return [perm[s:s + size] for s in range(0, n - size + 1, size)]


_METHODS = ("auto", "vmap", "closed_form")


@dataclass
class _Plan:
    """How per-sample gradients are formed: ``layers`` (structured layers whose closed form passed
    the self-check; their parameters ``closed``), the other parameters ``rest`` by vmap(grad), or
    ``grouped`` (batch statistics: VJP rows per group)."""

    grouped: bool
    layers: list = field(default_factory=list)
    closed: tuple[str, ...] = ()
    rest: tuple[str, ...] = ()
    out_shape: tuple[int, ...] = ()
    failed: tuple[str, ...] = ()        # parameters whose closed form failed the self-check


def _plan(fwd: _Fwd, x: Tensor, grouped: bool, method: str) -> _Plan:
    """Closed form (:mod:`probe.autodiff`) for the Linear / Conv2d / BatchNorm layers whose
    per-sample rows match autograd on two samples, ``vmap(grad)`` for every other parameter;
    ``method="vmap"`` forces vmap everywhere. Independent samples only."""
    check_choice("method", method, _METHODS)
    names = tuple(fwd.params)
    if grouped:
        return _Plan(grouped=True, rest=names)
    if method == "vmap":
        return _Plan(grouped=False, rest=names)
    try:
        from probe.autodiff import (check_closed_forms, find_structured_layers, record_layer_calls,
                                    set_layer_shapes)
    except ImportError:  # pragma: no cover - depends on the checkout
        return _Plan(grouped=False, rest=names)
    layers = find_structured_layers(fwd.fm)
    if not layers:
        return _Plan(grouped=False, rest=names)
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1) if x.is_floating_point() else \
        torch.ones(x.shape[0], dtype=torch.bool)
    pick = torch.nonzero(finite).reshape(-1)[:2]
    x0 = fwd.prepare(x[pick if len(pick) else torch.arange(min(2, x.shape[0]))])     # check on finite inputs
    params = {n: p.detach().requires_grad_() for n, p in fwd.params.items()}
    with record_layer_calls(layers) as calls, torch.enable_grad():
        out = fwd.fm(params, x0)
    set_layer_shapes(layers, calls, fwd.fm.params)
    good, failed = check_closed_forms(fwd.fm, x0, [lay for lay in layers if lay.calls > 0], int(out[0].numel()))
    closed = tuple(n for n in names if any(n in lay.names for lay in good))
    return _Plan(grouped=False, layers=good, closed=closed, rest=tuple(n for n in names if n not in closed),
                 out_shape=tuple(out.shape[1:]), failed=tuple(failed))


def _closed_form_rows(fwd: _Fwd, plan: _Plan, loss: LossFn, xb: Tensor, yb: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: (c, numel)}`` of the closed-form parameters: one batched
    forward recording every structured layer's input a and output z, one backward pass of
    ``sum_i l_i`` giving ``g_i = d l_i / d z_i`` (samples independent), and the closed forms of
    :func:`probe.autodiff.per_sample_grad_parts` (Linear / Conv2d: ``sum_t g_t a_t^T``; BatchNorm:
    ``sum_t g_t x_hat_t``; biases ``sum_t g_t``), summed over a layer's calls."""
    from probe.autodiff import per_sample_grad_parts, record_forward

    c = xb.shape[0]
    params = {n: p.detach().requires_grad_() for n, p in fwd.params.items()}
    with torch.enable_grad():
        rec = record_forward(fwd.fm, params, xb, plan.layers)
        total = loss(rec.y.reshape((c,) + plan.out_shape), yb).sum()                 # sum_i l_i
        zs = [r.z for r in rec.recs]
        gz = torch.autograd.grad(total, zs, allow_unused=True)                        # d l_i / d z_i
    rows: dict[str, Tensor] = {}
    for r, g in zip(rec.recs, gz):
        if g is None:
            continue
        for name, part in per_sample_grad_parts(plan.layers[r.layer], r, g.detach().unsqueeze(0)):
            rows[name] = part[:, 0] if name not in rows else rows[name] + part[:, 0]  # (c, numel)
    for name in plan.closed:
        if name not in rows:
            p = fwd.params[name]
            rows[name] = torch.zeros((c, p.numel()), dtype=p.dtype, device=p.device)
    return rows


def _iter_per_sample(fwd: _Fwd, plan: _Plan, loss: LossFn, x: Tensor, y: Tensor, chunk: int,
                     batch_size: int, seed: int) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """Yield ``(sample indices (c,), {name: per-sample gradients (c, *param shape)})`` chunk by chunk.

    Independent samples (eval-mode BatchNorm): the closed-form layers of ``plan`` from one batched
    forward/backward (:func:`_closed_form_rows`), the other parameters by ``vmap(grad(l_i))`` over
    ``chunk`` samples. Grouped (batch statistics): per group of ``batch_size`` samples, one VJP of
    the vector of per-sample losses (B,) and ``vmap`` over ``chunk`` rows of the identity as
    cotangents.
    """
    params = fwd.params
    if not plan.grouped:
        rest = {n: params[n] for n in plan.rest}
        held = {n: params[n] for n in plan.closed}

        def one(p, xi, yi):
            return loss(fwd({**held, **p}, xi.unsqueeze(0)), yi.unsqueeze(0)).sum()

        g_fn = vmap(grad(one), in_dims=(None, 0, 0))
        for s in range(0, x.shape[0], chunk):
            idx = torch.arange(s, min(s + chunk, x.shape[0]))
            xb, yb = fwd.prepare(x[idx]), fwd.prepare(y[idx])
            out: dict[str, Tensor] = {}
            if plan.closed:
                rows = _closed_form_rows(fwd, plan, loss, xb, yb)
                out.update({n: rows[n].reshape((len(idx),) + params[n].shape) for n in plan.closed})
            if rest:
                out.update(g_fn(rest, xb, yb))
            yield idx, {n: out[n] for n in params}
        return
    for gidx in _groups(x.shape[0], batch_size, seed):
        xg, yg = fwd.prepare(x[gidx]), fwd.prepare(y[gidx])
        losses, vjp_fn = vjp(lambda p: loss(fwd(p, xg), yg), params)        # (b,)
        eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
        for s in range(0, losses.shape[0], chunk):
            yield gidx[s:s + chunk], vmap(vjp_fn)(eye[s:s + chunk])[0]


def per_sample_gradients(model: nn.Module, x: Tensor, y: Tensor, *, loss: LossFn | None = None,
                         dtype: str | torch.dtype | None = None, device: torch.device | str | None = None,
                         bn: str = "eval", chunk: int = 64, batch_size: int = 32,
                         seed: int = 0, method: str = "auto") -> dict[str, Tensor]:
    """Per-sample gradients ``{name: (N, *param shape)}`` of ``loss`` (sample order kept; with
    ``bn="train"`` rows of samples left out of every group are NaN). Materialises N x P: for
    small problems and tests; :func:`per_sample_variance` streams instead. ``method``: ``auto``
    (closed form where it applies, see :func:`per_sample_variance`), ``vmap`` or ``closed_form``
    (the same as auto: parameters without a closed form always use vmap)."""
    x, y = _check_data(x, y)
    loss = loss or cross_entropy_per_sample
    grouped = bn == "train" or _couples_samples(model)
    with bn_mode(model, bn) as skip:
        fwd = _Fwd(model, dtype, device, skip)
        plan = _plan(fwd, x, grouped, method)
        out = {n: torch.full((x.shape[0], *p.shape), float("nan"), dtype=p.dtype, device=p.device)
               for n, p in fwd.params.items()}
        for idx, g in _iter_per_sample(fwd, plan, loss, x, y, chunk, batch_size, seed):
            for n in out:
                out[n][idx.to(out[n].device)] = g[n].detach()
    return out


@dataclass(frozen=True, eq=False)
class PerSampleStats:
    """Per-parameter-tensor per-sample statistics (arrays of length L, float64)."""

    names: tuple[str, ...]
    variance: np.ndarray        # tr(Sigma_1) = 1/(n-1) sum_i |g_i - gbar|^2
    mean_grad_norm: np.ndarray  # |gbar|, the mean of the finite per-sample gradients
    mean_sq_norm: np.ndarray    # mean_i |g_i|^2
    samples_used: int
    nonfinite_samples: int
    grouped: bool               # per-sample gradients through group batch statistics
    closed_form: tuple[str, ...] = ()   # parameters done by the closed form (probe.autodiff)
    failed_check: tuple[str, ...] = ()  # structured parameters whose closed form failed its self-check


def per_sample_variance(model: nn.Module, x: Tensor, y: Tensor, *, chunk: int = 64, loss: LossFn | None = None,
                        dtype: str | torch.dtype | None = None, device: torch.device | str | None = None,
                        bn: str = "eval", batch_size: int = 32, seed: int = 0, method: str = "auto",
                        progress: Progress | None = None) -> PerSampleStats:
    """Per layer, the variance over samples of per-sample gradients (the trace of the per-sample
    gradient covariance ``Sigma_1``, divisor ``n - 1``), streamed over chunks of ``chunk`` samples
    (memory ~ ``chunk * P`` for the gradients plus ``2 P`` float64 accumulators).

    For each layer with shift ``c`` (the first finite chunk's mean) and ``d_i = g_i - c``:
    ``gbar = c + mean_i d_i``, ``tr(Sigma_1) = (sum_i |d_i|^2 - n |mean_i d_i|^2) / (n - 1)``.
    A sample whose gradient has a non-finite entry in any layer is left out and counted.

    Per-sample gradients (``method="auto"``, samples independent): Linear / Conv2d / BatchNorm
    layers in closed form from one batched forward and backward pass per chunk
    (:mod:`probe.autodiff`, after its self-check against autograd on two samples), every other
    parameter by ``vmap(grad)``; ``method="vmap"`` uses vmap for all. With batch statistics
    (``bn="train"`` or BatchNorm without running statistics) per-group VJP rows (see
    :func:`_iter_per_sample`).
    """
    x, y = _check_data(x, y, min_n=2)
    check_int("chunk", chunk, 1, 10 ** 7)
    loss = loss or cross_entropy_per_sample
    grouped = bn == "train" or _couples_samples(model)
    total = x.shape[0] if not grouped else sum(len(g) for g in _groups(x.shape[0], batch_size, seed))
    with bn_mode(model, bn) as skip:
        fwd = _Fwd(model, dtype, device, skip)
        names = list(fwd.params)
        plan = _plan(fwd, x, grouped, method)
        shift, s1, s2 = _layer_moments_init(fwd.params)
        used = bad = done = 0
        for idx, g in _iter_per_sample(fwd, plan, loss, x, y, chunk, batch_size, seed):
            c = idx.shape[0]
            flat = {n: g[n].detach().reshape(c, -1) for n in names}                # (c, numel)
            if any(shift[n] is None for n in names):                               # first chunk: the shift
                ok = torch.ones(c, dtype=torch.bool, device=flat[names[0]].device)
                for n in names:
                    ok &= torch.isfinite(flat[n]).all(dim=1)
                if ok.any():
                    for n in names:
                        shift[n] = flat[n][ok].to(torch.float64).mean(0)
            if any(shift[n] is None for n in names):                               # no finite sample yet
                bad += c
            else:
                # one float64 pass per layer (one layer's float64 rows alive at a time):
                # d_i = g_i - c, |d_i|^2 per sample and sum_i d_i; a non-finite entry makes |d_i|^2
                # non-finite, so the finite test comes with it
                rsq, dsum = {}, {}
                for n in names:
                    d = flat[n].to(torch.float64) - shift[n]                        # (c, numel)
                    rsq[n], dsum[n] = d.square().sum(1), d.sum(0)                   # (c,), (numel,)
                    del d
                ok = torch.ones(c, dtype=torch.bool, device=flat[names[0]].device)
                for n in names:
                    ok &= torch.isfinite(rsq[n])
                k = int(ok.sum())
                bad += c - k
                used += k
                for n in names:
                    if k == c:
                        s1[n] += dsum[n]
                        s2[n] += float(rsq[n].sum())
                    elif k:                                                          # rare: recompute the finite rows
                        s1[n] += (flat[n][ok].to(torch.float64) - shift[n]).sum(0)
                        s2[n] += float(rsq[n][ok].sum())
                del rsq, dsum
            done += c
            _progress(progress, "gradvar: per-sample gradients", done, total)
    var, mgn, msq = (np.full(len(names), np.nan) for _ in range(3))
    for j, n in enumerate(names):
        if used >= 1:
            mean_d = s1[n] / used
            mgn[j] = _norm64(shift[n] + mean_d)
            # sum_i |g_i|^2 = sum_i |d_i|^2 + 2 c . sum_i d_i + n |c|^2
            msq[j] = (s2[n] + 2 * float(shift[n] @ s1[n]) + used * float(shift[n] @ shift[n])) / used
        if used >= 2:
            var[j] = max((s2[n] - used * float(mean_d @ mean_d)) / (used - 1), 0.0)
    return PerSampleStats(names=tuple(names), variance=var, mean_grad_norm=mgn, mean_sq_norm=msq,
                          samples_used=used, nonfinite_samples=bad, grouped=grouped,
                          closed_form=plan.closed, failed_check=plan.failed)


# ------------------------------------------------------------------------------------------------
# 3. Signal propagation at initialisation
# ------------------------------------------------------------------------------------------------

def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual blocks of the WRN / ResNet families in forward order (modules that are a
    ``WideBasic`` / ``BasicBlock`` / ``Bottleneck`` or own a ``Fusion``), outermost only; for other
    models the top-level children (descending through a single container child)."""
    try:
        from models.blocks import BasicBlock, Bottleneck, WideBasic
        from models.fusion import Fusion
        kinds: tuple[type, ...] = (BasicBlock, Bottleneck, WideBasic)
    except ImportError:  # pragma: no cover
        kinds, Fusion = (), None

    def is_block(m: nn.Module) -> bool:
        return isinstance(m, kinds) or (Fusion is not None and any(isinstance(c, Fusion) for c in m.children()))

    blocks: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, m in model.named_modules():
        if name and is_block(m) and not any(name.startswith(p + ".") for p in inside):
            blocks.append((name, m))
            inside.append(name)
    if blocks:
        return blocks
    root, prefix = model, ""
    while True:
        kids = list(root.named_children())
        if len(kids) == 1 and len(list(kids[0][1].children())) > 0:
            prefix, root = prefix + kids[0][0] + ".", kids[0][1]
            continue
        return [(prefix + n, m) for n, m in kids]


@dataclass(frozen=True, eq=False)
class SignalStats:
    """Depth curves: one row per initialisation (S, D), float64; NaN where non-finite."""

    block_names: tuple[str, ...]
    act_var: np.ndarray         # (S, D) variance of the block output over all its entries
    grad_norm: np.ndarray       # (S, D) rms over samples of |d l_i / d h_i|
    seeds: tuple[int, ...]      # the seeds rebuilt (empty: the given model only)
    nonfinite: int              # (seed, block) values left out as non-finite


def _signal_one(model: nn.Module, x: Tensor, y: Tensor, loss: LossFn, dtype, device, bn: str, chunk: int,
                batch_size: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(block names, act variance (D,), rms per-sample output-gradient norm (D,)) of one model."""
    blocks = find_blocks(model)
    names = [n for n, _ in blocks]
    D = len(names)
    rec: dict[int, Tensor] = {}

    def hook_for(j: int):
        def hook(_m, _inp, out):
            if isinstance(out, Tensor):
                rec[j] = out
                return out.clone()      # a later in-place op downstream cannot rewrite the recorded h
        return hook

    handles = [m.register_forward_hook(hook_for(j)) for j, (_, m) in enumerate(blocks)]
    s1, s2, cnt, gsq = np.zeros(D), np.zeros(D), np.zeros(D), np.zeros(D)
    n_rows = 0
    try:
        with bn_mode(model, bn) as skip, torch.enable_grad():
            fwd = _Fwd(model, dtype, device, skip)
            params = {n: p.requires_grad_(True) for n, p in fwd.params.items()}     # our copies
            grouped = bn == "train" or _couples_samples(model)
            if grouped:
                parts = _groups(x.shape[0], batch_size, seed)
            else:
                parts = [torch.arange(s, min(s + chunk, x.shape[0])) for s in range(0, x.shape[0], chunk)]
            for idx in parts:
                rec.clear()
                xb, yb = fwd.prepare(x[idx]), fwd.prepare(y[idx])
                if xb.is_floating_point():
                    xb.requires_grad_(True)
                total = loss(fwd(params, xb), yb).sum()                             # sum_i l_i
                hs = [rec.get(j) for j in range(D)]
                have = [j for j in range(D) if hs[j] is not None and hs[j].requires_grad]
                grads = torch.autograd.grad(total, [hs[j] for j in have], allow_unused=True)
                for j, gj in zip(have, grads):
                    h = hs[j].detach().to(torch.float64)
                    s1[j] += float(h.sum())
                    s2[j] += float((h * h).sum())
                    cnt[j] += h.numel()
                    if gj is not None:          # rows of d(sum_i l_i)/dh = d l_i / d h_i (eval BN)
                        gsq[j] += float(gj.detach().to(torch.float64).pow(2).sum())
                for j in range(D):
                    if j not in have and hs[j] is not None:
                        h = hs[j].detach().to(torch.float64)
                        s1[j] += float(h.sum())
                        s2[j] += float((h * h).sum())
                        cnt[j] += h.numel()
                n_rows += idx.shape[0]
                rec.clear()
    finally:
        for h in handles:
            h.remove()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / cnt
        act_var = np.maximum(s2 / cnt - mean * mean, 0.0)
        act_var[cnt == 0] = np.nan
        gnorm = np.sqrt(gsq / max(n_rows, 1))
    act_var[~np.isfinite(act_var)] = np.nan
    gnorm[~np.isfinite(gnorm)] = np.nan
    return names, act_var, gnorm


def signal_propagation(model: nn.Module, x: Tensor, y: Tensor, *, rebuild: Callable[[int], nn.Module] | None = None,
                       seeds: Sequence[int] = (0, 1, 2), loss: LossFn | None = None,
                       dtype: str | torch.dtype | None = None, device: torch.device | str | None = None,
                       bn: str = "eval", chunk: int = 64, batch_size: int = 32,
                       progress: Progress | None = None) -> SignalStats:
    """Forward activation variance of each block's output and the root-mean-square of the per-sample
    gradient norm of the loss w.r.t. it, ``sqrt(mean_i |d l_i / d h_i|^2)``, per block vs depth.

    With ``rebuild`` (``seed -> fresh model``) each of ``seeds`` gives one initialisation (its
    BatchNorm statistics estimated on ``x`` for ``bn="eval"``; the global RNG state is restored after
    each rebuild); without it the given ``model`` alone is measured (``seeds`` of the result empty).
    Gradient rows come from ``d(sum_i l_i)/dh``; with batch statistics (``bn="train"``) a row also
    carries the other samples' dependence on ``h_i`` through the group statistics.
    """
    x, y = _check_data(x, y)
    loss = loss or cross_entropy_per_sample
    check_choice("bn", bn, _BN_MODES)
    if rebuild is None:
        models: list[tuple[int | None, Callable[[], nn.Module]]] = [(None, lambda: model)]
    else:
        def make(s: int) -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                m = rebuild(s)
            if not isinstance(m, nn.Module):
                raise UserError(f"rebuild({s}) returned {type(m).__name__}, not a torch.nn.Module")
            dev = torch.device(device) if device is not None else None
            if dev is not None:
                m = m.to(dev)
            if bn == "eval":
                m = _fn.calibrate_batchnorm(m, x)
            return m.eval()
        models = [(int(s), (lambda s=s: make(int(s)))) for s in seeds]
    names0: list[str] | None = None
    av, gn = [], []
    for i, (s, get) in enumerate(models):
        m = get()
        names, a, g = _signal_one(m, x, y, loss, dtype, device, bn, chunk, batch_size, s or 0)
        if names0 is None:
            names0 = names
        elif names != names0:
            raise UserError(f"rebuild({s}) gave a model with other blocks ({len(names)} vs {len(names0)})")
        av.append(a)
        gn.append(g)
        _progress(progress, "gradvar: signal propagation", i + 1, len(models))
    act, gr = np.array(av, dtype=np.float64), np.array(gn, dtype=np.float64)
    return SignalStats(block_names=tuple(names0 or ()), act_var=act.reshape(len(models), -1),
                       grad_norm=gr.reshape(len(models), -1),
                       seeds=tuple(s for s, _ in models if s is not None),
                       nonfinite=int((~np.isfinite(act)).sum() + (~np.isfinite(gr)).sum()))


# ------------------------------------------------------------------------------------------------
# The result
# ------------------------------------------------------------------------------------------------

_LAYER_FLOATS = ("grad_norm", "trace_cov", "snr", "noise_scale", "per_sample_var", "per_sample_grad_norm",
                 "noise_scale_ps", "rel_update", "weight_norm", "batch_grad_rms")
_BLOCK_FLOATS = ("act_var_seeds", "block_grad_seeds")
_SETTINGS = ("n", "batches", "batch_size", "lr", "lr_source", "dtype", "bn", "per_sample", "chunk", "seed",
             "signal", "signal_source")
_COUNTS = ("batches_used", "nonfinite_batches", "samples_used", "nonfinite_samples", "signal_nonfinite")


def _ratio(a, b) -> np.ndarray:
    """a / b elementwise: inf where b == 0 < a, NaN where both are 0 or either is NaN."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((b == 0) & (a == 0), np.nan, a / b)


def _json_float(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _mean_std(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 1 when 2+ finite values, else 0) over axis 0, ignoring NaN."""
    D = m.shape[1] if m.ndim == 2 else 0
    mean, std = np.full(D, np.nan), np.full(D, np.nan)
    for j in range(D):
        col = m[:, j][np.isfinite(m[:, j])]
        if col.size:
            mean[j] = col.mean()
            std[j] = col.std(ddof=1) if col.size > 1 else 0.0
    return mean, std


@dataclass(frozen=True, eq=False)
class GradVarResult:
    """Gradient variance of one model (see the module docstring for every quantity).

    Per layer (parameter tensor, L of them, in the model's parameter order): ``names``,
    ``modules`` (owning module), ``numel`` and float64 arrays ``grad_norm`` |G|, ``trace_cov``
    tr(Sigma_B), ``snr``, ``noise_scale`` B_simple = B tr(Sigma_B)/|G|^2 (from the mini-batches),
    ``per_sample_var`` tr(Sigma_1) from per-sample gradients, ``per_sample_grad_norm`` |gbar| over
    all samples, ``noise_scale_ps`` tr(Sigma_1)/|gbar|^2, ``rel_update`` lr rms|g_k|/|w|,
    ``weight_norm``, ``batch_grad_rms`` and ``nonfinite`` (batches left out for this tensor). Per
    block (D, depth 1..D): ``block_names``, ``act_var_seeds`` and ``block_grad_seeds`` (S, D), one row
    per initialisation (mean/std over seeds: :attr:`act_var_mean` etc.). NaN marks "not computed"
    (per_sample off) or "undefined" (0/0).
    """

    names: tuple[str, ...]
    modules: tuple[str, ...]
    numel: np.ndarray
    grad_norm: np.ndarray
    trace_cov: np.ndarray
    snr: np.ndarray
    noise_scale: np.ndarray
    per_sample_var: np.ndarray
    per_sample_grad_norm: np.ndarray
    noise_scale_ps: np.ndarray
    rel_update: np.ndarray
    weight_norm: np.ndarray
    batch_grad_rms: np.ndarray
    nonfinite: np.ndarray
    block_names: tuple[str, ...]
    act_var_seeds: np.ndarray
    block_grad_seeds: np.ndarray
    signal_seeds: tuple[int, ...]
    # settings
    n: int
    batches: int
    batch_size: int
    lr: float
    lr_source: str                  # "run" (ctx.lr) or "params"
    dtype: str
    bn: str
    per_sample: bool
    chunk: int
    seed: int
    signal: bool
    signal_source: str              # "rebuild", "model" or "off"
    # counts
    batches_used: int
    nonfinite_batches: int
    samples_used: int
    nonfinite_samples: int
    signal_nonfinite: int
    notes: tuple[str, ...] = ()

    # -- derived -----------------------------------------------------------------------------
    @property
    def block_depth(self) -> np.ndarray:
        """(D,) depth index of each block, 1 = the first."""
        return np.arange(1, len(self.block_names) + 1, dtype=np.int64)

    @property
    def act_var_mean(self) -> np.ndarray:
        return _mean_std(self.act_var_seeds)[0]

    @property
    def act_var_std(self) -> np.ndarray:
        return _mean_std(self.act_var_seeds)[1]

    @property
    def block_grad_mean(self) -> np.ndarray:
        return _mean_std(self.block_grad_seeds)[0]

    @property
    def block_grad_std(self) -> np.ndarray:
        return _mean_std(self.block_grad_seeds)[1]

    def _group(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        """Sums over parameter tensors grouped by ``keys`` (traces and squared norms add)."""
        uniq = list(dict.fromkeys(keys.tolist()))
        pos = {k: i for i, k in enumerate(uniq)}
        inv = np.array([pos[k] for k in keys.tolist()], dtype=np.int64)

        def add(v):
            out = np.zeros(len(uniq))
            np.add.at(out, inv, np.asarray(v, dtype=np.float64))
            return out

        numel = np.zeros(len(uniq), dtype=np.int64)
        np.add.at(numel, inv, self.numel)
        g2, tc = add(self.grad_norm ** 2), add(self.trace_cov)
        psv, pg2 = add(self.per_sample_var), add(self.per_sample_grad_norm ** 2)
        w2, r2 = add(self.weight_norm ** 2), add(self.batch_grad_rms ** 2)
        return {"name": np.array(uniq, dtype=str), "numel": numel, "grad_norm": np.sqrt(g2), "trace_cov": tc,
                "snr": _ratio(g2, tc), "noise_scale": _ratio(self.batch_size * tc, g2),
                "per_sample_var": psv, "noise_scale_ps": _ratio(psv, pg2),
                "rel_update": _ratio(self.lr * np.sqrt(r2), np.sqrt(w2)), "weight_norm": np.sqrt(w2)}

    def by_module(self) -> dict[str, np.ndarray]:
        """The per-layer quantities grouped per owning module (arrays over modules, model order)."""
        return self._group(np.array(self.modules, dtype=str))

    def aggregates(self) -> dict[str, float]:
        """Whole-model values (all parameters as one vector), and the consistency ratio
        ``B tr(Sigma_B) / tr(Sigma_1)`` (1 in expectation, eval-mode BN)."""
        if not self.names:
            return {}
        g = self._group(np.zeros(len(self.names), dtype=str))
        out = {k: float(v[0]) for k, v in g.items() if k not in ("name", "numel")}
        out["numel"] = int(g["numel"][0])
        out["minibatch_over_per_sample"] = float(_ratio(self.batch_size * g["trace_cov"], g["per_sample_var"])[0])
        return out

    # -- storage -----------------------------------------------------------------------------
    def summary(self) -> dict:
        """JSON-able: settings, counts, whole-model aggregates, per-layer and per-module tables,
        depth curves and notes (non-finite floats as None)."""
        layers = [{"name": n, "module": m, "numel": int(self.numel[i]),
                   **{k: _json_float(getattr(self, k)[i]) for k in _LAYER_FLOATS},
                   "nonfinite": int(self.nonfinite[i])}
                  for i, (n, m) in enumerate(zip(self.names, self.modules))]
        mods = self.by_module()
        modules = [{"name": str(mods["name"][i]), "numel": int(mods["numel"][i]),
                    **{k: _json_float(v[i]) for k, v in mods.items() if k not in ("name", "numel")}}
                   for i in range(len(mods["name"]))]
        avm, avs, gm, gs = self.act_var_mean, self.act_var_std, self.block_grad_mean, self.block_grad_std
        depth = [{"block": b, "depth": i + 1, "act_var_mean": _json_float(avm[i]), "act_var_std": _json_float(avs[i]),
                  "grad_norm_mean": _json_float(gm[i]), "grad_norm_std": _json_float(gs[i])}
                 for i, b in enumerate(self.block_names)]
        return {"settings": {k: getattr(self, k) for k in _SETTINGS},
                "signal_seeds": list(self.signal_seeds),
                "counts": {k: getattr(self, k) for k in _COUNTS},
                "aggregates": {k: (_json_float(v) if isinstance(v, float) else v) for k, v in self.aggregates().items()},
                "layers": layers, "modules": modules, "depth": depth, "notes": list(self.notes)}

    def arrays(self) -> dict[str, np.ndarray]:
        """Numeric and fixed-width unicode arrays (no object dtype): the stored ``.npz``."""
        out = {"names": np.array(self.names, dtype=str).reshape(-1),
               "modules": np.array(self.modules, dtype=str).reshape(-1),
               "numel": np.asarray(self.numel, dtype=np.int64),
               "nonfinite": np.asarray(self.nonfinite, dtype=np.int64),
               "block_names": np.array(self.block_names, dtype=str).reshape(-1),
               "block_depth": self.block_depth,
               "signal_seeds": np.array(self.signal_seeds, dtype=np.int64).reshape(-1)}
        for k in _LAYER_FLOATS + _BLOCK_FLOATS:
            out[k] = np.asarray(getattr(self, k), dtype=np.float64)
        out.update(act_var_mean=self.act_var_mean, act_var_std=self.act_var_std,
                   block_grad_mean=self.block_grad_mean, block_grad_std=self.block_grad_std)
        return out

    @classmethod
    def from_store(cls, summary: dict, arrays: dict) -> "GradVarResult":
        """Inverse of ``(summary(), arrays())``."""
        try:
            st, ct = summary["settings"], summary["counts"]
            kw: dict[str, Any] = {k: st[k] for k in _SETTINGS}
            kw.update({k: int(ct[k]) for k in _COUNTS})
            kw["notes"] = tuple(str(s) for s in summary.get("notes", ()))
            for k in ("names", "modules", "block_names"):
                kw[k] = tuple(str(s) for s in np.asarray(arrays[k]).reshape(-1).tolist())
            kw["signal_seeds"] = tuple(int(s) for s in np.asarray(arrays["signal_seeds"]).reshape(-1).tolist())
            for k in ("numel", "nonfinite"):
                kw[k] = np.asarray(arrays[k], dtype=np.int64)
            for k in _LAYER_FLOATS:
                kw[k] = np.asarray(arrays[k], dtype=np.float64)
            D = len(kw["block_names"])
            for k in _BLOCK_FLOATS:
                a = np.asarray(arrays[k], dtype=np.float64)
                kw[k] = a if a.ndim == 2 else (a.reshape(-1, D) if D else a.reshape(0, 0))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"stored gradvar result is incomplete or malformed ({type(e).__name__}: {e})") from None
        for k in ("n", "batches", "batch_size", "chunk", "seed"):
            kw[k] = int(kw[k])
        kw["lr"] = float(kw["lr"])
        kw["per_sample"], kw["signal"] = bool(kw["per_sample"]), bool(kw["signal"])
        return cls(**kw)

    def __eq__(self, other) -> bool:
        if not isinstance(other, GradVarResult):
            return NotImplemented
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                a, b = np.asarray(a), np.asarray(b)
                if a.shape != b.shape or a.dtype.kind != b.dtype.kind or \
                        not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def text(self) -> str:
        """A short table: settings, whole model, per module, depth curves, notes."""
        def f(v) -> str:
            v = float(v)
            return "-" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.3g}")

        lines = [f"gradvar: K={self.batches} mini-batches of B={self.batch_size} (of n={self.n}), "
                 f"lr {self.lr:g} ({self.lr_source}), {self.dtype}, bn {self.bn}",
                 f"non-finite: {self.nonfinite_batches} of {self.batches} batches, "
                 f"{self.nonfinite_samples} samples" + (f" (per-sample over {self.samples_used})"
                                                        if self.per_sample else " (per-sample off)")]
        agg = self.aggregates()
        if agg:
            lines.append(f"model: |G| {f(agg['grad_norm'])}  tr(Sigma_B) {f(agg['trace_cov'])}  SNR {f(agg['snr'])}"
                         f"  B_simple {f(agg['noise_scale'])}  tr(Sigma_1) {f(agg['per_sample_var'])}"
                         f"  B_simple(ps) {f(agg['noise_scale_ps'])}  |lr g|/|w| {f(agg['rel_update'])}")
        mods = self.by_module()
        w = max([len("module")] + [len(str(n) or "(model)") for n in mods["name"]])
        lines.append(f"{'module':<{w}} {'numel':>8} {'|G|':>9} {'trSig_B':>9} {'SNR':>9} {'B_simple':>9} "
                     f"{'trSig_1':>9} {'|lr g|/|w|':>10}")
        for i, name in enumerate(mods["name"]):
            lines.append(f"{(str(name) or '(model)'):<{w}} {int(mods['numel'][i]):>8} {f(mods['grad_norm'][i]):>9} "
                         f"{f(mods['trace_cov'][i]):>9} {f(mods['snr'][i]):>9} {f(mods['noise_scale'][i]):>9} "
                         f"{f(mods['per_sample_var'][i]):>9} {f(mods['rel_update'][i]):>10}")
        if self.block_names:
            src = (f"{len(self.signal_seeds)} initialisations" if self.signal_source == "rebuild"
                   else "the given model")
            lines.append(f"signal propagation ({src}): depth block act-var |dl/dh|")
            avm, avs, gm, gs = self.act_var_mean, self.act_var_std, self.block_grad_mean, self.block_grad_std
            bw = max(len(b) for b in self.block_names)
            for i, b in enumerate(self.block_names):
                lines.append(f"  {i + 1:>3} {b:<{bw}} {f(avm[i])} +- {f(avs[i])}  {f(gm[i])} +- {f(gs[i])}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The whole probe
# ------------------------------------------------------------------------------------------------

def gradient_variance(model: nn.Module, x: Tensor, y: Tensor, params: GradVarParams | None = None, *,
                      seed: int = 0, lr: float | None = None, rebuild: Callable[[int], nn.Module] | None = None,
                      at_init: bool | None = None, loss: LossFn | None = None,
                      device: torch.device | str | None = None, progress: Progress | None = None) -> GradVarResult:
    """All three parts (see the module docstring) as one :class:`GradVarResult`.

    ``lr`` is the run's learning rate at this checkpoint (``None``: ``params.lr``); ``seed`` seeds the
    mini-batch draw and the signal-propagation initialisations (``seed, seed+1, ...``);
    ``at_init`` (None = unknown) only words the notes when signal propagation measures the given
    model. The model is never changed.
    """
    params = params or GradVarParams()
    x, y = _check_data(x, y)
    if not isinstance(model, nn.Module):
        raise UserError(f"expected a torch.nn.Module, got {type(model).__name__}")
    lr_value, lr_source = (params.lr, "params") if lr is None else (check_number("lr", lr, 0, math.inf), "run")
    dtype = getattr(torch, params.dtype)
    notes: list[str] = []
    mb = minibatch_gradient_stats(model, x, y, batches=params.batches, batch_size=params.batch_size, seed=seed,
                                  loss=loss, dtype=dtype, device=device, bn=params.bn, progress=progress)
    L = len(mb.names)
    nan = np.full(L, np.nan)
    g2 = mb.grad_norm ** 2
    if mb.nonfinite_batches:
        notes.append(f"{mb.nonfinite_batches} of {params.batches} mini-batches had non-finite gradients and were "
                     "left out")
    if mb.batches_used < 2:
        notes.append(f"only {mb.batches_used} finite mini-batch(es): no covariance")
    ps_var, ps_gn, ps_used, ps_bad = nan, nan, 0, 0
    if params.per_sample:
        ps = per_sample_variance(model, x, y, chunk=params.chunk, loss=loss, dtype=dtype, device=device,
                                 bn=params.bn, batch_size=params.batch_size, seed=seed, progress=progress)
        ps_var, ps_gn, ps_used, ps_bad = ps.variance, ps.mean_grad_norm, ps.samples_used, ps.nonfinite_samples
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
                                 progress=progress)
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
        signal_nonfinite=sig_bad, notes=tuple(notes))


def compute(ctx: ProbeContext, params: GradVarParams) -> GradVarResult:
    """The runner's adapter: ``ctx.lr`` (else ``params.lr``), ``ctx.rebuild`` for the depth curves."""
    return gradient_variance(ctx.model, ctx.x, ctx.y, params, seed=ctx.seed, lr=ctx.lr, rebuild=ctx.rebuild,
                             at_init=ctx.at_init, device=ctx.device, progress=ctx.progress)


register(Probe(
    name="gradvar",
    help="per-layer gradient variance, SNR, noise scale and relative update size; depth curves at init",
    params=GradVarParams, result=GradVarResult, compute=compute, figure=gradvar_figure, default_n=512,
    description=("Over K seeded mini-batches (without replacement): per layer the mean gradient norm |G|, the "
                 "trace of the mini-batch gradient covariance tr(Sigma_B), SNR |G|^2/tr(Sigma_B), the gradient "
                 "noise scale B_simple = B tr(Sigma_B)/|G|^2 (McCandlish et al. 2018) and the relative update "
                 "size lr |g|/|w|; the per-sample gradient variance tr(Sigma_1) over all n samples (closed form for "
                 "Linear/Conv2d/BatchNorm, vmap(grad) otherwise); and at "
                 "initialisation the activation variance and gradient norm per residual block vs depth, averaged "
                 "over seeds."),
))
