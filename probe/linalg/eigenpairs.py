"""The k largest or smallest algebraic eigenpairs of any :class:`probe.linalg.SymmetricOperator` by
:func:`probe.linalg.block_lanczos` (the smallest as the largest of -A)."""
from __future__ import annotations

import dataclasses

import numpy as np

from probe.linalg.lanczos import BlockLanczosResult, block_lanczos, multiplicity_note
from probe.linalg.operator import CallableOperator, SymmetricOperator

__all__ = ["extreme_eigenpairs"]


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
