"""Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019): the
spectral density of any :class:`probe.linalg.SymmetricOperator` from a few short Lanczos runs.

The estimator sees ``size``, ``dtype``, ``device`` and ``matmat`` only, states its cost in
products ("matvecs", one per vector), draws its start vectors from a ``torch.Generator`` seeded
by ``seed`` (:func:`probe.linalg.sampling.draw_vectors`: on the CPU, or on a CUDA operator's
device), and accumulates inner products in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from probe.linalg._accumulate import dot64
from probe.linalg.operator import SymmetricOperator
from probe.linalg.sampling import draw_vectors, standard_error, vector_generator

__all__ = ["DensityEstimate", "slq_density"]


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
    The runs' alpha and beta of a step come to the host together, one transfer per step.
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
        ws, ab = [], []   # per run: its new direction (in its next basis row), (alpha, beta) on the device
        for col, j in enumerate(active):
            w = basis[j, i + 1:i + 2] if i + 1 < n_steps else torch.empty((1, size), dtype=op.dtype,
                                                                          device=op.device)
            w.copy_(W[:, col])                                                # (1, size)
            Qj = basis[j, :i + 1]                                             # (i+1, size)
            alpha = dot64(w, Qj[i:i + 1])[0, 0]
            for _ in range(2):                                                # full reorth
                w.addmm_(dot64(w, Qj).to(w.dtype), Qj, alpha=-1)
            ws.append(w)
            ab.append(torch.stack([alpha, torch.linalg.vector_norm(w, dtype=torch.float64)]))
        del W
        host = torch.stack(ab).cpu().tolist()                  # one transfer per step for every run
        still = []
        for (alpha, beta), w, j in zip(host, ws, active):
            alphas[j].append(alpha)
            scale[j] = max(scale[j], abs(alpha), beta)
            if i + 1 < n_steps and beta > 100 * eps * max(scale[j], 1e-300):
                betas[j].append(beta)
                w.div_(beta)                                                  # basis[j, i + 1]
                still.append(j)
        del ws
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
    gen = vector_generator(seed, op.device)
    rows_n, rows_w, steps, matvecs = [], [], [], 0
    for lo in range(0, n_probes, block):
        c = min(block, n_probes - lo)
        V0 = draw_vectors((op.size, c), gen, "rademacher", dtype=op.dtype, device=op.device,
                          scale=math.sqrt(op.size))
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
                           trace=float(per_probe.mean()), trace_stderr=standard_error(per_probe), n_matvecs=matvecs)
