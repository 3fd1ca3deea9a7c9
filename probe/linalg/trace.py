"""Stochastic trace estimators for any :class:`probe.linalg.SymmetricOperator`.

Each estimator sees ``size``, ``dtype``, ``device`` and ``matmat`` only, states its cost in
products ("matvecs", one per vector), draws its random vectors from a ``torch.Generator`` seeded
by ``seed`` (:func:`probe.linalg.sampling.draw_vectors`: on the CPU, or on a CUDA operator's
device), and accumulates inner products in float64. The per-vector values stay on the operator's
device until the last block (one transfer to the host per estimate, not one per block).

* :func:`hutchinson_trace` -- Hutchinson (1989): tr(A) ~ mean_i z_i^T A z_i.
* :func:`hutchpp_trace` -- Hutch++ (Meyer, Musco, Musco & Woodruff 2021): the trace of a
  low-rank sketch exactly, Hutchinson on the deflated rest; error O(1/m) instead of O(1/sqrt(m))
  for spectra that decay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from probe.linalg._accumulate import coldot64, coldot64_t, dot64
from probe.linalg.operator import SymmetricOperator
from probe.linalg.sampling import draw_vectors, standard_error, vector_generator

__all__ = ["TraceEstimate", "hutchinson_trace", "hutchpp_trace"]


def _apply(op: SymmetricOperator, V: Tensor, block: int) -> Tensor:
    """A V for V (size, c) in op's dtype/device, in calls of at most ``block`` columns."""
    if V.shape[1] <= block:
        return op.matmat(V)
    return torch.cat([op.matmat(V[:, lo:lo + block]) for lo in range(0, V.shape[1], block)], dim=1)


def _orthonormal_columns(W: Tensor, rtol: float) -> Tensor:
    """An orthonormal basis (n, r) of the columns of W (n, c), in W's dtype, by SVQB twice
    (eigen-decomposition of the float64 Gram matrix; Stathopoulos & Wu 2002); directions with
    singular value at most ``rtol`` times the largest are dropped (r <= c)."""
    for cut in (rtol, 0.5):
        if W.shape[1] == 0:
            return W
        lam, V = torch.linalg.eigh(dot64(W.T, W.T))                  # (c,), (c, c) float64
        top = float(lam.max()) if lam.numel() else 0.0
        keep = lam > max(top, 0.0) * cut ** 2 if top > 0 else torch.zeros_like(lam, dtype=torch.bool)
        X = V[:, keep] / lam[keep].sqrt()                             # (c, r)
        W = W @ X.to(device=W.device, dtype=W.dtype)
    return W


@dataclass(frozen=True, eq=False)
class TraceEstimate:
    """A stochastic trace estimate.

    ``estimate`` the trace estimate; ``stderr`` the standard error of its stochastic part (the
    sample standard deviation of the per-vector values over sqrt of their number; nan with one
    vector); ``n_matvecs`` products used; ``method`` ``"hutchinson"`` or ``"hutch++"``;
    ``samples`` the per-vector values z^T A z of the stochastic part (float64); ``exact_part``
    tr(Q^T A Q) of Hutch++'s sketch (0.0 for Hutchinson); ``rank`` the sketch's rank.
    """

    estimate: float
    stderr: float
    n_matvecs: int
    method: str
    samples: np.ndarray
    exact_part: float = 0.0
    rank: int = 0

    def summary(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "stderr": self.stderr, "n_matvecs": self.n_matvecs,
                "method": self.method, "exact_part": self.exact_part, "rank": self.rank}


def hutchinson_trace(op: SymmetricOperator, n_matvecs: int, *, block: int | None = None, seed: int = 0,
                     dist: str = "rademacher") -> TraceEstimate:
    """Hutchinson's estimate tr(A) ~ (1/m) sum_i z_i^T A z_i with m = ``n_matvecs`` random vectors.

    ``dist``: ``"rademacher"`` (entries +-1, variance 2 (||A||_F^2 - sum_i A_ii^2) / m, the
    smallest among i.i.d. distributions) or ``"gaussian"`` (variance 2 ||A||_F^2 / m). Unbiased
    for every symmetric A. ``block`` vectors per ``matmat`` call (default min(m, 10)). Cost:
    exactly m products; memory ~3 blocks of vectors.
    """
    m = int(n_matvecs)
    if m < 1:
        raise ValueError(f"n_matvecs must be a positive integer, got {n_matvecs!r}")
    block = max(1, int(block) if block else min(m, 10))
    gen = vector_generator(seed, op.device)
    vals = []
    for lo in range(0, m, block):
        Z = draw_vectors((op.size, min(block, m - lo)), gen, dist, dtype=op.dtype, device=op.device)
        vals.append(coldot64_t(Z, op.matmat(Z)))
    v = torch.cat(vals).cpu().numpy()
    return TraceEstimate(estimate=float(v.mean()), stderr=standard_error(v), n_matvecs=m, method="hutchinson",
                         samples=v)


def hutchpp_trace(op: SymmetricOperator, n_matvecs: int, *, block: int | None = None,
                  seed: int = 0) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021, Algorithm 1) with a budget of m = ``n_matvecs`` products.

    s = m // 3 Rademacher sketch vectors S; Q (size, r), r <= s, an orthonormal basis of A S;
    then tr(A) ~ tr(Q^T A Q) + (1/h) sum_i g_i^T (I - Q Q^T) A (I - Q Q^T) g_i with the remaining
    h = m - s - r Rademacher vectors g_i (h >= s; r < s when A S is rank deficient, and the
    unused products go to the Hutchinson part). For PSD A, m = O(sqrt(log(1/delta)) / eps +
    log(1/delta)) products give relative error eps with probability 1 - delta (Hutchinson needs
    O(log(1/delta) / eps^2)). ``stderr`` is that of the Hutchinson part (the sketch part is exact
    given Q). Cost: exactly m products; memory ~(2 s + block) vectors in the operator's dtype.
    """
    m = int(n_matvecs)
    if m < 3:
        raise ValueError(f"Hutch++ needs a budget of at least 3 products, got {n_matvecs!r}")
    block = max(1, int(block) if block else min(m // 3, 10))
    dtype, device = op.dtype, op.device
    gen = vector_generator(seed, device)
    s = m // 3
    S = draw_vectors((op.size, s), gen, "rademacher", dtype=dtype, device=device)
    rtol = 1e3 * torch.finfo(dtype).eps
    Q = _orthonormal_columns(_apply(op, S, block), rtol)                 # (size, r)
    del S
    r = Q.shape[1]
    exact = float(coldot64(Q, _apply(op, Q, block)).sum()) if r else 0.0
    h = m - s - r
    vals = []
    for lo in range(0, h, block):
        G = draw_vectors((op.size, min(block, h - lo)), gen, "rademacher", dtype=dtype, device=device)
        if r:                                                             # G - Q (Q^T G), twice
            for _ in range(2):
                G = G - Q @ dot64(Q.T, G.T).to(dtype)
        vals.append(coldot64_t(G, op.matmat(G)))
    v = torch.cat(vals).cpu().numpy() if vals else np.zeros(0)
    rest = float(v.mean()) if v.size else 0.0
    return TraceEstimate(estimate=exact + rest, stderr=standard_error(v) if v.size else 0.0, n_matvecs=s + r + h,
                         method="hutch++", samples=v, exact_part=exact, rank=r)
