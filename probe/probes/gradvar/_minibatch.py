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


def _layer_moments_init(params: dict[str, Tensor]):
    return ({n: None for n in params},                     # shift per layer (float64)
            {n: torch.zeros(p.numel(), dtype=torch.float64, device=p.device) for n, p in params.items()},
            {n: 0.0 for n in params})                      # sum of squared shifted norms


def minibatch_gradient_stats(model: nn.Module, x: Tensor, y: Tensor, *, batches: int = 8, batch_size: int = 32,
                             seed: int = 0, loss: LossFn | None = None, dtype: str | torch.dtype | None = None,
                             device: torch.device | str | None = None, bn: str = "eval",
                             output: OutputSelector = None, progress: Progress | None = None) -> MinibatchStats:
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
        fwd = _Fwd(model, dtype, device, skip, output)
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
