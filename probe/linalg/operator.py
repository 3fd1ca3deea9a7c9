"""One interface for symmetric linear operators, and adapters for a dense matrix and a callable.

Every eigen-solver and trace estimator of :mod:`probe.linalg` sees an operator only through
:class:`SymmetricOperator`: its dimension ``size``, the ``dtype`` and ``device`` of the vectors it
acts on, and ``matmat(V)``, the product with a block of column vectors, (size, b) -> (size, b).
What the space is (samples, samples x outputs, parameters, ...) and how a product is computed
(matrix-free Jacobian products, per-layer closed forms, Hessian-vector products) stays behind it.

Conventions of ``matmat``:

* ``V`` is (size, b) with b >= 1, in ``dtype`` on ``device``. It may be a non-contiguous view
  (solvers keep long vectors as the rows of one basis array and hand over ``basis[i:j].T``), and
  it must not be modified.
* The result is a new (size, b) tensor in ``dtype`` on ``device``; the caller may overwrite it.
* The operator is symmetric: ``U.T @ matmat(V) == matmat(U).T @ V`` up to rounding. Solvers rely
  on it and do not check it.

``dtype`` is the precision the vectors are *stored* in (a parameter-space basis of millions of
elements in the model's float32, a sample-space one in float64); solvers accumulate inner
products and norms in float64 either way (:func:`probe.linalg.dot64`).
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["SymmetricOperator", "DenseOperator", "CallableOperator"]


@runtime_checkable
class SymmetricOperator(Protocol):
    """A symmetric linear map on R^size applied to blocks of column vectors (module docstring)."""

    size: int
    dtype: torch.dtype
    device: torch.device

    def matmat(self, V: Tensor) -> Tensor:
        """A V for V (size, b); returns (size, b) in ``dtype`` on ``device``."""
        ...


class DenseOperator:
    """A symmetric matrix A (n, n) held in memory: ``matmat(V) = A @ V``.

    ``A`` may be a tensor or an array; it is converted once to ``dtype`` (default: float64 for
    arrays, the tensor's own floating dtype otherwise) on ``device``. Symmetry is not enforced:
    pass (A + A^T) / 2 when A carries rounding asymmetry.
    """

    def __init__(self, A, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        A = torch.as_tensor(A)
        if dtype is None:
            dtype = A.dtype if A.is_floating_point() else torch.float64
        self.A = A.to(dtype=dtype, device=device)
        if self.A.dim() != 2 or self.A.shape[0] != self.A.shape[1]:
            raise ValueError(f"a dense operator needs a square (n, n) matrix, got shape "
                             f"{tuple(self.A.shape)}")
        self.size = int(self.A.shape[0])
        self.dtype = self.A.dtype
        self.device = self.A.device

    def matmat(self, V: Tensor) -> Tensor:
        return self.A @ V.to(dtype=self.dtype, device=self.device)           # (n, b)


class CallableOperator:
    """An operator given by a function ``fn(V) -> A V`` on (size, b) blocks (see the module
    docstring for the conventions ``fn`` must follow)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], size: int, *, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu"):
        if int(size) < 1:
            raise ValueError(f"operator size must be positive, got {size!r}")
        self.fn = fn
        self.size = int(size)
        self.dtype = dtype
        self.device = torch.device(device)

    def matmat(self, V: Tensor) -> Tensor:
        return self.fn(V)
