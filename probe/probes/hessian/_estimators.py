"""Spectral estimators for any :class:`probe.linalg.SymmetricOperator`: trace, density, extremes.

Nothing here knows what the operator is (a Hessian, a GGN, a dense test matrix): each estimator
sees ``size``, ``dtype``, ``device`` and ``matmat`` only, states its cost in products
("matvecs", one per vector), draws its random vectors from a ``torch.Generator`` seeded by
``seed`` (on the CPU, in float64, then cast to the operator's dtype and device, so results do not
depend on the device's random stream), and accumulates inner products in float64.

* :func:`hutchinson_trace` -- Hutchinson (1989): tr(A) ~ mean_i z_i^T A z_i.
* :func:`hutchpp_trace` -- Hutch++ (Meyer, Musco, Musco & Woodruff 2021): the trace of a
  low-rank sketch exactly, Hutchinson on the deflated rest; error O(1/m) instead of O(1/sqrt(m))
  for spectra that decay.
* :func:`slq_density` -- stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani,
  Krishnan & Xiao 2019): the spectral density from a few short Lanczos runs.
* :func:`extreme_eigenpairs` -- the k largest or smallest algebraic eigenpairs by
  :func:`probe.linalg.block_lanczos` (the smallest as the largest of -A).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from probe.linalg import (BlockLanczosResult, CallableOperator, SymmetricOperator, block_lanczos, dot64,
                          multiplicity_note)

__all__ = ["TraceEstimate", "DensityEstimate", "hutchinson_trace", "hutchpp_trace", "slq_density",
           "extreme_eigenpairs"]

_ROWS = 1 << 16          # rows per chunk of the float64 column inner products


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _coldots(A: Tensor, B: Tensor) -> np.ndarray:
    """Per-column inner products of A and B (n, c) accumulated in float64: (c,)."""
    out = torch.zeros(A.shape[1], dtype=torch.float64, device=A.device)
    for lo in range(0, A.shape[0], _ROWS):
        out += (A[lo:lo + _ROWS].double() * B[lo:lo + _ROWS].double()).sum(0)
    return out.cpu().numpy()


def _random(size: int, c: int, gen: torch.Generator, dist: str) -> Tensor:
    """(size, c) float64 probe vectors on the CPU: Rademacher (+-1) or standard Gaussian."""
    if dist == "rademacher":
        return torch.randint(0, 2, (size, c), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    if dist == "gaussian":
        return torch.randn((size, c), generator=gen, dtype=torch.float64)
    raise ValueError(f"unknown probe distribution {dist!r}; choose 'rademacher' or 'gaussian'")


def _apply(op: SymmetricOperator, V: Tensor, block: int) -> Tensor:
    """A V for V (size, c) in op's dtype/device, in calls of at most ``block`` columns."""
    if V.shape[1] <= block:
        return op.matmat(V)
    return torch.cat([op.matmat(V[:, lo:lo + block]) for lo in range(0, V.shape[1], block)], dim=1)


def _stderr(vals: np.ndarray) -> float:
    """Sample standard deviation / sqrt(m); nan for a single sample."""
    return float(np.std(vals, ddof=1) / math.sqrt(vals.size)) if vals.size > 1 else float("nan")


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


# --------------------------------------------------------------------------------------------
# Trace
# --------------------------------------------------------------------------------------------


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
    gen = torch.Generator().manual_seed(int(seed))
    vals = []
    for lo in range(0, m, block):
        Z = _random(op.size, min(block, m - lo), gen, dist).to(device=op.device, dtype=op.dtype)
        vals.append(_coldots(Z, op.matmat(Z)))
    v = np.concatenate(vals)
    return TraceEstimate(estimate=float(v.mean()), stderr=_stderr(v), n_matvecs=m, method="hutchinson",
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
    gen = torch.Generator().manual_seed(int(seed))
    s = m // 3
    dtype, device = op.dtype, op.device
    S = _random(op.size, s, gen, "rademacher").to(device=device, dtype=dtype)
    rtol = 1e3 * torch.finfo(dtype).eps
    Q = _orthonormal_columns(_apply(op, S, block), rtol)                 # (size, r)
    del S
    r = Q.shape[1]
    exact = float(_coldots(Q, _apply(op, Q, block)).sum()) if r else 0.0
    h = m - s - r
    vals = []
    for lo in range(0, h, block):
        G = _random(op.size, min(block, h - lo), gen, "rademacher").to(device=device, dtype=dtype)
        if r:                                                             # G - Q (Q^T G), twice
            for _ in range(2):
                G = G - Q @ dot64(Q.T, G.T).to(dtype)
        vals.append(_coldots(G, op.matmat(G)))
    v = np.concatenate(vals) if vals else np.zeros(0)
    rest = float(v.mean()) if v.size else 0.0
    return TraceEstimate(estimate=exact + rest, stderr=_stderr(v) if v.size else 0.0, n_matvecs=s + r + h,
                         method="hutch++", samples=v, exact_part=exact, rank=r)


# --------------------------------------------------------------------------------------------
# Density
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DensityEstimate:
    """The spectral density of a symmetric operator by stochastic Lanczos quadrature.

    ``grid`` (G,) and ``density`` (G,) float64: the Gaussian-broadened density, normalised so that
    ``np.trapezoid(density, grid) == 1``; ``nodes`` and ``weights`` (n_probes, n_steps) float64:
    per probe the Ritz values and squared first components of T's eigenvectors (each row's
    weights sum to 1); a probe whose Lanczos run ended early (an invariant Krylov space, the
    quadrature then exact) has ``steps[i]`` < n_steps and its row padded with nodes 0 and weights
    0. ``sigma`` the broadening; ``trace`` = size * mean_i sum_j w_ij theta_ij, the moment
    estimate of tr(A) (the same as Hutchinson's with the probes' start vectors), with
    ``trace_stderr`` over the probes; ``n_matvecs`` products used.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    steps: np.ndarray
    sigma: float
    trace: float
    trace_stderr: float
    n_matvecs: int

    def summary(self) -> dict[str, Any]:
        return {"n_probes": int(self.nodes.shape[0]), "n_steps": int(self.nodes.shape[1]),
                "sigma": self.sigma, "trace": self.trace, "trace_stderr": self.trace_stderr,
                "n_matvecs": self.n_matvecs, "grid": [float(self.grid[0]), float(self.grid[-1])]}


def _lanczos_quadrature(op: SymmetricOperator, V0: Tensor, n_steps: int,
                        progress: Callable[[int], None] | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Plain (s = 1) Lanczos from each column of V0 (size, c), unit columns, in lockstep (one
    ``matmat`` per step for all active runs), with full reorthogonalisation (twice, float64
    inner products); returns per run the diagonal alpha and off-diagonal beta of T (float64).
    A run stops early when its new direction vanishes (beta <= 100 eps ||T||): the Krylov space
    is invariant, and its Ritz values and weights are exact."""
    size, c = op.size, V0.shape[1]
    basis = torch.empty((c, n_steps, size), dtype=op.dtype, device=op.device)   # rows per run
    basis[:, 0] = V0.T
    alphas: list[list[float]] = [[] for _ in range(c)]
    betas: list[list[float]] = [[] for _ in range(c)]
    active = list(range(c))
    scale = [0.0] * c
    eps = torch.finfo(op.dtype).eps
    for i in range(n_steps):
        W = op.matmat(basis[active, i].T)                                     # (size, a)
        if progress is not None:
            progress(len(active))
        still = []
        for col, j in enumerate(active):
            w = W[:, col].to(op.dtype).clone()[None]                            # (1, size)
            Qj = basis[j, :i + 1]                                             # (i+1, size)
            alpha = float(dot64(w, Qj[i:i + 1])[0, 0])
            for _ in range(2):                                                # full reorth
                w.addmm_(dot64(w, Qj).to(w.dtype), Qj, alpha=-1)
            beta = float(torch.linalg.vector_norm(w, dtype=torch.float64))
            alphas[j].append(alpha)
            scale[j] = max(scale[j], abs(alpha), beta)
            if i + 1 < n_steps and beta > 100 * eps * max(scale[j], 1e-300):
                betas[j].append(beta)
                basis[j, i + 1] = (w / beta)[0]
                still.append(j)
        active = still
        if not active:
            break
    return [np.asarray(a) for a in alphas], [np.asarray(b) for b in betas]


def slq_density(op: SymmetricOperator, n_probes: int, n_steps: int, *, seed: int = 0,
                grid: int | np.ndarray = 1000, sigma: float | None = None, block: int | None = None,
                progress: Callable[[int], None] | None = None) -> DensityEstimate:
    """Spectral density phi(t) = (1/size) sum_i delta(t - lambda_i) of A, Gaussian-broadened, by
    stochastic Lanczos quadrature (Ubaru et al. 2017; Ghorbani et al. 2019).

    Per probe: a Rademacher start vector v = z / sqrt(size), ``n_steps`` steps of plain Lanczos
    with full reorthogonalisation, T = tridiag(beta, alpha, beta) (float64, n_steps x n_steps),
    nodes theta_j = eigenvalues of T and weights w_j = (first component of its j-th eigenvector)^2,
    so that v^T f(A) v ~ sum_j w_j f(theta_j), exact for polynomials of degree < 2 n_steps; and
    E[v^T f(A) v] = tr f(A) / size. The density is the mean over probes of
    sum_j w_j N(t; theta_j, sigma^2) on ``grid`` (an array of points, or the number of points of
    an even grid over [min theta - 5 sigma, max theta + 5 sigma]), normalised so that it
    integrates to 1 on that grid by the trapezoid rule. ``sigma`` defaults to 1% of the spread of
    the nodes (of their largest |theta| when all coincide). With ``n_steps`` >= the number of
    distinct eigenvalues the run ends early and the quadrature is exact: the nodes are those
    eigenvalues and, for Rademacher starts, the weights their multiplicities / size.

    ``block``: probes run in lockstep, one ``matmat`` of up to ``block`` vectors per step
    (default all). Cost: at most n_probes * n_steps products; memory: a basis of block * n_steps
    vectors in the operator's dtype. ``progress(b)`` after each product of b vectors.
    """
    n_probes, n_steps = int(n_probes), int(n_steps)
    if n_probes < 1 or n_steps < 1:
        raise ValueError(f"n_probes and n_steps must be positive, got {n_probes} and {n_steps}")
    n_steps = min(n_steps, op.size)
    block = max(1, int(block) if block else n_probes)
    gen = torch.Generator().manual_seed(int(seed))
    rows_n, rows_w, steps, matvecs = [], [], [], 0
    for lo in range(0, n_probes, block):
        c = min(block, n_probes - lo)
        V0 = (_random(op.size, c, gen, "rademacher") / math.sqrt(op.size)).to(device=op.device, dtype=op.dtype)
        alphas, betas = _lanczos_quadrature(op, V0, n_steps, progress)
        for a, b in zip(alphas, betas):
            matvecs += a.size
            T = np.diag(a) + np.diag(b[:a.size - 1], 1) + np.diag(b[:a.size - 1], -1)
            theta, U = np.linalg.eigh(T)
            nodes = np.zeros(n_steps)
            wts = np.zeros(n_steps)
            nodes[:a.size], wts[:a.size] = theta, U[0] ** 2
            rows_n.append(nodes)
            rows_w.append(wts)
            steps.append(a.size)
    nodes, weights, steps = np.stack(rows_n), np.stack(rows_w), np.asarray(steps)
    valid = np.arange(n_steps)[None, :] < steps[:, None]
    lo_t, hi_t = float(nodes[valid].min()), float(nodes[valid].max())
    if sigma is None:
        spread = hi_t - lo_t
        sigma = 0.01 * (spread if spread > 0 else max(abs(hi_t), abs(lo_t), 1e-12))
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    if np.isscalar(grid) or np.ndim(grid) == 0:
        g = int(grid)
        if g < 2:
            raise ValueError(f"the grid needs at least 2 points, got {grid!r}")
        grid = np.linspace(lo_t - 5 * sigma, hi_t + 5 * sigma, g)
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2 or not np.all(np.diff(grid) > 0):
        raise ValueError("grid must be an increasing 1-D array of at least 2 points")
    t, th, w = grid[:, None], nodes[valid][None, :], weights[valid][None, :]
    dens = (w * np.exp(-0.5 * ((t - th) / sigma) ** 2)).sum(1) / (sigma * math.sqrt(2 * math.pi) * n_probes)
    area = float(np.trapezoid(dens, grid))
    if area > 0:
        dens = dens / area
    per_probe = op.size * (weights * nodes).sum(1)
    return DensityEstimate(grid=grid, density=dens, nodes=nodes, weights=weights, steps=steps, sigma=sigma,
                           trace=float(per_probe.mean()), trace_stderr=_stderr(per_probe), n_matvecs=matvecs)


# --------------------------------------------------------------------------------------------
# Extreme eigenpairs
# --------------------------------------------------------------------------------------------


def extreme_eigenpairs(op: SymmetricOperator, k: int, which: str = "largest", **lanczos) -> BlockLanczosResult:
    """The k largest (descending) or smallest (ascending) algebraic eigenpairs of ``op`` by
    :func:`probe.linalg.block_lanczos` (keyword arguments passed on: ``block_size``,
    ``max_dim``, ``tol``, ``seed``, ``return_vectors``, ``progress``). The smallest are the
    largest of -A (a :class:`probe.linalg.CallableOperator`), negated back; residuals, ``tol``
    and ``scale`` are those of -A (the same numbers for A). Cost: the solver's ``n_matvecs``.
    """
    if which == "largest":
        return block_lanczos(op, k, **lanczos)
    if which != "smallest":
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    neg = CallableOperator(lambda V: -op.matmat(V), op.size, dtype=op.dtype, device=op.device)
    res = block_lanczos(neg, k, **lanczos)
    lam = -res.eigenvalues                                               # ascending
    notes = []
    weak = np.flatnonzero(res.residuals > 1e-2 * np.abs(lam))
    if weak.size:                     # the solver's note would speak of the negated operator
        notes.append(f"{weak.size} of the smallest {lam.size} eigenvalues (from #{int(weak[0]) + 1}, "
                     f"{float(lam[weak[0]]):.3g}) are not resolved: their residuals exceed 1% of their "
                     f"value (tol={res.tol:g} is relative to the largest |eigenvalue| seen, "
                     f"{res.scale:.3g}); lower tol or use float64 for them")
    notes += [n.replace("among the top", "among the smallest").replace("from the top", "from the smallest")
              for n in multiplicity_note(lam, res.block_size, res.scale)]
    return dataclasses.replace(res, eigenvalues=lam, notes=tuple(notes))
