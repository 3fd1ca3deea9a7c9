"""The block Lanczos method for the top-k eigenpairs of a symmetric operator.

One solver for every operator of the toolkit (:class:`~probe.linalg.operator.SymmetricOperator`):
block Krylov space, full reorthogonalisation, inner products and norms accumulated in float64,
SVQB orthonormalisation, and a convergence test on the Ritz residuals relative to the largest
eigenvalue seen. Nothing but the operator's vectors is of the operator's size, so it serves both
spaces of short vectors (samples) and of very long ones (millions of parameters, kept in the
model's float32).

    >>> res = block_lanczos(DenseOperator(A), k=5, block_size=2)
    >>> res.eigenvalues          # (5,) float64, descending
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from probe.linalg._accumulate import dot64
from probe.linalg.operator import SymmetricOperator
from probe.linalg.sampling import draw_vectors, vector_generator

__all__ = ["BlockLanczosResult", "block_lanczos", "unresolved_note", "multiplicity_note"]


@dataclass(frozen=True, eq=False)
class BlockLanczosResult:
    """Top-k Ritz pairs of a symmetric operator (see :func:`block_lanczos`).

    ``eigenvalues`` (k,) float64, descending; ``vectors`` (size, k) orthonormal Ritz vectors in the
    operator's dtype and device (None unless asked for); ``residuals`` (k,) the Ritz residual norms
    ||A y - theta y|| (the eigenvalue error is at most the residual, and about residual^2 / gap for
    a separated eigenvalue); ``scale`` the largest |Ritz value| seen, the reference of ``tol``;
    ``dim`` the Krylov dimension reached; ``n_matvecs`` the operator applied to that many vectors
    in ``n_blocks`` calls of ``matmat``; ``notes`` says which of the top k are not resolved.
    """

    eigenvalues: np.ndarray
    residuals: np.ndarray
    vectors: Tensor | None
    converged: bool
    dim: int
    n_matvecs: int
    n_blocks: int
    block_size: int
    tol: float
    scale: float
    notes: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """JSON-able metadata and the eigenvalues."""
        ev = self.eigenvalues
        return {"k": int(ev.size), "eigenvalues": ev.tolist(), "converged": self.converged,
                "dim": self.dim, "n_matvecs": self.n_matvecs, "n_blocks": self.n_blocks,
                "block_size": self.block_size, "tol": self.tol, "scale": self.scale,
                "max_residual": float(self.residuals.max()) if self.residuals.size else 0.0,
                "notes": list(self.notes)}


def unresolved_note(theta: np.ndarray, res: np.ndarray, tol: float) -> list[str]:
    """Convergence is relative to theta_max; a Ritz value is within its residual of an eigenvalue,
    so those with residual above 1% of their own value are not resolved (a spectrum spread over
    more orders of magnitude than 1/tol)."""
    weak = np.flatnonzero(res > 1e-2 * np.abs(theta))
    if not weak.size:
        return []
    return [f"{weak.size} of the top {theta.size} eigenvalues (from #{int(weak[0]) + 1}, below "
            f"{float(np.abs(theta[weak[0]])):.3g}) are not resolved: their residuals exceed 1% of "
            f"their value (tol={tol:g} is relative to lambda_max={float(theta[0]):.3g}); lower tol or "
            f"use float64 for them"]


def multiplicity_note(theta: np.ndarray, block_size: int, scale: float, rtol: float = 1e-6) -> list[str]:
    """A block of s vectors finds at most s copies of a repeated eigenvalue: a cluster of s or more
    equal Ritz values (within ``rtol`` of their size, or of ``scale`` * 1e-12) may hide further
    copies, and everything below it in the top k may then be wrong. With s = 1 nothing shows a
    repeated eigenvalue, so no note is possible."""
    s = int(block_size)
    if s < 2 or theta.size < s:
        return []
    out, i = [], 0
    while i < theta.size:
        j = i
        while j + 1 < theta.size and abs(theta[j + 1] - theta[i]) <= rtol * max(abs(theta[i]),
                                                                                 1e-12 * scale):
            j += 1
        if j - i + 1 >= s:
            out.append(f"eigenvalue {float(theta[i]):.6g} appears {j - i + 1} times among the top "
                       f"{theta.size} (#{i + 1} to #{j + 1}), at least the block size {s}: its "
                       f"multiplicity may be larger, and copies may be missing from the top "
                       f"{theta.size}; rerun with a block size above {j - i + 1}")
        i = j + 1
    return out


def block_lanczos(op: SymmetricOperator, k: int, *, block_size: int = 1, max_dim: int | None = None,
                  tol: float | None = None, seed: int = 0, return_vectors: bool = False,
                  progress: Callable[[int], None] | None = None) -> BlockLanczosResult:
    """Top-k eigenpairs (largest algebraic) of the symmetric operator ``op`` by block Lanczos.

    The Krylov basis Q (dim x size: the basis vectors are its rows, in ``op.dtype``) grows by
    blocks of s = ``block_size`` vectors. The solver keeps Q and the exact projection
    T = Q^T A Q (float64, dim x dim), filled one block column at a time as A Q_j arrives, but not
    A Q itself: every earlier A Q_i lies in span(Q) (its remainder became the next block), so
    A Q = Q T + W E^T with W the last block's remainder, orthogonalised against Q twice ("twice
    is enough", Giraud et al. 2005), and a Ritz pair (theta, Q^T y) has residual
    ||A Q^T y - theta Q^T y|| = ||W^T y_last|| exactly. New blocks are orthonormalised by SVQB
    (the eigendecomposition of their float64 Gram matrix, Stathopoulos & Wu 2002): unlike a
    float32 Householder QR over millions of elements, orthonormal to the storage precision.

    A block of s vectors resolves eigenvalues of multiplicity up to s (plain Lanczos, s = 1, sees
    each eigenvalue once); when s >= 2 equal Ritz values cluster s or more at a time, a note
    (:func:`multiplicity_note`) says that copies may be missing. Directions that vanish (an invariant subspace was found) are replaced
    by random ones orthogonal to Q; T stays exact. Convergence: every top-k residual
    <= ``tol`` * theta_max (default 1e-8 in float64, 1e-5 in lower precision, where the
    operator's own rounding puts a floor under the residuals), or the basis spans the space.
    The residuals alone decide: past the operator's rank the Krylov space is spanned in exact
    arithmetic, but in float32 its small-eigenvalue directions are lost to rounding, so a full
    dimension short of ``size`` proves nothing. ``max_dim`` caps the Krylov dimension (default
    max(10k, 100), at most ``size``); when it is reached first, ``converged`` is False.

    ``seed`` fixes the random start block (and any replacement directions; drawn on the device
    for a CUDA operator, :func:`probe.linalg.sampling.draw_vectors`). ``progress(b)`` is
    called after each product with the b vectors it covered. With ``return_vectors`` the Ritz
    vectors (size, k) come back in ``op.dtype``. Memory: the basis, max_dim x size in
    ``op.dtype``, is allocated up front, plus about 4 s vectors of work.
    """
    size, dtype, device = int(op.size), op.dtype, torch.device(op.device)
    k, s = int(k), int(block_size)
    if not 1 <= k <= size:
        raise ValueError(f"k must be between 1 and the operator's size {size}, got {k}")
    if s < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    s = min(s, size)
    if tol is None:
        tol = 1e-8 if dtype == torch.float64 else 1e-5
    max_dim = min(int(max_dim) if max_dim is not None else max(10 * k, 100), size)
    if max_dim < k:
        raise ValueError(f"max_dim={max_dim} is smaller than k={k}")
    gen = vector_generator(seed, device)
    counts = {"vectors": 0, "blocks": 0}

    def apply(Q: Tensor) -> Tensor:                              # rows (bs, size) -> A Q as rows
        W = op.matmat(Q.T)                                       # (size, bs)
        if tuple(W.shape) != (size, Q.shape[0]):
            raise ValueError(f"operator returned shape {tuple(W.shape)} for a block of shape "
                             f"{(size, Q.shape[0])}")
        counts["vectors"] += Q.shape[0]
        counts["blocks"] += 1
        if progress is not None:
            progress(Q.shape[0])
        return W.T.to(device=device, dtype=dtype).contiguous()   # (bs, size), a copy only if needed

    def orth(W: Tensor, B: Tensor) -> Tensor:                    # in place, twice
        for _ in range(2):
            if B.shape[0]:
                W.addmm_(dot64(W, B).to(W.dtype), B, alpha=-1)
        return W

    def svqb(W: Tensor, floor: float) -> Tensor:
        """Orthonormal rows spanning W's rows (those above ``floor`` in singular value)."""
        lam, V = torch.linalg.eigh(dot64(W, W))
        keep = lam > floor ** 2
        X = V[:, keep] / lam[keep].sqrt()                        # (bs, r) float64
        return X.T.to(W.dtype) @ W

    def orthonormal_rows(W: Tensor, B: Tensor, gram: np.ndarray | None = None) -> Tensor:
        """``gram``: W W^T (float64, on the host) when the caller has it already."""
        if gram is None:
            gram = dot64(W, W).cpu().numpy() if W.numel() else np.zeros((0, 0))
        ref = float(np.sqrt(np.diagonal(gram).max())) if gram.size else 0.0
        want = W.shape[0]
        Q = svqb(orth(W, B), 1e-6 * max(ref, 1e-300))
        while Q.shape[0] < want:                     # invariant subspace found: random directions
            fresh = draw_vectors((want - Q.shape[0], size), gen, "gaussian", dtype=dtype, device=device)
            fresh = orth(orth(fresh, B), Q)
            Q = torch.cat([Q, svqb(fresh, 1e-3)])
        return svqb(orth(Q, B), 0.5)                 # twice is enough

    basis = torch.empty((max_dim, size), dtype=dtype, device=device)
    T = np.zeros((max_dim, max_dim))
    start = draw_vectors((s, size), gen, "gaussian", dtype=dtype, device=device)
    Q = orthonormal_rows(start, basis[:0])
    del start
    dim, scale = 0, 0.0
    while True:
        bs = Q.shape[0]
        basis[dim:dim + bs] = Q
        del Q
        W = apply(basis[dim:dim + bs])                                    # A Q_j, (bs, size)
        dim += bs
        B = basis[:dim]
        C = dot64(B, W)                                                   # (dim, bs) float64
        T[:dim, dim - bs:dim] = C.cpu().numpy()
        T[dim - bs:dim, :dim] = T[:dim, dim - bs:dim].T
        Tt = T[:dim, :dim]
        evals, S = np.linalg.eigh(0.5 * (Tt + Tt.T))
        order = np.argsort(evals)[::-1][:k]
        theta, Sk = evals[order], S[:, order]
        scale = max(scale, float(np.abs(evals).max()), 1e-300)
        W.addmm_(C.T.to(W.dtype), B, alpha=-1)                            # remainder of A Q_j
        orth(W, B)
        G = dot64(W, W).cpu().numpy()
        last = Sk[dim - bs:dim]                                           # (bs, k)
        res = np.sqrt(np.maximum(np.einsum("ik,ij,jk->k", last, G, last), 0.0))
        converged = dim >= size or (dim >= k and bool((res <= tol * scale).all()))
        step = min(s, size - dim, max_dim - dim)
        if converged or step <= 0:
            break
        Q = orthonormal_rows(W[:step], B) if step < bs else orthonormal_rows(W, B, G)
        del W
    del W
    vectors = None
    if return_vectors:                                       # Q^T y: (k, size) rows, returned as columns
        vectors = (torch.as_tensor(Sk.T, dtype=dtype, device=device) @ B).T
    del B, basis
    return BlockLanczosResult(eigenvalues=theta, residuals=res, vectors=vectors, converged=bool(converged),
                              dim=dim, n_matvecs=counts["vectors"], n_blocks=counts["blocks"],
                              block_size=s, tol=float(tol), scale=scale,
                              notes=tuple(unresolved_note(theta, res, tol)
                                          + multiplicity_note(theta, s, scale)))
