"""Inner products and norms accumulated in float64, for vectors stored in any precision."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["norm64", "dot64", "coldot64", "coldot64_t"]


def norm64(t: Tensor, dim: int | None = None, chunk: int = 1 << 20) -> Tensor:
    """Euclidean norm accumulated in float64: a float32 norm squares its entries in float32 and
    overflows to inf beyond ~1.8e19 (Krylov vectors of a multiplicative network reach 1e25).
    Over all elements (``dim`` None) it goes by chunks of ``chunk`` elements, so that a tensor of
    hundreds of millions of float32 entries is not first copied to float64 whole."""
    if dim is not None or t.numel() <= chunk or t.dtype == torch.float64:
        return torch.linalg.vector_norm(t, dim=dim, dtype=torch.float64)
    flat = t.reshape(-1)
    parts = torch.stack([torch.linalg.vector_norm(flat[i:i + chunk], dtype=torch.float64)
                         for i in range(0, flat.numel(), chunk)])
    return torch.linalg.vector_norm(parts)


def dot64(A: Tensor, B: Tensor, chunk: int = 1 << 16) -> Tensor:
    """A @ B^T (rows of A (m, n) against rows of B (p, n), -> (m, p) float64) accumulated in float64
    over column chunks: inner products over millions of float32 elements would otherwise carry
    ~1e-5 relative error."""
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return A @ B.T
    out = torch.zeros((A.shape[0], B.shape[0]), dtype=torch.float64, device=A.device)
    for c0 in range(0, A.shape[1], chunk):
        out += A[:, c0:c0 + chunk].double() @ B[:, c0:c0 + chunk].double().T
    return out


def coldot64_t(A: Tensor, B: Tensor, chunk: int = 1 << 16) -> Tensor:
    """Per-column inner products of A and B (n, c) accumulated in float64 over chunks of ``chunk``
    rows: (c,) float64 on A's device (no transfer to the host: a loop collects these and converts
    them once)."""
    out = torch.zeros(A.shape[1], dtype=torch.float64, device=A.device)
    for lo in range(0, A.shape[0], chunk):
        out += (A[lo:lo + chunk].double() * B[lo:lo + chunk].double()).sum(0)
    return out


def coldot64(A: Tensor, B: Tensor, chunk: int = 1 << 16) -> np.ndarray:
    """:func:`coldot64_t` as (c,) float64 numpy."""
    return coldot64_t(A, B, chunk).cpu().numpy()
