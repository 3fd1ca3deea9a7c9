"""The result of the saturation probe: per-gate statistics and their aggregates
(:class:`SaturationResult`), saved and loaded through ``summary()`` / ``arrays()`` /
``from_store(summary, arrays)``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from probe.probes.registry import ResultView

__all__ = ["SaturationResult", "OUTPUT_BANDS", "NO_GATES_NOTE"]

#: Per kind, the band of gate outputs that counts as *not* saturated (closed interval).
OUTPUT_BANDS = {"sigmoid": (0.05, 0.95), "tanh": (-0.9, 0.9), "hard_sigmoid": (0.05, 0.95),
                "hard_swish": (0.05, 0.95)}

NO_GATES_NOTE = ("no gates found: use models.Gate, nn.Sigmoid/nn.Tanh/nn.Hardsigmoid/nn.Hardswish modules "
                 "or torch.sigmoid/torch.tanh/F.hardsigmoid calls in the model's forward")

_STRING_FIELDS = ("names", "kinds", "roles", "groups", "stages", "sources")
_INT_FIELDS = ("count", "nonfinite", "n_logit_sat", "n_output_sat")
_FLOAT_FIELDS = ("gain", "mean", "std")
_ARRAY_FIELDS = _STRING_FIELDS + _INT_FIELDS + _FLOAT_FIELDS + ("hist", "edges")


def _jsonable(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


@dataclass(frozen=True, eq=False, repr=False)
class SaturationResult(ResultView):
    """Per-gate saturation statistics (G gates, in the order they were first called) and aggregates.

    Arrays: ``names`` / ``kinds`` / ``roles`` / ``groups`` / ``stages`` / ``sources`` (G,) unicode;
    ``count`` (finite logits), ``nonfinite``, ``n_logit_sat`` (``|z| > threshold``), ``n_output_sat``
    (output outside the band) (G,) int64; ``gain``, ``mean``, ``std`` (G,) float64 (NaN for a gate
    without finite logits); ``hist`` (G, bins + 2) int64 with columns underflow, ``bins`` bins,
    overflow; ``edges`` (bins + 1,) float64 bin edges. Equality (``==``) compares every array and
    scalar exactly (NaN equal to NaN); :meth:`differences` names what differs.
    """

    names: np.ndarray
    kinds: np.ndarray
    roles: np.ndarray
    groups: np.ndarray
    stages: np.ndarray
    sources: np.ndarray
    count: np.ndarray
    nonfinite: np.ndarray
    n_logit_sat: np.ndarray
    n_output_sat: np.ndarray
    gain: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    hist: np.ndarray
    edges: np.ndarray
    threshold: float
    n_samples: int
    unused: tuple[str, ...] = ()

    _probe = "saturation"
    _frame_index = "names"
    _frame_columns = ("kinds", "roles", "groups", "stages", "count", "nonfinite", "gain", "mean", "std",
                      "frac_logit_sat", "frac_output_sat")
    _repr_keys = ("n_gates", "threshold", "model.frac_output_sat", "model.frac_logit_sat", "model.gain")

    # -- derived -------------------------------------------------------------------------------

    @property
    def n_gates(self) -> int:
        return int(len(self.names))

    @property
    def bins(self) -> int:
        return int(len(self.edges) - 1)

    @property
    def frac_logit_sat(self) -> np.ndarray:
        """(G,) fraction of finite logits with ``|z| > threshold`` (NaN without finite logits)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.n_logit_sat / np.maximum(self.count, 1), np.nan)

    @property
    def frac_output_sat(self) -> np.ndarray:
        """(G,) fraction of gate outputs outside their band (NaN without finite logits)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.n_output_sat / np.maximum(self.count, 1), np.nan)

    @property
    def note(self) -> str | None:
        if self.n_gates:
            return None
        if self.unused:
            return (f"no gate ran on these inputs; {len(self.unused)} gate module(s) were never called: "
                    + ", ".join(self.unused[:5]) + (" ..." if len(self.unused) > 5 else ""))
        return NO_GATES_NOTE

    def _aggregate(self, idx: np.ndarray) -> dict:
        """Element-weighted numbers over the gates ``idx``: pooled mean / std over all their finite logits."""
        n = self.count[idx].astype(np.float64)
        N = float(n.sum())
        ok = self.count[idx] > 0
        if N:
            mean = float((n[ok] * self.mean[idx][ok]).sum() / N)
            var = float((n[ok] * (self.std[idx][ok] ** 2 + (self.mean[idx][ok] - mean) ** 2)).sum() / N)
            gain, std = float((n[ok] * self.gain[idx][ok]).sum() / N), math.sqrt(max(var, 0.0))
        else:
            mean = std = gain = math.nan
        lsat, osat = int(self.n_logit_sat[idx].sum()), int(self.n_output_sat[idx].sum())
        return {"n_gates": int(len(idx)), "count": int(N), "nonfinite": int(self.nonfinite[idx].sum()),
                "n_logit_sat": lsat, "n_output_sat": osat, "frac_logit_sat": _ratio(lsat, N),
                "frac_output_sat": _ratio(osat, N), "gain": gain, "mean": mean, "std": std}

    def _grouped(self, labels: np.ndarray) -> list[tuple[str, dict]]:
        order = list(dict.fromkeys(labels.tolist()))
        return [(key, self._aggregate(np.flatnonzero(labels == key))) for key in order]

    def model(self) -> dict:
        """Model-wide numbers over every finite logit of every gate."""
        return self._aggregate(np.arange(self.n_gates))

    def by_stage(self) -> list[tuple[str, dict]]:
        return self._grouped(self.stages)

    def by_kind(self) -> list[tuple[str, dict]]:
        return self._grouped(self.kinds)

    def by_group(self) -> list[tuple[str, dict]]:
        return self._grouped(self.groups)

    def gate(self, name: str) -> dict:
        """One gate's row of the summary table."""
        hits = np.flatnonzero(self.names == name)
        if not len(hits):
            raise KeyError(f"no gate {name!r}; gates: {', '.join(self.names.tolist()) or '(none)'}")
        return self._row(int(hits[0]))

    def _row(self, i: int) -> dict:
        return {"name": str(self.names[i]), "kind": str(self.kinds[i]), "role": str(self.roles[i]),
                "group": str(self.groups[i]), "stage": str(self.stages[i]), "source": str(self.sources[i]),
                "count": int(self.count[i]), "nonfinite": int(self.nonfinite[i]),
                "n_logit_sat": int(self.n_logit_sat[i]), "n_output_sat": int(self.n_output_sat[i]),
                "frac_logit_sat": float(self.frac_logit_sat[i]), "frac_output_sat": float(self.frac_output_sat[i]),
                "gain": float(self.gain[i]), "mean": float(self.mean[i]), "std": float(self.std[i])}

    # -- the probe contract ---------------------------------------------------------------------

    def summary(self) -> dict:
        """JSON-able: scalars, the per-gate table, per stage / kind / group and model-wide numbers
        (non-finite numbers become ``None``)."""
        def clean(d: dict) -> dict:
            return {k: (_jsonable(v) if isinstance(v, float) else v) for k, v in d.items()}

        out = {
            "n_gates": self.n_gates, "n_samples": int(self.n_samples), "threshold": float(self.threshold),
            "bins": self.bins, "hist_range": [float(self.edges[0]), float(self.edges[-1])],
            "output_bands": {k: list(v) for k, v in OUTPUT_BANDS.items()},
            "model": clean(self.model()),
            "gates": [clean(self._row(i)) for i in range(self.n_gates)],
            "by_stage": [{"stage": k, **clean(v)} for k, v in self.by_stage()],
            "by_kind": [{"kind": k, **clean(v)} for k, v in self.by_kind()],
            "by_group": [{"group": k, **clean(v)} for k, v in self.by_group()],
            "unused": list(self.unused),
        }
        if self.note is not None:
            out["note"] = self.note
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-gate arrays (no object dtype: they load with ``allow_pickle=False``)."""
        out = {k: np.asarray(getattr(self, k)) for k in _ARRAY_FIELDS}
        out["frac_logit_sat"] = self.frac_logit_sat
        out["frac_output_sat"] = self.frac_output_sat
        return out

    @classmethod
    def from_store(cls, summary: Mapping, arrays: Mapping) -> "SaturationResult":
        """The inverse of :meth:`summary` / :meth:`arrays` (the fractions are derived again)."""
        def arr(key, dtype_):
            return np.asarray(arrays[key]).astype(dtype_, copy=False)

        names = np.asarray(arrays["names"])
        G = len(names)
        kw = {k: (np.asarray(arrays[k]).astype(str) if G else np.asarray(arrays[k]).astype("<U1"))
              for k in _STRING_FIELDS}
        kw.update({k: arr(k, np.int64).reshape(G) for k in _INT_FIELDS})
        kw.update({k: arr(k, np.float64).reshape(G) for k in _FLOAT_FIELDS})
        edges = arr("edges", np.float64)
        kw["hist"] = arr("hist", np.int64).reshape(G, len(edges) + 1)
        return cls(**kw, edges=edges, threshold=float(summary["threshold"]), n_samples=int(summary["n_samples"]),
                   unused=tuple(str(u) for u in summary.get("unused", ()) or ()))

    def differences(self, other: Any) -> list[str]:
        """Names of the fields in which ``other`` differs (empty when equal)."""
        if not isinstance(other, SaturationResult):
            return ["type"]
        out = []
        for k in _ARRAY_FIELDS:
            a, b = np.asarray(getattr(self, k)), np.asarray(getattr(other, k))
            if a.shape != b.shape or a.dtype.kind != b.dtype.kind:
                out.append(k)
            elif a.dtype.kind == "f":
                if not np.array_equal(a, b, equal_nan=True):
                    out.append(k)
            elif not np.array_equal(a, b):
                out.append(k)
        for k in ("threshold", "n_samples", "unused"):
            if getattr(self, k) != getattr(other, k):
                out.append(k)
        return out

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, SaturationResult):
            return NotImplemented
        return not self.differences(other)

    __hash__ = None  # mutable numpy arrays inside

    def text(self, top: int = 10) -> str:
        """A short table: the model-wide line and the ``top`` gates by saturated output fraction."""
        head = f"saturation over {self.n_samples} inputs: {self.n_gates} gate(s)"
        if not self.n_gates:
            return f"{head}\n{self.note}"
        m = self.model()

        def pct(v: float) -> str:
            return "    -" if not math.isfinite(v) else f"{100 * v:5.1f}%"

        def num(v: float, fmt: str = "6.3f") -> str:
            return "-".rjust(int(fmt.split(".")[0])) if not math.isfinite(v) else format(v, fmt)

        lines = [head + f" (saturated: output outside [0.05, 0.95], tanh [-0.9, 0.9]; logits |z| > {self.threshold:g})",
                 f"model-wide: saturated {pct(m['frac_output_sat']).strip()}, |z|>{self.threshold:g} "
                 f"{pct(m['frac_logit_sat']).strip()}, gain {num(m['gain'], '.3f')}, logit mean "
                 f"{num(m['mean'], '.3g')} std {num(m['std'], '.3g')} over {m['count']:,} logits"
                 + (f", {m['nonfinite']:,} non-finite excluded" if m["nonfinite"] else "")]
        frac = self.frac_output_sat
        order = sorted(range(self.n_gates), key=lambda i: (-np.nan_to_num(frac[i], nan=-1.0), i))[:top]
        width = max(4, max(len(str(self.names[i])) for i in order))
        rwidth = max(4, max(len(str(self.roles[i])) for i in order))
        lines.append(f"{'gate'.ljust(width)}  {'kind'.ljust(12)}  {'role'.ljust(rwidth)}  {'sat':>6}  "
                     f"{'|z|>t':>6}  {'gain':>6}  {'mean':>7}  {'std':>7}")
        for i in order:
            lines.append(f"{str(self.names[i]).ljust(width)}  {str(self.kinds[i]).ljust(12)}  "
                         f"{str(self.roles[i]).ljust(rwidth)}  {pct(frac[i])}  {pct(self.frac_logit_sat[i])}  "
                         f"{num(self.gain[i])}  {num(self.mean[i], '7.3f')}  {num(self.std[i], '7.3f')}"
                         + (f"  ({int(self.nonfinite[i])} non-finite)" if self.nonfinite[i] else ""))
        if self.n_gates > top:
            lines.append(f"... {self.n_gates - top} more gate(s) (summary()['gates'] has all)")
        return "\n".join(lines)


# --- registration --------------------------------------------------------------------------------
