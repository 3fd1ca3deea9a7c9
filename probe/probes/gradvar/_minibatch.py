"""Mini-batch gradient statistics: |G|, tr(Sigma_B), SNR, B_simple, relative update size."""
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad

from probe.checks import check_int
from probe.errors import UserError
from probe.functional import OutputSelector
from probe.probes.registry import Progress
from probe.probes.gradvar._common import (LossFn, _Fwd, _check_data, _norm64, _progress, bn_mode,
                                          cross_entropy_per_sample)


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
    ranks: int = 0              # ranks the batches were shared out over (0: computed whole here)


def _layer_moments_init(params: dict[str, Tensor]):
    return ({n: None for n in params},                     # shift per layer (float64)
            {n: torch.zeros(p.numel(), dtype=torch.float64, device=p.device) for n, p in params.items()},
            {n: torch.zeros((), dtype=torch.float64, device=p.device)   # sum of squared shifted norms,
             for n, p in params.items()})                                # on the device until the end


def _host(values: dict[str, Tensor], names) -> dict[str, float]:
    """0-d device tensors as floats, read in one transfer."""
    if not names:
        return {}
    return dict(zip(names, torch.stack([values[n].to(torch.float64).cpu() for n in names]).tolist()))


def _merged_moments(ddp, used: int, names, shift: dict, s1: dict, s2: dict):
    """Every rank's shifted sums per layer merged over the ranks (:mod:`probe.runtime.moments`):
    ``(used, {name: mean (float64)}, {name: sum of squared deviations})`` of all ranks' values."""
    from probe.runtime.moments import all_reduce_moments, from_shifted

    host = _host(s2, names)
    parts = [from_shifted(used, shift[n] if shift[n] is not None else torch.zeros_like(s1[n]), s1[n], host[n])
             for n in names]
    total, means, m2 = all_reduce_moments(ddp, used, [p[1] for p in parts], [p[2] for p in parts])
    return total, dict(zip(names, means)), dict(zip(names, m2))


def minibatch_gradient_stats(model: nn.Module, x: Tensor, y: Tensor, *, batches: int = 8, batch_size: int = 32,
                             seed: int = 0, loss: LossFn | None = None, dtype: str | torch.dtype | None = None,
                             device: torch.device | str | None = None, bn: str = "eval",
                             output: OutputSelector = None, progress: Progress | None = None) -> MinibatchStats:
    """Gradients of ``K = batches`` mini-batch losses (mean of ``loss`` over ``batch_size`` samples
    drawn without replacement, :func:`minibatch_indices`) and their per-layer moments.

    Streaming, in float64 around the first finite batch (memory ~3 P): for each layer with
    ``d_k = g_k - g_1``: ``G = g_1 + mean_k d_k`` and
    ``tr(Sigma_B) = (sum_k |d_k|^2 - K |mean_k d_k|^2) / (K - 1)``. A batch with any non-finite
    gradient entry is left out (and counted, per layer and in total). The sums stay on the device
    (one read per batch: whether its gradients are finite).

    Under ``torchrun`` each rank takes a contiguous share of the ``K`` batches (the same draw on
    every rank) and the ranks' moments are merged exactly (:func:`probe.runtime.moments.all_reduce_moments`),
    equal to one process up to float64 rounding.
    """
    from probe.runtime.dist import current

    x, y = _check_data(x, y)
    loss = loss or cross_entropy_per_sample
    idx = minibatch_indices(x.shape[0], batches, batch_size, seed)          # (K, B)
    ddp = current()
    sharded = ddp.active and batches >= ddp.world
    mine = range(batches)[ddp.shard(batches)] if sharded else range(batches)
    with bn_mode(model, bn) as skip:
        fwd = _Fwd(model, dtype, device, skip, output)
        params = fwd.params
        names = list(params)

        def batch_loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
            return loss(fwd(p, xb), yb).mean()

        g_fn = grad(batch_loss)
        shift, s1, s2 = _layer_moments_init(params)
        sq = {n: torch.zeros((), dtype=torch.float64, device=params[n].device) for n in names}
        bad = {n: 0 for n in names}
        used = nonfinite = 0
        for i, k in enumerate(mine):
            xb, yb = fwd.prepare(x[idx[k]]), fwd.prepare(y[idx[k]])
            g = g_fn(params, xb, yb)                                          # name -> shape of param
            finite = dict(zip(names, torch.stack([torch.isfinite(g[n]).all() for n in names]).tolist())) \
                if names else {}                                              # one read per batch
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
                    s2[n] += d @ d
                    sq[n] += gk @ gk
            _progress(progress, "gradvar: mini-batch gradients", i + 1, len(mine))
        wn = np.array([_norm64(params[n]) for n in names], dtype=np.float64)
    gn, tc, rms = (np.full(len(names), np.nan) for _ in range(3))
    if sharded:   # every rank's moments merged; the counts and sums of squares added
        counts = ddp.all_reduce_(torch.tensor([float(nonfinite)] + [float(bad[n]) for n in names]
                                              + list(_host(sq, names).values()), dtype=torch.float64,
                                              device=s1[names[0]].device if names else None)).tolist()
        nonfinite, bad = int(counts[0]), {n: int(c) for n, c in zip(names, counts[1:1 + len(names)])}
        sqh = dict(zip(names, counts[1 + len(names):]))
        used, mean, m2 = _merged_moments(ddp, used, names, shift, s1, s2)
        for j, n in enumerate(names):
            if used >= 1:
                gn[j] = _norm64(mean[n])
                rms[j] = math.sqrt(sqh[n] / used)
            if used >= 2:
                tc[j] = m2[n] / (used - 1)
    else:
        s2h, sqh = _host(s2, names), _host(sq, names)
        for j, n in enumerate(names):
            if used >= 1:
                mean_d = s1[n] / used
                gn[j] = _norm64(shift[n] + mean_d)
                rms[j] = math.sqrt(sqh[n] / used)
            if used >= 2:
                tc[j] = max((s2h[n] - used * float(mean_d @ mean_d)) / (used - 1), 0.0)
    return MinibatchStats(names=tuple(names), numel=np.array([params[n].numel() for n in names], dtype=np.int64),
                          grad_norm=gn, trace_cov=tc, batch_grad_rms=rms, weight_norm=wn,
                          nonfinite=np.array([bad[n] for n in names], dtype=np.int64), batches_used=used,
                          nonfinite_batches=nonfinite, indices=idx.numpy().astype(np.int64),
                          ranks=ddp.world if sharded else 0)
