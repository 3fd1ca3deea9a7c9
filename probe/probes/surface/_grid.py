"""The grid of a loss surface: its spec (``START:STOP:COUNT``), its coordinates and its chunks.

A 2D grid has coordinates ``alpha`` (n_a,) and ``beta`` (n_b,), both ``np.linspace(START, STOP,
COUNT)`` (so every row has the same coordinates: no row is shifted by a step, unlike
``loss-landscapes``); its points are enumerated row-major, point ``k`` = (alpha[k // n_b],
beta[k % n_b]), and arrays over the grid are shaped (n_a, n_b) with ``loss[i, j]`` at
(alpha[i], beta[j]). A 1D grid has ``alpha`` only, arrays (n_a,). Chunks are contiguous ranges of
point indices, so that a chunk is named by its index alone.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from probe.errors import UserError

__all__ = ["Grid", "parse_grid", "MAX_COUNT", "MAX_POINTS"]

MAX_COUNT = 10_001           # points per axis
MAX_POINTS = 4_000_000       # points of a whole grid
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_AXIS = re.compile(rf"^\s*({_NUM})\s*:\s*({_NUM})\s*:\s*(\d+)\s*$")


@dataclass(frozen=True, eq=False)
class Grid:
    """The coordinates of a 1D (``beta`` None) or 2D grid, float64."""

    alpha: np.ndarray
    beta: np.ndarray | None = None

    @property
    def dims(self) -> int:
        return 1 if self.beta is None else 2

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.alpha.size,) if self.beta is None else (self.alpha.size, self.beta.size)

    @property
    def n_points(self) -> int:
        return int(np.prod(self.shape))

    def coords(self, start: int, stop: int) -> np.ndarray:
        """Coordinates (stop - start, dims) of the points ``start <= k < stop`` (row-major)."""
        k = np.arange(start, stop)
        if self.beta is None:
            return self.alpha[k][:, None]
        nb = self.beta.size
        return np.stack([self.alpha[k // nb], self.beta[k % nb]], axis=1)

    def centre_index(self) -> int | None:
        """The flat index of the point (0, 0) when the grid has it exactly, else None."""
        hits = [np.flatnonzero(a == 0.0) for a in ((self.alpha,) if self.beta is None else (self.alpha, self.beta))]
        if any(h.size == 0 for h in hits):
            return None
        return int(hits[0][0]) if self.beta is None else int(hits[0][0] * self.beta.size + hits[1][0])

    def spec(self) -> str:
        def one(a):
            return f"{a[0]:g}:{a[-1]:g}:{a.size}"
        return one(self.alpha) if self.beta is None else f"{one(self.alpha)},{one(self.beta)}"


def _axis(text: str, spec: str) -> np.ndarray:
    m = _AXIS.match(text)
    if m is None:
        raise UserError(f"grid {spec!r}: expected START:STOP:COUNT for each axis (e.g. -1:1:51), "
                        f"optionally a second one for the other axis after a comma (-1:1:51,-0.5:0.5:21)")
    lo, hi, count = float(m.group(1)), float(m.group(2)), int(m.group(3))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UserError(f"grid {spec!r}: START and STOP must be finite numbers")
    if not lo < hi:
        raise UserError(f"grid {spec!r}: START must be smaller than STOP (got {lo:g} and {hi:g})")
    if not 2 <= count <= MAX_COUNT:
        raise UserError(f"grid {spec!r}: COUNT must be between 2 and {MAX_COUNT} points per axis, got {count}")
    return np.linspace(lo, hi, count, dtype=np.float64)


def parse_grid(spec: str, dims: int = 2) -> Grid:
    """The grid of ``spec``: ``START:STOP:COUNT`` for every axis, or two such specs separated by a
    comma (first axis, second axis) for a 2D grid. Raises :class:`UserError` quoting the spec on
    anything else (a 1D grid takes one axis only)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"grid {spec!r}: expected START:STOP:COUNT (e.g. -1:1:51)")
    if dims not in (1, 2):
        raise UserError(f"dims must be 1 or 2, got {dims!r}")
    parts = spec.split(",")
    if len(parts) > 2:
        raise UserError(f"grid {spec!r}: at most two axes (START:STOP:COUNT,START:STOP:COUNT)")
    axes = [_axis(p, spec) for p in parts]
    if dims == 1:
        if len(axes) == 2:
            raise UserError(f"grid {spec!r} gives two axes but the surface is 1D: give one START:STOP:COUNT")
        return Grid(axes[0])
    alpha, beta = axes if len(axes) == 2 else (axes[0], axes[0].copy())
    if alpha.size * beta.size > MAX_POINTS:
        raise UserError(f"grid {spec!r} has {alpha.size * beta.size} points; at most {MAX_POINTS}")
    return Grid(alpha, beta)
