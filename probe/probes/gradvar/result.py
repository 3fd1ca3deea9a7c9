"""The gradient-variance result: per-layer arrays, depth curves, store round trip, text."""
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


from probe.errors import UserError
from probe.probes.registry import ResultView


# ------------------------------------------------------------------------------------------------
# The result
# ------------------------------------------------------------------------------------------------

_LAYER_FLOATS = ("grad_norm", "trace_cov", "snr", "noise_scale", "per_sample_var", "per_sample_grad_norm",
                 "noise_scale_ps", "rel_update", "weight_norm", "batch_grad_rms")
_BLOCK_FLOATS = ("act_var_seeds", "block_grad_seeds")
_SETTINGS = ("n", "batches", "batch_size", "lr", "lr_source", "dtype", "bn", "per_sample", "chunk", "seed",
             "signal", "signal_source")
_COUNTS = ("batches_used", "nonfinite_batches", "samples_used", "nonfinite_samples", "signal_nonfinite")


def _ratio(a, b) -> np.ndarray:
    """a / b elementwise: inf where b == 0 < a, NaN where both are 0 or either is NaN."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((b == 0) & (a == 0), np.nan, a / b)


def _json_float(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _mean_std(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 1 when 2+ finite values, else 0) over axis 0, ignoring NaN."""
    D = m.shape[1] if m.ndim == 2 else 0
    mean, std = np.full(D, np.nan), np.full(D, np.nan)
    for j in range(D):
        col = m[:, j][np.isfinite(m[:, j])]
        if col.size:
            mean[j] = col.mean()
            std[j] = col.std(ddof=1) if col.size > 1 else 0.0
    return mean, std


@dataclass(frozen=True, eq=False, repr=False)
class GradVarResult(ResultView):
    """Gradient variance of one model (see the module docstring for every quantity).

    Per layer (parameter tensor, L of them, in the model's parameter order): ``names``,
    ``modules`` (owning module), ``numel`` and float64 arrays ``grad_norm`` |G|, ``trace_cov``
    tr(Sigma_B), ``snr``, ``noise_scale`` B_simple = B tr(Sigma_B)/|G|^2 (from the mini-batches),
    ``per_sample_var`` tr(Sigma_1) from per-sample gradients, ``per_sample_grad_norm`` |gbar| over
    all samples, ``noise_scale_ps`` tr(Sigma_1)/|gbar|^2, ``rel_update`` lr rms|g_k|/|w|,
    ``weight_norm``, ``batch_grad_rms`` and ``nonfinite`` (batches left out for this tensor). Per
    block (D, depth 1..D): ``block_names``, ``act_var_seeds`` and ``block_grad_seeds`` (S, D), one row
    per initialisation (mean/std over seeds: :attr:`act_var_mean` etc.). NaN marks "not computed"
    (per_sample off) or "undefined" (0/0).
    """

    names: tuple[str, ...]
    modules: tuple[str, ...]
    numel: np.ndarray
    grad_norm: np.ndarray
    trace_cov: np.ndarray
    snr: np.ndarray
    noise_scale: np.ndarray
    per_sample_var: np.ndarray
    per_sample_grad_norm: np.ndarray
    noise_scale_ps: np.ndarray
    rel_update: np.ndarray
    weight_norm: np.ndarray
    batch_grad_rms: np.ndarray
    nonfinite: np.ndarray
    block_names: tuple[str, ...]
    act_var_seeds: np.ndarray
    block_grad_seeds: np.ndarray
    signal_seeds: tuple[int, ...]
    # settings
    n: int
    batches: int
    batch_size: int
    lr: float
    lr_source: str                  # "run" (ctx.lr) or "params"
    dtype: str
    bn: str
    per_sample: bool
    chunk: int
    seed: int
    signal: bool
    signal_source: str              # "rebuild", "model" or "off"
    # counts
    batches_used: int
    nonfinite_batches: int
    samples_used: int
    nonfinite_samples: int
    signal_nonfinite: int

    notes: tuple[str, ...] = ()
    #: (L,) bool: whether the tensor gets a gradient in training (batch statistics in BatchNorm);
    #: a bias feeding a BatchNorm gets none there. None: not measured (every tensor trains).
    trains: np.ndarray | None = None

    _probe = "gradvar"
    _frame_index = "names"
    _frame_columns = ("modules", "numel", "trains", "grad_norm", "trace_cov", "snr", "noise_scale", "per_sample_var",
                      "noise_scale_ps", "rel_update", "weight_norm")
    _samples_keys = ("settings.n",)
    _repr_keys = ("settings.batch_size", "snr=aggregates.snr", "noise_scale=aggregates.noise_scale",
                  "rel_update=aggregates.rel_update")

    # -- derived -----------------------------------------------------------------------------
    @property
    def trains_mask(self) -> np.ndarray:
        """(L,) bool: :attr:`trains`, all True where not measured."""
        return np.ones(len(self.names), dtype=bool) if self.trains is None else np.asarray(self.trains, dtype=bool)

    @property
    def block_depth(self) -> np.ndarray:
        """(D,) depth index of each block, 1 = the first."""
        return np.arange(1, len(self.block_names) + 1, dtype=np.int64)

    @property
    def act_var_mean(self) -> np.ndarray:
        return _mean_std(self.act_var_seeds)[0]

    @property
    def act_var_std(self) -> np.ndarray:
        return _mean_std(self.act_var_seeds)[1]

    @property
    def block_grad_mean(self) -> np.ndarray:
        return _mean_std(self.block_grad_seeds)[0]

    @property
    def block_grad_std(self) -> np.ndarray:
        return _mean_std(self.block_grad_seeds)[1]

    def _group(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        """Sums over parameter tensors grouped by ``keys`` (traces and squared norms add)."""
        uniq = list(dict.fromkeys(keys.tolist()))
        pos = {k: i for i, k in enumerate(uniq)}
        inv = np.array([pos[k] for k in keys.tolist()], dtype=np.int64)

        def add(v):
            out = np.zeros(len(uniq))
            np.add.at(out, inv, np.asarray(v, dtype=np.float64))
            return out

        numel = np.zeros(len(uniq), dtype=np.int64)
        np.add.at(numel, inv, self.numel)
        g2, tc = add(self.grad_norm ** 2), add(self.trace_cov)
        psv, pg2 = add(self.per_sample_var), add(self.per_sample_grad_norm ** 2)
        w2, r2 = add(self.weight_norm ** 2), add(self.batch_grad_rms ** 2)
        return {"name": np.array(uniq, dtype=str), "numel": numel, "grad_norm": np.sqrt(g2), "trace_cov": tc,
                "snr": _ratio(g2, tc), "noise_scale": _ratio(self.batch_size * tc, g2),
                "per_sample_var": psv, "noise_scale_ps": _ratio(psv, pg2),
                "rel_update": _ratio(self.lr * np.sqrt(r2), np.sqrt(w2)), "weight_norm": np.sqrt(w2)}

    def by_module(self) -> dict[str, np.ndarray]:
        """The per-layer quantities grouped per owning module (arrays over modules, model order)."""
        return self._group(np.array(self.modules, dtype=str))

    def aggregates(self) -> dict[str, float]:
        """Whole-model values (all parameters as one vector), and the consistency ratio
        ``B tr(Sigma_B) / tr(Sigma_1)`` (1 in expectation, eval-mode BN)."""
        if not self.names:
            return {}
        g = self._group(np.zeros(len(self.names), dtype=str))
        out = {k: float(v[0]) for k, v in g.items() if k not in ("name", "numel")}
        out["numel"] = int(g["numel"][0])
        out["minibatch_over_per_sample"] = float(_ratio(self.batch_size * g["trace_cov"], g["per_sample_var"])[0])
        return out

    # -- storage -----------------------------------------------------------------------------
    def summary(self) -> dict:
        """JSON-able: settings, counts, whole-model aggregates, per-layer and per-module tables,
        depth curves and notes (non-finite floats as None)."""
        layers = [{"name": n, "module": m, "numel": int(self.numel[i]), "trains": bool(self.trains_mask[i]),
                   **{k: _json_float(getattr(self, k)[i]) for k in _LAYER_FLOATS},
                   "nonfinite": int(self.nonfinite[i])}
                  for i, (n, m) in enumerate(zip(self.names, self.modules))]
        mods = self.by_module()
        modules = [{"name": str(mods["name"][i]), "numel": int(mods["numel"][i]),
                    **{k: _json_float(v[i]) for k, v in mods.items() if k not in ("name", "numel")}}
                   for i in range(len(mods["name"]))]
        avm, avs, gm, gs = self.act_var_mean, self.act_var_std, self.block_grad_mean, self.block_grad_std
        depth = [{"block": b, "depth": i + 1, "act_var_mean": _json_float(avm[i]), "act_var_std": _json_float(avs[i]),
                  "grad_norm_mean": _json_float(gm[i]), "grad_norm_std": _json_float(gs[i])}
                 for i, b in enumerate(self.block_names)]
        return {"settings": {k: getattr(self, k) for k in _SETTINGS},
                "signal_seeds": list(self.signal_seeds),
                "counts": {k: getattr(self, k) for k in _COUNTS},
                "aggregates": {k: (_json_float(v) if isinstance(v, float) else v) for k, v in self.aggregates().items()},
                "layers": layers, "modules": modules, "depth": depth, "notes": list(self.notes)}

    def arrays(self) -> dict[str, np.ndarray]:
        """Numeric and fixed-width unicode arrays (no object dtype): the stored ``.npz``."""
        out = {"names": np.array(self.names, dtype=str).reshape(-1),
               "modules": np.array(self.modules, dtype=str).reshape(-1),
               "numel": np.asarray(self.numel, dtype=np.int64),
               "nonfinite": np.asarray(self.nonfinite, dtype=np.int64),
               "block_names": np.array(self.block_names, dtype=str).reshape(-1),
               "block_depth": self.block_depth,
               "signal_seeds": np.array(self.signal_seeds, dtype=np.int64).reshape(-1)}
        if self.trains is not None:
            out["trains"] = np.asarray(self.trains, dtype=bool)
        for k in _LAYER_FLOATS + _BLOCK_FLOATS:
            out[k] = np.asarray(getattr(self, k), dtype=np.float64)
        out.update(act_var_mean=self.act_var_mean, act_var_std=self.act_var_std,
                   block_grad_mean=self.block_grad_mean, block_grad_std=self.block_grad_std)
        return out

    @classmethod
    def from_store(cls, summary: dict, arrays: dict) -> "GradVarResult":
        """Inverse of ``(summary(), arrays())``."""
        try:
            st, ct = summary["settings"], summary["counts"]
            kw: dict[str, Any] = {k: st[k] for k in _SETTINGS}
            kw.update({k: int(ct[k]) for k in _COUNTS})
            kw["notes"] = tuple(str(s) for s in summary.get("notes", ()))
            for k in ("names", "modules", "block_names"):
                kw[k] = tuple(str(s) for s in np.asarray(arrays[k]).reshape(-1).tolist())
            kw["signal_seeds"] = tuple(int(s) for s in np.asarray(arrays["signal_seeds"]).reshape(-1).tolist())
            for k in ("numel", "nonfinite"):
                kw[k] = np.asarray(arrays[k], dtype=np.int64)
            if "trains" in arrays:                      # results stored before it was measured: None
                kw["trains"] = np.asarray(arrays["trains"], dtype=bool).reshape(-1)
            for k in _LAYER_FLOATS:
                kw[k] = np.asarray(arrays[k], dtype=np.float64)
            D = len(kw["block_names"])
            for k in _BLOCK_FLOATS:
                a = np.asarray(arrays[k], dtype=np.float64)
                kw[k] = a if a.ndim == 2 else (a.reshape(-1, D) if D else a.reshape(0, 0))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"stored gradvar result is incomplete or malformed ({type(e).__name__}: {e})") from None
        for k in ("n", "batches", "batch_size", "chunk", "seed"):
            kw[k] = int(kw[k])
        kw["lr"] = float(kw["lr"])
        kw["per_sample"], kw["signal"] = bool(kw["per_sample"]), bool(kw["signal"])
        return cls(**kw)

    def __eq__(self, other) -> bool:
        if not isinstance(other, GradVarResult):
            return NotImplemented
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                a, b = np.asarray(a), np.asarray(b)
                if a.shape != b.shape or a.dtype.kind != b.dtype.kind or \
                        not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def text(self) -> str:
        """A short table: settings, whole model, per module, depth curves, notes."""
        def f(v) -> str:
            v = float(v)
            return "-" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.3g}")

        lines = [f"gradvar: K={self.batches} mini-batches of B={self.batch_size} (of n={self.n}), "
                 f"lr {self.lr:g} ({self.lr_source}), {self.dtype}, bn {self.bn}",
                 f"non-finite: {self.nonfinite_batches} of {self.batches} batches, "
                 f"{self.nonfinite_samples} samples" + (f" (per-sample over {self.samples_used})"
                                                        if self.per_sample else " (per-sample off)")]
        agg = self.aggregates()
        if agg:
            lines.append(f"model: |G| {f(agg['grad_norm'])}  tr(Sigma_B) {f(agg['trace_cov'])}  SNR {f(agg['snr'])}"
                         f"  B_simple {f(agg['noise_scale'])}  tr(Sigma_1) {f(agg['per_sample_var'])}"
                         f"  B_simple(ps) {f(agg['noise_scale_ps'])}  |lr g|/|w| {f(agg['rel_update'])}")
        mods = self.by_module()
        w = max([len("module")] + [len(str(n) or "(model)") for n in mods["name"]])
        lines.append(f"{'module':<{w}} {'numel':>8} {'|G|':>9} {'trSig_B':>9} {'SNR':>9} {'B_simple':>9} "
                     f"{'trSig_1':>9} {'|lr g|/|w|':>10}")
        for i, name in enumerate(mods["name"]):
            lines.append(f"{(str(name) or '(model)'):<{w}} {int(mods['numel'][i]):>8} {f(mods['grad_norm'][i]):>9} "
                         f"{f(mods['trace_cov'][i]):>9} {f(mods['snr'][i]):>9} {f(mods['noise_scale'][i]):>9} "
                         f"{f(mods['per_sample_var'][i]):>9} {f(mods['rel_update'][i]):>10}")
        if self.block_names:
            src = (f"{len(self.signal_seeds)} initialisations" if self.signal_source == "rebuild"
                   else "the given model")
            lines.append(f"signal propagation ({src}): depth block act-var |dl/dh|")
            avm, avs, gm, gs = self.act_var_mean, self.act_var_std, self.block_grad_mean, self.block_grad_std
            bw = max(len(b) for b in self.block_names)
            for i, b in enumerate(self.block_names):
                lines.append(f"  {i + 1:>3} {b:<{bw}} {f(avm[i])} +- {f(avs[i])}  {f(gm[i])} +- {f(gs[i])}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
