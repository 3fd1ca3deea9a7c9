"""Result types of the surface probe: :class:`SurfaceResult` (what :func:`~probe.probes.surface.loss_surface`
returns, with :func:`mean_rise`) and the stored result of ``probe surface``
(:class:`SurfaceProbeResult`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probe.probes.registry import ResultView, StoredResult
from probe.probes.surface._evaluate import Plan

__all__ = ["SurfaceResult", "SurfaceProbeResult", "mean_rise"]


class _SurfaceView(ResultView):
    """The loss surface's figures and table: one row per grid point (``alpha``, ``beta`` in 2D,
    ``loss``, ``accuracy``)."""

    _probe = "surface"
    _frame_index = "point"
    _repr_keys = ("directions", "dims", "centre_loss", "centre_accuracy", "loss_min=loss_scale.min",
                  "loss_max=loss_scale.max")

    def frame_columns(self) -> dict[str, np.ndarray]:
        a = self.drawn().arrays()
        loss = np.asarray(a["loss"], dtype=np.float64)
        out: dict[str, np.ndarray] = {"point": np.arange(loss.size)}
        if "beta" in a:
            al, be = np.meshgrid(np.asarray(a["alpha"]), np.asarray(a["beta"]), indexing="ij")
            out.update(alpha=al.reshape(-1), beta=be.reshape(-1))
        else:
            out["alpha"] = np.asarray(a["alpha"])
        out.update(loss=loss.reshape(-1), accuracy=np.asarray(a["accuracy"], dtype=np.float64).reshape(-1))
        return out


@dataclass(frozen=True, eq=False, repr=False)
class SurfaceResult(_SurfaceView):
    """A loss surface and its diagnostics.

    ``alpha`` (n_a,) / ``beta`` (n_b,) the grid coordinates (``beta`` None in 1D); ``loss`` and
    ``accuracy`` float64, (n_a, n_b) with ``loss[i, j]`` at (alpha[i], beta[j]) or (n_a,) in 1D,
    NaN where the loss is not finite; ``centre_loss`` / ``centre_accuracy`` of the model as it is
    (its own parameters and buffers: the model's loss on the subset); ``grid_centre_loss`` the
    grid's value at (0, 0) when the grid has that point; ``direction_norms`` the L2 norms of the
    directions, ``relative_norms`` over |theta0|, ``cosine`` between the two directions (None in
    1D); ``directions`` the kind and facts of the directions (:class:`Directions.info`);
    ``trajectory`` (E, dims) / ``trajectory_epochs`` (E,) for pca; ``plan`` how it was evaluated;
    ``resumed_chunks`` chunks taken from an interrupted attempt; ``notes``.
    """

    kind: str
    alpha: np.ndarray
    beta: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray
    centre_loss: float
    centre_accuracy: float
    grid_centre_loss: float | None
    direction_norms: tuple[float, ...]
    relative_norms: tuple[float, ...]
    cosine: float | None
    directions: dict
    n_samples: int
    n_params: int
    bn: str
    dtype: str
    plan: Plan
    n_chunks: int
    resumed_chunks: int
    wall_time_s: float
    trajectory: np.ndarray | None = None
    trajectory_epochs: np.ndarray | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def dims(self) -> int:
        return 1 if self.beta is None else 2

    def drawn(self) -> "SurfaceProbeResult":
        return SurfaceProbeResult({"n": self.n_samples, **self.summary()}, self.arrays())

    def loss_scale(self) -> dict[str, Any]:
        """min / max / median of the finite losses, the finite fraction, and where the minimum is."""
        finite = np.isfinite(self.loss)
        out: dict[str, Any] = {"finite_fraction": float(finite.mean()), "min": None, "max": None,
                               "median": None, "argmin": None}
        if finite.any():
            vals = self.loss[finite]
            idx = np.unravel_index(int(np.nanargmin(self.loss)), self.loss.shape)
            coords = [float(self.alpha[idx[0]])] + ([float(self.beta[idx[1]])] if self.beta is not None else [])
            out.update(min=float(vals.min()), max=float(vals.max()), median=float(np.median(vals)), argmin=coords)
        return out

    def mean_rise(self, radius: float = 0.5) -> float | None:
        """:func:`mean_rise` of this surface."""
        return mean_rise(self.alpha, self.beta, self.loss, self.centre_loss, radius)

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers (no NaN): the catalog row."""
        acc = self.accuracy[np.isfinite(self.accuracy)]
        grid = {"alpha": [float(self.alpha[0]), float(self.alpha[-1]), int(self.alpha.size)]}
        if self.beta is not None:
            grid["beta"] = [float(self.beta[0]), float(self.beta[-1]), int(self.beta.size)]
        out = {"directions": self.kind, "dims": self.dims, "grid": grid, "n_points": int(self.loss.size),
                "centre_loss": self.centre_loss, "centre_accuracy": self.centre_accuracy,
                "grid_centre_loss": self.grid_centre_loss,
                "direction_norms": list(self.direction_norms), "relative_norms": list(self.relative_norms),
                "cosine": self.cosine, "direction_info": dict(self.directions), "loss_scale": self.loss_scale(),
                "accuracy_max": float(acc.max()) if acc.size else None, "n_samples": self.n_samples,
                "n_params": self.n_params, "bn": self.bn, "dtype": self.dtype,
                "vectorize": "vmap" if self.plan.vmap else "loop", "chunk_points": self.plan.chunk,
                "vmap_batch": self.plan.vmap_batch, "sample_batch": self.plan.sample_batch,
                "n_chunks": self.n_chunks, "resumed_chunks": self.resumed_chunks,
                "wall_time_s": self.wall_time_s, "notes": list(self.notes)}
        return _finite_or_none(out)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"alpha": self.alpha, "loss": self.loss, "accuracy": self.accuracy}
        if self.beta is not None:
            out["beta"] = self.beta
        if self.trajectory is not None:
            out["trajectory"] = np.asarray(self.trajectory, dtype=np.float64)
            out["trajectory_epochs"] = np.asarray(self.trajectory_epochs, dtype=np.int64)
        return out


def mean_rise(alpha, beta, loss, centre_loss: float, radius: float = 0.5) -> float | None:
    """The mean loss over the grid points with every coordinate within ``radius`` of the centre,
    minus the centre loss: one sharpness number per surface (None when no finite point lies
    there). ``beta`` None for a 1D surface."""
    loss = np.asarray(loss, dtype=np.float64)
    coords = np.meshgrid(alpha, beta, indexing="ij") if beta is not None else [np.asarray(alpha)]
    inside = np.isfinite(loss)
    for c in coords:
        inside &= np.abs(c) <= radius
    return float(loss[inside].mean() - centre_loss) if inside.any() and centre_loss is not None else None


def _finite_or_none(obj):
    """``obj`` with every non-finite float replaced by None (the catalog holds strict JSON)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


class SurfaceProbeResult(StoredResult, _SurfaceView):
    """The stored surface: the summary the catalog and ``--json`` show (``centre_loss``,
    ``direction_norms``, ``cosine``, ``loss_scale``, ``directions``, ``grid``, ...) and its arrays
    (``alpha`` (n_a,), ``beta`` (n_b,) in 2D, ``loss`` / ``accuracy`` (n_a, n_b) or (n_a,) with
    ``loss[i, j]`` at (alpha[i], beta[j]) and NaN where not finite, ``trajectory`` (E, dims) and
    ``trajectory_epochs`` (E,) for pca)."""

    @property
    def alpha(self) -> np.ndarray:
        return np.asarray(self.array_data["alpha"])

    @property
    def beta(self) -> np.ndarray | None:
        b = self.array_data.get("beta")
        return None if b is None else np.asarray(b)

    @property
    def loss(self) -> np.ndarray:
        return np.asarray(self.array_data["loss"])

    @property
    def accuracy(self) -> np.ndarray:
        return np.asarray(self.array_data["accuracy"])

    @property
    def trajectory(self) -> np.ndarray | None:
        t = self.array_data.get("trajectory")
        return None if t is None else np.asarray(t)

    def mean_rise(self, radius: float = 0.5) -> float | None:
        """The mean loss rise within ``radius`` of the centre (:func:`mean_rise`)."""
        return mean_rise(self.alpha, self.beta, self.loss, self.data.get("centre_loss"), radius)

    def text(self) -> str:
        r = self.data
        g = r["grid"]
        shape = "x".join(str(a[2]) for a in (g["alpha"], g.get("beta")) if a)
        info = r.get("direction_info") or {}
        how = f", {info['norm']}-normalised" if r["directions"] == "random" else ""
        lines = [f"{r['directions']} directions{how}, {r['dims']}D grid {shape} on {r['n_samples']} "
                 f"{r.get('data', '')} samples (P={r['n_params']}, BatchNorm {r['bn']}, {r['dtype']})"]
        acc = r.get("centre_accuracy")
        lines.append(f"centre loss {_f(r.get('centre_loss'))} (accuracy {_f(acc)})"
                     + (f"; grid centre {_f(r['grid_centre_loss'])}" if r.get("grid_centre_loss") is not None else ""))
        sc = r["loss_scale"]
        lines.append(f"loss over the grid: min {_f(sc['min'])} at {sc['argmin']}, max {_f(sc['max'])}, "
                     f"finite at {100 * sc['finite_fraction']:.1f}% of {r['n_points']} points")
        norms = ", ".join(f"|d{i + 1}| {_f(v)} ({_f(rv)} of |theta|)"
                          for i, (v, rv) in enumerate(zip(r["direction_norms"], r["relative_norms"])))
        lines.append(f"directions: {norms}" + (f", cosine {r['cosine']:.3g}" if r.get("cosine") is not None else ""))
        lines.append(f"evaluated by {r['vectorize']} in {r['n_chunks']} chunks of {r['chunk_points']} points "
                     f"({r['resumed_chunks']} resumed), {r['wall_time_s']:.1f}s")
        lines += [f"note: {note}" for note in r.get("notes", [])]
        return "\n".join(lines)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.5g}"
