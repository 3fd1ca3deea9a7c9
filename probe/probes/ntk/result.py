"""Options and result types of the NTK probe: kinds, Lanczos operators (the kernel methods are
in :mod:`._methods`), the frozen result dataclasses of the library functions and the stored
result of ``probe ntk`` (:class:`NTKProbeResult`)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from probe.errors import UserError
from probe.probes.ntk._util import _fro
from probe.probes.registry import ResultView, StoredResult

__all__ = ["NtkKind", "LanczosMethod", "NtkResult", "SpectrumResult", "LanczosResult", "NTKProbeResult"]


class NtkKind(str, Enum):
    """Which kernel to form (see the :mod:`probe.probes.ntk` docstring for the axis conventions)."""

    FULL = "full"
    """(N1*O, N2*O), sample-major; memory N1*N2*O^2 float64."""
    TRACE = "trace"
    """(N1, N2), summed over outputs; memory N1*N2 float64."""
    DIAGONAL = "diagonal"
    """(O, N1, N2), one kernel per output; memory O*N1*N2 float64."""


class LanczosMethod(str, Enum):
    """The operator :func:`ntk_topk_lanczos` iterates. N samples, O outputs, P parameters, s
    vectors per block, [FP] one sample's forward pass."""

    AUTO = "auto"
    """``gram`` when the model is built from Linear/Conv2d/BatchNorm layers (others through
    ``vmap(jacrev)``), treats samples independently and its Lanczos basis fits the budget;
    ``ntvp`` otherwise."""
    GRAM = "gram"
    """Block Lanczos on M = J^T J in parameter space (:class:`_GramOperator`): same non-zero
    eigenvalues as K = J J^T, and one pass over the data per block of s vectors -- one forward
    and O backward passes per sample, its layer rows R formed once in closed form, then two
    matrix products (R P^T, then w^T R). Time per block ~N*(1 + 2*O)*[FP] + 4*s*N*O*P (trace);
    memory (Krylov dim + 4*s) * O*P for the parameter-space basis plus a block of samples."""
    NTVP = "ntvp"
    """Block Lanczos on K in sample space, K v = J (J^T v) by VJPs then JVPs (:class:`_NtkOperator`):
    two passes over the data per block and O VJPs + O JVPs per vector and sample (trace), time
    ~5*s*N*O*[FP] per block; memory O(s*O*P + N*max_dim). Works for any model, also one that
    couples samples."""


@dataclass(frozen=True, eq=False, repr=False)
class NtkResult(ResultView):
    """An empirical NTK with the metadata needed to interpret and store it.

    ``kernel`` is float64 numpy, shaped per ``kind`` (:mod:`probe.probes.ntk` docstring).
    ``peak_memory_bytes`` is the planner's estimate of the probe's peak working set (kernel
    included), not a measurement.
    """

    kernel: np.ndarray
    kind: str
    method: str
    n1: int
    n2: int
    n_outputs: int
    n_params: int
    dtype: str
    wall_time_s: float
    peak_memory_bytes: int
    symmetric: bool
    n_blocks: int
    schedule: str = ""
    bn_mode: str = "eval"
    est_gflop: float = 0.0
    param_filter: str | None = None
    notes: tuple[str, ...] = ()

    _probe = "ntk"
    _frame_index = "rank"
    _frame_columns = ("eigenvalues", "residuals")
    _repr_keys = ("kind", "method", "spectrum.condition_number", "spectrum.effective_rank", "top_eigenvalues")

    def drawn(self) -> "NTKProbeResult":
        """The stored form with this kernel's spectrum (descending; of the summed kernel for
        ``diagonal``), as ``probe ntk`` draws it; a non-square kernel has no spectrum."""
        k = self.kernel.sum(0) if self.kind == NtkKind.DIAGONAL.value else self.kernel
        square = k.ndim == 2 and k.shape[0] == k.shape[1]
        ev = np.linalg.eigvalsh((k + k.T) / 2)[::-1].copy() if square else np.zeros(0)
        summary = {"n": self.n1, **self.summary(), "top_eigenvalues": [float(v) for v in ev[:10]]}
        return NTKProbeResult(summary, {"eigenvalues": ev})

    def full_axes(self) -> np.ndarray:
        """The ``full`` kernel as a (N1, O, N2, O) view."""
        if self.kind != NtkKind.FULL.value:
            raise UserError(f"full_axes() needs kind='full', this kernel is {self.kind!r}")
        return self.kernel.reshape(self.n1, self.n_outputs, self.n2, self.n_outputs)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for the store's ``.npz``."""
        return {"kernel": self.kernel}

    def summary(self) -> dict[str, Any]:
        """JSON-able metadata (everything but the kernel) plus the kernel's trace and norm."""
        k = self.kernel
        square = k.shape[-1] == k.shape[-2]
        return {
            "probe": "ntk", "kind": self.kind, "method": self.method, "n1": self.n1, "n2": self.n2,
            "n_outputs": self.n_outputs, "n_params": self.n_params, "dtype": self.dtype,
            "wall_time_s": self.wall_time_s, "peak_memory_bytes": self.peak_memory_bytes,
            "symmetric": self.symmetric, "n_blocks": self.n_blocks, "schedule": self.schedule,
            "bn_mode": self.bn_mode,
            "est_gflop": self.est_gflop, "param_filter": self.param_filter, "notes": list(self.notes),
            "kernel_shape": list(k.shape), "kernel_fro": _fro(k),
            "kernel_trace": float(np.trace(k, axis1=-2, axis2=-1).sum()) if square else None,
        }

    @classmethod
    def from_store(cls, summary: dict[str, Any], arrays: dict[str, np.ndarray]) -> "NtkResult":
        """Rebuild from :meth:`summary` / :meth:`to_arrays` output."""
        names = {f for f in cls.__dataclass_fields__} - {"kernel", "notes"}
        kw = {k: summary[k] for k in names if k in summary}
        return cls(kernel=np.asarray(arrays["kernel"], dtype=np.float64),
                   notes=tuple(summary.get("notes", ())), **kw)


@dataclass(frozen=True, eq=False, repr=False)
class SpectrumResult(ResultView):
    """Spectrum summaries of a symmetric PSD kernel (see :func:`ntk_spectrum`)."""

    eigenvalues: np.ndarray
    condition_number: float
    effective_rank: float
    participation_ratio: float
    alignment: float | None
    floor: float
    n_below_floor: int
    trace: float
    notes: tuple[str, ...] = ()

    _probe = "ntk"
    _frame_index = "rank"
    _frame_columns = ("eigenvalues", "residuals")
    _repr_keys = ("kind", "method", "spectrum.condition_number", "spectrum.effective_rank", "top_eigenvalues")

    def drawn(self) -> "NTKProbeResult":
        ev = np.asarray(self.eigenvalues, dtype=np.float64)
        summary = {"n": int(ev.size), "spectrum": self.summary(), "top_eigenvalues": [float(v) for v in ev[:10]]}
        return NTKProbeResult(summary, {"eigenvalues": ev})

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"eigenvalues": self.eigenvalues}

    def summary(self) -> dict[str, Any]:
        ev = self.eigenvalues
        return {"condition_number": self.condition_number, "effective_rank": self.effective_rank,
                "participation_ratio": self.participation_ratio, "alignment": self.alignment,
                "floor": self.floor, "n_below_floor": self.n_below_floor, "trace": self.trace,
                "lambda_max": float(ev[0]) if ev.size else None,
                "lambda_min": float(ev[-1]) if ev.size else None, "notes": list(self.notes)}

    @classmethod
    def from_store(cls, summary: dict[str, Any], arrays: dict[str, np.ndarray]) -> "SpectrumResult":
        names = ("condition_number", "effective_rank", "participation_ratio", "alignment", "floor",
                 "n_below_floor", "trace")
        return cls(eigenvalues=np.asarray(arrays["eigenvalues"], dtype=np.float64),
                   notes=tuple(summary.get("notes", ())), **{k: summary[k] for k in names})


@dataclass(frozen=True, eq=False, repr=False)
class LanczosResult(ResultView):
    """Top-k eigenpairs of an NTK found matrix-free (see :func:`ntk_topk_lanczos`).

    ``eigenvalues`` (k,) float64 descending; ``eigenvectors`` (N, k) or (N*O, k) sample-major, or
    None; ``residuals`` the Ritz residual norms ||K y - theta y|| (the eigenvalue error is at most
    this, and ~residual^2/gap for well separated eigenvalues).
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray | None
    residuals: np.ndarray
    n_matvecs: int
    converged: bool
    kind: str
    n: int
    n_outputs: int
    n_params: int
    dtype: str
    wall_time_s: float
    peak_memory_bytes: int
    block_vectors: int
    subspace_dim: int
    method: str = "ntvp"
    n_passes: int = 0
    notes: tuple[str, ...] = ()

    _probe = "ntk"
    _frame_index = "rank"
    _frame_columns = ("eigenvalues", "residuals")
    _repr_keys = ("kind", "method", "spectrum.condition_number", "spectrum.effective_rank", "top_eigenvalues")

    def drawn(self) -> "NTKProbeResult":
        ev = np.asarray(self.eigenvalues, dtype=np.float64)
        summary = {"n": self.n, "kind": self.kind, "method": "lanczos", "lanczos": self.summary(),
                   "top_eigenvalues": [float(v) for v in ev]}
        return NTKProbeResult(summary, {"eigenvalues": ev, "residuals": np.asarray(self.residuals)})

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"eigenvalues": self.eigenvalues, "residuals": self.residuals}
        if self.eigenvectors is not None:
            out["eigenvectors"] = self.eigenvectors
        return out

    def summary(self) -> dict[str, Any]:
        return {"probe": "ntk_lanczos", "kind": self.kind, "n": self.n, "n_outputs": self.n_outputs,
                "n_params": self.n_params, "dtype": self.dtype, "k": int(self.eigenvalues.size),
                "n_matvecs": self.n_matvecs, "converged": self.converged,
                "wall_time_s": self.wall_time_s, "peak_memory_bytes": self.peak_memory_bytes,
                "block_vectors": self.block_vectors, "subspace_dim": self.subspace_dim,
                "method": self.method, "n_passes": self.n_passes, "notes": list(self.notes)}


class NTKProbeResult(StoredResult):
    """The stored NTK result: the summary the catalog and ``--json`` show, and its arrays
    (``labels``, ``eigenvalues``, ``kernel`` unless Lanczos, ``el_n`` / ``el_predicted`` /
    ``el_measured`` with eigenlearning)."""

    _probe = "ntk"
    _frame_index = "rank"
    _frame_columns = ("eigenvalues", "residuals")
    _repr_keys = ("kind", "method", "spectrum.condition_number", "spectrum.effective_rank", "top_eigenvalues")

    @property
    def eigenvalues(self) -> np.ndarray:
        return np.asarray(self.array_data["eigenvalues"])

    def text(self) -> str:
        from probe.text import format_table

        r = self.data
        wall = r.get("wall_time_s", r.get("lanczos", {}).get("wall_time_s", 0.0)) or 0.0
        lines = [f"{r['kind']} NTK on {r['n']} {r.get('data', '')} samples, method {r['method']}, {wall:.1f}s"]
        if "lanczos" in r:
            lz = r["lanczos"]
            lines.append(f"Lanczos operator {lz['method']}: {lz['n_matvecs']} vectors in {lz['n_passes']} passes "
                         f"over the data, converged={lz['converged']}")
        lines.append("top eigenvalues: " + ", ".join(f"{v:.4g}" for v in r["top_eigenvalues"]))
        if "spectrum" in r:
            s = r["spectrum"]
            align = s["alignment"] if s["alignment"] is None else round(s["alignment"], 4)
            lines.append(f"condition number {s['condition_number']:.4g}   effective rank "
                         f"{s['effective_rank']:.4g}   kernel-target alignment {align}")
        if "eigenlearning" in r:
            lines.append("eigenlearning (kernel regression with this NTK, centred one-hot targets):")
            lines.append("  " + format_table(r["eigenlearning"]["rows"], [
                ("n", "n"), ("predicted_test_mse", "predicted test MSE"), ("measured_test_mse", "measured KRR"),
                ("measured_test_mse_std", "+-"), ("predicted_learnability", "pred. learnability"),
                ("measured_learnability", "meas. learnability")]).replace("\n", "\n  "))
        lines += [f"note: {note}" for note in r.get("notes", [])]
        return "\n".join(lines)
