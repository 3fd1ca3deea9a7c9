"""The result of the input-space interpolation probe (:class:`InterpResult`): paths and planes,
their per-group summary, saved and loaded through ``summary()`` / ``arrays()`` /
``from_store(summary, arrays)``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from probe.checks import check_choice
from probe.probes.registry import ResultView

__all__ = ["InterpResult", "GROUPS"]

#: Summary groups of paths.
GROUPS = ("same_class", "different_class", "all")

_ARRAY_FIELDS = ("t", "pair_index", "pair_same", "pair_labels", "logits", "probs", "pred", "ce_a", "ce_b", "loss",
                 "barrier", "deviation", "gap", "deviation_max", "deviation_mean", "fit_error", "degree", "changes",
                 "required", "plane_index", "plane_labels", "plane_u", "plane_v", "plane_pred", "plane_maxprob",
                 "plane_frame")
_SCALARS = {"n_samples": int, "num_classes": int, "degree_tol": float, "max_degree": int,
            "same_class_fraction": float, "plane_margin": float, "seed": int, "dtype": str, "wall_time_s": float}


def _num(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _nanstat(fn, v: np.ndarray) -> float | None:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return _num(fn(v)) if v.size else None


@dataclass(frozen=True, eq=False, repr=False)
class InterpResult(ResultView):
    """Paths (P pairs x T points, C classes) and planes (K triples, R x R grid); see
    :mod:`probe.probes.interp.api` for every definition.

    Paths: ``t`` (T,); ``pair_index`` / ``pair_labels`` (P, 2) int64 (samples a, b), ``pair_same``
    (P,) bool; ``logits`` / ``probs`` (P, T, C) in the compute dtype; ``pred`` (P, T) int64;
    ``ce_a`` / ``ce_b`` / ``loss`` (mixup) / ``deviation`` (P, T) float64; per path ``gap``
    (``||f(x_b) - f(x_a)||``), ``barrier``, ``deviation_max``, ``deviation_mean`` (P,) float64,
    ``fit_error`` (P, max_degree + 1) float64, ``degree``, ``changes``, ``required`` (P,) int64.
    Planes: ``plane_index`` / ``plane_labels`` (K, 3) int64; ``plane_u`` / ``plane_v`` (R,);
    ``plane_pred`` (K, R, R) int64 and ``plane_maxprob`` (K, R, R) float64 indexed [triple, v, u];
    ``plane_frame`` (K, 3): ``||x_b - x_a||``, ``||x_c - x_a||`` and the cosine between the edges.
    Equality compares every array (NaN equal to NaN) and every scalar but the wall time.
    """

    t: np.ndarray
    pair_index: np.ndarray
    pair_same: np.ndarray
    pair_labels: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    pred: np.ndarray
    ce_a: np.ndarray
    ce_b: np.ndarray
    loss: np.ndarray
    barrier: np.ndarray
    deviation: np.ndarray
    gap: np.ndarray
    deviation_max: np.ndarray
    deviation_mean: np.ndarray
    fit_error: np.ndarray
    degree: np.ndarray
    changes: np.ndarray
    required: np.ndarray
    plane_index: np.ndarray
    plane_labels: np.ndarray
    plane_u: np.ndarray
    plane_v: np.ndarray
    plane_pred: np.ndarray
    plane_maxprob: np.ndarray
    plane_frame: np.ndarray
    n_samples: int
    num_classes: int
    degree_tol: float
    max_degree: int
    same_class_fraction: float
    plane_margin: float
    seed: int
    dtype: str
    wall_time_s: float = 0.0
    notes: tuple[str, ...] = ()

    _probe = "interp"
    _frame_index = "path"
    _frame_columns = ("pair_same", "gap", "barrier", "deviation_max", "deviation_mean", "degree", "changes",
                      "required")
    _repr_keys = ("pairs", "steps", "same_class_deviation=same_class.deviation_max_mean",
                  "different_class_deviation=different_class.deviation_max_mean", "barrier=all.barrier_mean")

    # -- derived -------------------------------------------------------------------------------

    @property
    def n_pairs(self) -> int:
        return int(len(self.pair_index))

    @property
    def steps(self) -> int:
        return int(len(self.t))

    @property
    def extra_change(self) -> np.ndarray:
        """(P,) bool: more predicted-class changes along the path than its ends require."""
        return np.asarray(self.changes) > np.asarray(self.required)

    @property
    def above(self) -> np.ndarray:
        """(P,) bool: no degree up to ``max_degree`` fits within ``degree_tol``."""
        return np.asarray(self.degree) > self.max_degree

    def group_mask(self, group: str) -> np.ndarray:
        check_choice("group", group, GROUPS)
        same = np.asarray(self.pair_same, dtype=bool)
        return same if group == "same_class" else ~same if group == "different_class" else np.ones_like(same)

    def group(self, group: str) -> dict:
        """Summary numbers of one group of paths (``same_class``, ``different_class``, ``all``);
        ``None`` where the group is empty (or every path in it is degenerate)."""
        m = self.group_mask(group)
        dmax, dmean = self.deviation_max[m], self.deviation_mean[m]
        deg = self.degree[m].astype(np.float64)
        ends_ok = np.concatenate([self.pred[m, 0] == self.pair_labels[m, 0], self.pred[m, -1] == self.pair_labels[m, 1]])
        cnt = int(m.sum())
        return {"n": cnt, "degenerate": int((~np.isfinite(dmax)).sum()),
                "deviation_max_mean": _nanstat(np.mean, dmax), "deviation_max_median": _nanstat(np.median, dmax),
                "deviation_mean_mean": _nanstat(np.mean, dmean), "deviation_mean_median": _nanstat(np.median, dmean),
                "degree_mean": _nanstat(np.mean, deg), "degree_median": _nanstat(np.median, deg),
                "above_fraction": _nanstat(np.mean, self.above[m].astype(np.float64)),
                "extra_change_fraction": _nanstat(np.mean, self.extra_change[m].astype(np.float64)),
                "changes_mean": _nanstat(np.mean, self.changes[m].astype(np.float64)),
                "barrier_mean": _nanstat(np.mean, self.barrier[m]),
                "barrier_median": _nanstat(np.median, self.barrier[m]),
                "loss_mean": _nanstat(np.mean, self.loss[m]),
                "end_accuracy": _nanstat(np.mean, ends_ok.astype(np.float64))}

    # -- the probe contract ---------------------------------------------------------------------

    def summary(self) -> dict:
        """JSON-able: the settings, one dict of numbers per group (see :meth:`group`) and notes."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _SCALARS}
        same = int(np.asarray(self.pair_same, dtype=bool).sum())
        out.update({"pairs": self.n_pairs, "n_same": same, "n_different": self.n_pairs - same, "steps": self.steps,
                    "triples": int(len(self.plane_index)), "plane_resolution": int(len(self.plane_u))})
        for g in GROUPS:
            out[g] = self.group(g)
        out["notes"] = list(self.notes)
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(getattr(self, k)) for k in _ARRAY_FIELDS}

    @classmethod
    def from_store(cls, summary: Mapping, arrays: Mapping) -> "InterpResult":
        """The inverse of :meth:`summary` / :meth:`arrays`."""
        kw = {k: np.asarray(arrays[k]) for k in _ARRAY_FIELDS}
        kw.update({k: conv(summary[k]) for k, conv in _SCALARS.items()})
        return cls(**kw, notes=tuple(str(s) for s in summary.get("notes") or ()))

    def differences(self, other: Any) -> list[str]:
        """Names of the fields in which ``other`` differs (empty when equal; wall time ignored)."""
        if not isinstance(other, InterpResult):
            return ["type"]
        out = []
        for k in _ARRAY_FIELDS:
            a, b = np.asarray(getattr(self, k)), np.asarray(getattr(other, k))
            if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(
                    a, b, equal_nan=a.dtype.kind in "fc"):
                out.append(k)
        out += [k for k in (*_SCALARS, "notes") if k != "wall_time_s" and getattr(self, k) != getattr(other, k)]
        return out

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, InterpResult):
            return NotImplemented
        return not self.differences(other)

    __hash__ = None  # numpy arrays inside

    def text(self) -> str:
        """The lines the CLI prints: one per group of paths, then the planes."""
        def f(v, fmt=".4g"):
            return "-" if v is None else format(v, fmt)

        s = self.summary()
        lines = [f"{s['pairs']} mixup paths ({s['n_same']} same-class, {s['n_different']} different-class) x "
                 f"{s['steps']} points between {self.n_samples} samples, {self.num_classes} classes, {self.dtype}, "
                 f"{self.wall_time_s:.1f}s; degree: Chebyshev least squares within {self.degree_tol:g}, "
                 f"up to {self.max_degree}"]
        for g in GROUPS:
            r = s[g]
            if not r["n"]:
                continue
            lines.append(f"{g.replace('_', '-'):>15}: deviation max {f(r['deviation_max_mean'])} (median "
                         f"{f(r['deviation_max_median'])}), mean {f(r['deviation_mean_mean'])}; degree "
                         f"{f(r['degree_mean'], '.3g')} (above {self.max_degree}: {f(r['above_fraction'], '.0%')}); "
                         f"extra class change {f(r['extra_change_fraction'], '.0%')}; loss barrier "
                         f"{f(r['barrier_mean'])}; end accuracy {f(r['end_accuracy'], '.0%')}"
                         + (f"; {r['degenerate']} degenerate" if r["degenerate"] else ""))
        K = len(self.plane_index)
        if K:
            regions = [len(np.unique(self.plane_pred[k])) for k in range(K)]
            lines.append(f"{K} plane(s) {len(self.plane_u)}x{len(self.plane_u)} over [-{self.plane_margin:g}, "
                         f"{1 + self.plane_margin:g}]^2: classes per plane {regions}, mean max-probability "
                         f"{float(np.mean(self.plane_maxprob)):.3g}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)
