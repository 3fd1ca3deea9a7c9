"""Spectrum statistics of a symmetric positive semi-definite operator, from its eigenvalues.

The eigenvalues may be the whole spectrum (``dense_eigenvalues`` of a matrix) or its top part
(``block_lanczos``); every statistic is then of the eigenvalues given. All float64 and scale-free,
so spectra up to 1e300 (an untrained multiplicative network's kernel) do not overflow.

* condition number: lambda_max / the smallest eigenvalue above a floor. Eigenvalues at or below
  the floor are numerically zero; the default floor n * eps * lambda_max is the rounding level of
  a float64 eigen-solver on an n x n operator.
* effective rank: exp(entropy of lambda / sum lambda) (Roy & Vetterli 2007), negatives clipped.
* participation ratio: (sum lambda)^2 / sum lambda^2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SpectrumStats", "spectrum_stats", "dense_eigenvalues", "default_floor", "effective_rank",
           "participation_ratio"]


@dataclass(frozen=True)
class SpectrumStats:
    """Summaries of a PSD spectrum (see :func:`spectrum_stats`)."""

    condition_number: float
    effective_rank: float
    participation_ratio: float
    floor: float
    n_below_floor: int
    notes: tuple[str, ...] = ()


def dense_eigenvalues(A) -> np.ndarray:
    """Eigenvalues (n,) of the symmetric part (A + A^T) / 2 of a square matrix, float64, descending.

    Symmetrising removes the rounding asymmetry of a computed operator before ``eigvalsh``.
    """
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"eigenvalues need a square (n, n) matrix, got shape {A.shape}")
    return np.linalg.eigvalsh(0.5 * (A + A.T))[::-1].copy()


def _descending(eigenvalues) -> np.ndarray:
    ev = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    return ev if np.all(ev[:-1] >= ev[1:]) else np.sort(ev)[::-1]


def default_floor(eigenvalues, size: int | None = None) -> float:
    """size * eps * lambda_max: eigenvalues at or below it are numerically zero (``size``: the
    operator's dimension, default the number of eigenvalues)."""
    ev = _descending(eigenvalues)
    n = ev.size if size is None else int(size)
    lmax = max(float(ev[0]), 0.0) if ev.size else 0.0
    return n * np.finfo(np.float64).eps * max(lmax, 1e-300)


def effective_rank(eigenvalues) -> float:
    """exp(-sum p log p), p = lambda / sum lambda with negatives clipped to 0 (0 for a zero spectrum)."""
    lam = np.clip(_descending(eigenvalues), 0.0, None)
    tot = lam.sum()
    if not tot > 0:
        return 0.0
    p = lam / tot
    nz = p[p > 0]
    return float(np.exp(-(nz * np.log(nz)).sum()))


def participation_ratio(eigenvalues) -> float:
    """(sum lambda)^2 / sum lambda^2 with negatives clipped to 0 (0 for a zero spectrum)."""
    lam = np.clip(_descending(eigenvalues), 0.0, None)
    if not lam.sum() > 0:
        return 0.0
    q = lam / lam[0]                      # scale-free: no overflow for lambda near 1e154
    return float(q.sum() ** 2 / (q ** 2).sum())


def spectrum_stats(eigenvalues, *, size: int | None = None, floor: float | None = None,
                   name: str = "operator") -> SpectrumStats:
    """Condition number (with its floor), effective rank and participation ratio of a PSD spectrum.

    ``eigenvalues``: any order (sorted descending here). ``floor``: default
    :func:`default_floor` with ``size`` (the operator's dimension; default the number of
    eigenvalues). The notes (``name`` names the operator in them) say when no eigenvalue is above
    the floor, when some are below it (near-singular: the condition number then describes the
    well-determined part only; for a top-k spectrum it is that of the top k) and when an
    eigenvalue is negative beyond the floor (not PSD).
    """
    ev = _descending(eigenvalues)
    if ev.size == 0:
        raise ValueError("no eigenvalues given")
    n = ev.size
    fl = float(floor) if floor is not None else default_floor(ev, size)
    notes: list[str] = []
    pos = ev > fl
    n_below = int(n - pos.sum())
    if not pos.any():
        cond = math.inf
        notes.append(f"no eigenvalue above the floor: the {name} is numerically zero")
    else:
        cond = float(ev[0] / ev[pos][-1])
        if n_below:
            notes.append(f"near-singular: {n_below} of {n} eigenvalues <= floor {fl:.3g}; the condition "
                         f"number uses the smallest eigenvalue above the floor")
    if ev[-1] < -fl:
        notes.append(f"{name} has a negative eigenvalue {ev[-1]:.3g} beyond rounding (not PSD)")
    return SpectrumStats(condition_number=cond, effective_rank=effective_rank(ev),
                         participation_ratio=participation_ratio(ev), floor=fl, n_below_floor=n_below,
                         notes=tuple(notes))
