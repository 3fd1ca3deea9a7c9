"""Result types of the Hessian probe: extreme eigenpairs, per-block results, the whole result of
:func:`~probe.probes.hessian.hessian_spectrum`, and the stored result of ``probe hessian``
(:class:`HessianProbeResult`).

All arrays are numpy: eigenvalues, residuals, traces and densities in float64; eigenvectors
(P, k) in float32 (P the number of selected parameter elements, flattened in the model's
``named_parameters`` order; a float64 copy of millions of elements per vector would buy nothing
a plot or a loss-surface direction needs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from probe.linalg import DensityEstimate, TraceEstimate
from probe.probes.registry import ResultView, StoredResult

__all__ = ["Eigenpairs", "BlockResult", "HessianResult", "HessianProbeResult"]


@dataclass(frozen=True, eq=False)
class Eigenpairs:
    """The k largest or smallest algebraic eigenpairs of a curvature operator.

    ``which`` ``"largest"`` (``eigenvalues`` descending) or ``"smallest"`` (ascending);
    ``eigenvalues`` (k,) float64; ``eigenvectors`` (P, k) float32 orthonormal columns, or None;
    ``residuals`` (k,) the Ritz residual norms ||A y - theta y|| (each eigenvalue is within its
    residual of a true one); ``converged`` every residual <= tol * |theta|_max; ``n_matvecs``
    products the solver used, ``dim`` the Krylov dimension it reached; ``notes`` the solver's.
    """

    which: str
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray | None
    residuals: np.ndarray
    converged: bool
    n_matvecs: int
    dim: int
    tol: float
    notes: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        return {"which": self.which, "eigenvalues": self.eigenvalues.tolist(),
                "max_residual": float(self.residuals.max()) if self.residuals.size else 0.0,
                "converged": self.converged, "n_matvecs": self.n_matvecs, "dim": self.dim, "tol": self.tol}


@dataclass(frozen=True, eq=False)
class BlockResult:
    """The diagonal block of the curvature operator for one group of parameters (the others held
    fixed): its extreme eigenvalues and trace.

    ``name`` the block's name; ``params`` its parameter names; ``n_params`` its size P_b;
    ``largest`` / ``smallest`` (k_b,) float64 eigenvalues, descending / ascending, with
    k_b = min(k, P_b) (empty when not asked for); ``trace`` and ``trace_stderr`` (None without a
    trace estimate); ``converged`` all its Lanczos runs converged; ``n_matvecs`` its products.
    """

    name: str
    params: tuple[str, ...]
    n_params: int
    largest: np.ndarray
    smallest: np.ndarray
    trace: float | None
    trace_stderr: float | None
    converged: bool
    n_matvecs: int

    @property
    def eigenvalues(self) -> np.ndarray:
        """The largest eigenvalues when computed, else the smallest."""
        return self.largest if self.largest.size else self.smallest

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "n_params": self.n_params, "largest": self.largest.tolist(),
                "smallest": self.smallest.tolist(), "trace": self.trace, "trace_stderr": self.trace_stderr,
                "converged": self.converged, "n_matvecs": self.n_matvecs}


@dataclass(frozen=True, eq=False, repr=False)
class HessianResult(ResultView):
    """What :func:`probe.probes.hessian.hessian_spectrum` measured at one point of the loss.

    ``operator`` ``"hessian"`` or ``"ggn"``; ``criterion`` its name; ``largest`` / ``smallest``
    the extreme eigenpairs asked for (:class:`Eigenpairs`, None when not asked); ``trace`` a
    :class:`~probe.linalg.TraceEstimate` (None when not asked);
    ``density`` a :class:`~probe.linalg.DensityEstimate` (None when not
    asked); ``blocks`` {block name: :class:`BlockResult`} in parameter order (empty without
    blocks); ``loss`` the mean loss over the subset at the probe point; ``n_params`` P;
    ``n_samples`` and ``batch_size`` of the fixed data subset; ``bn`` the BatchNorm mode;
    ``dtype`` of the products; ``n_hvps`` all products (Hessian- or GGN-vector) of the run;
    ``wall_time_s``; ``seed``; ``notes`` anything the caller should know (convergence,
    fallbacks, the BatchNorm and train-mode handling).

    Shortcuts: ``eigenvalues`` / ``eigenvectors`` / ``residuals`` of ``largest`` (of ``smallest``
    when only those were asked), ``converged`` (all eigen-solves), ``trace_estimate``,
    ``trace_stderr``, ``trace_matvecs``, ``density_grid``, ``density_values``, ``density_nodes``,
    ``density_weights``.
    """

    operator: str
    criterion: str
    which: str
    k: int
    largest: Eigenpairs | None
    smallest: Eigenpairs | None
    trace: TraceEstimate | None
    density: DensityEstimate | None
    blocks: Mapping[str, BlockResult]
    loss: float
    n_params: int
    n_samples: int
    batch_size: int
    bn: str
    dtype: str
    n_hvps: int
    wall_time_s: float
    seed: int
    notes: tuple[str, ...] = field(default=())
    #: the samples the caller gave (``n_samples`` of them were used); None when not known
    n_available: int | None = None

    _probe = "hessian"
    _frame_index = "rank"
    _frame_columns = ("eigenvalues", "residuals", "smallest_eigenvalues")
    _repr_keys = ("lambda_max", "lambda_min", "trace=trace.estimate", "loss", "n_params")

    # -- shortcuts --------------------------------------------------------------------------------

    @property
    def _main(self) -> Eigenpairs | None:
        return self.largest if self.largest is not None else self.smallest

    @property
    def eigenvalues(self) -> np.ndarray:
        return self._main.eigenvalues if self._main is not None else np.zeros(0)

    @property
    def eigenvectors(self) -> np.ndarray | None:
        return self._main.eigenvectors if self._main is not None else None

    @property
    def residuals(self) -> np.ndarray:
        return self._main.residuals if self._main is not None else np.zeros(0)

    @property
    def converged(self) -> bool:
        runs = [e for e in (self.largest, self.smallest) if e is not None]
        return all(e.converged for e in runs) and all(b.converged for b in self.blocks.values())

    @property
    def trace_estimate(self) -> float | None:
        return None if self.trace is None else self.trace.estimate

    @property
    def trace_stderr(self) -> float | None:
        return None if self.trace is None else self.trace.stderr

    @property
    def trace_matvecs(self) -> int:
        return 0 if self.trace is None else self.trace.n_matvecs

    @property
    def density_grid(self) -> np.ndarray | None:
        return None if self.density is None else self.density.grid

    @property
    def density_values(self) -> np.ndarray | None:
        return None if self.density is None else self.density.density

    @property
    def density_nodes(self) -> np.ndarray | None:
        return None if self.density is None else self.density.nodes

    @property
    def density_weights(self) -> np.ndarray | None:
        return None if self.density is None else self.density.weights

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers for a catalog row (no vectors, no density arrays)."""
        return {"operator": self.operator, "criterion": self.criterion, "which": self.which, "k": self.k,
                "largest": None if self.largest is None else self.largest.summary(),
                "smallest": None if self.smallest is None else self.smallest.summary(),
                "trace": None if self.trace is None else self.trace.summary(),
                "density": None if self.density is None else self.density.summary(),
                "blocks": {n: b.summary() for n, b in self.blocks.items()},
                "loss": self.loss, "n_params": self.n_params, "n_samples": self.n_samples,
                "n_available": self.n_available,
                "batch_size": self.batch_size, "bn": self.bn, "dtype": self.dtype, "n_hvps": self.n_hvps,
                "wall_time_s": self.wall_time_s, "seed": self.seed, "converged": self.converged,
                "notes": list(self.notes)}

    def stored(self, **context: Any) -> "HessianProbeResult":
        """This result in the stored form of ``probe hessian`` (what the catalog keeps and the
        figures draw); ``context`` (``model``, ``epoch``, ``data``, ``n``, ``lr``) heads its summary."""
        arrays: dict[str, np.ndarray] = {}
        summary: dict = {"model": None, "epoch": None, "data": "", "n": self.n_samples, "lr": None,
                         **({} if self.n_available in (None, self.n_samples) else {"n_available": self.n_available}),
                         **context,
                         "operator": self.operator, "criterion": self.criterion, "loss": self.loss,
                         "n_params": self.n_params, "bn": self.bn, "dtype": self.dtype, "n_hvps": self.n_hvps,
                         "wall_time_s": self.wall_time_s, "converged": self.converged, "seed": self.seed,
                         "batch_size": self.batch_size}
        if self.largest is not None:
            ev = np.asarray(self.largest.eigenvalues, dtype=np.float64)
            arrays["eigenvalues"] = ev
            arrays["residuals"] = np.asarray(self.largest.residuals, dtype=np.float64)
            summary["top_eigenvalues"] = [float(v) for v in ev]
            summary["lambda_max"] = float(ev[0])
            summary["largest"] = self.largest.summary()
            if self.largest.eigenvectors is not None:
                arrays["eigenvectors"] = np.asarray(self.largest.eigenvectors, dtype=np.float32)
        if self.smallest is not None:
            ev = np.asarray(self.smallest.eigenvalues, dtype=np.float64)
            arrays["smallest_eigenvalues"] = ev
            summary["smallest_eigenvalues"] = [float(v) for v in ev]
            summary["lambda_min"] = float(ev[0])
            summary["smallest"] = self.smallest.summary()
            if self.largest is None and self.smallest.eigenvectors is not None:
                arrays["eigenvectors"] = np.asarray(self.smallest.eigenvectors, dtype=np.float32)
        if self.trace is not None:
            summary["trace"] = {"method": self.trace.method, "estimate": float(self.trace.estimate),
                                "stderr": float(self.trace.stderr), "n_matvecs": int(self.trace.n_matvecs)}
        if self.density is not None:
            d = self.density
            arrays["density_grid"] = np.asarray(d.grid, dtype=np.float64)
            arrays["density"] = np.asarray(d.density, dtype=np.float64)
            arrays["density_nodes"] = np.asarray(d.nodes, dtype=np.float64)
            arrays["density_weights"] = np.asarray(d.weights, dtype=np.float64)
            nodes, weights = np.asarray(d.nodes), np.asarray(d.weights)
            used = nodes[weights > 0] if (weights > 0).any() else nodes.reshape(-1)    # rows are 0-padded
            summary["density"] = {"probes": int(nodes.shape[0]), "steps": int(np.max(d.steps)),
                                  "sigma": float(d.sigma), "n_matvecs": int(d.n_matvecs),
                                  "support": [float(used.min()), float(used.max())],
                                  "trace": float(d.trace), "trace_stderr": float(d.trace_stderr)}
        if self.blocks:
            rows = []
            for name, b in self.blocks.items():
                rows.append({"name": name, "n_params": int(b.n_params),
                             "lambda_max": float(b.largest[0]) if b.largest.size else None,
                             "lambda_min": float(b.smallest[0]) if b.smallest.size else None,
                             "largest": [float(v) for v in b.largest], "smallest": [float(v) for v in b.smallest],
                             "trace": None if b.trace is None else {"estimate": float(b.trace),
                                                                    "stderr": float(b.trace_stderr or 0.0)},
                             "trace_estimate": b.trace, "trace_stderr": b.trace_stderr,
                             "converged": bool(b.converged), "n_matvecs": int(b.n_matvecs)})
            summary["blocks"] = rows
        summary["notes"] = list(self.notes)
        return HessianProbeResult(summary, arrays)

    def drawn(self) -> "HessianProbeResult":
        return self.stored()


class HessianProbeResult(StoredResult):
    """The stored Hessian result: the summary the catalog and ``--json`` show (``lambda_max``,
    ``top_eigenvalues``, ``trace``, ``blocks``, ``loss``, ``lr``, ...) and its arrays
    (``eigenvalues``, ``smallest_eigenvalues``, ``eigenvectors`` (P, k) float32, ``residuals``,
    ``density_grid`` / ``density``, ``density_nodes`` / ``density_weights`` (probes x steps))."""

    _probe = "hessian"
    _frame_index = "rank"
    _frame_columns = ("eigenvalues", "residuals", "smallest_eigenvalues")
    _repr_keys = ("lambda_max", "lambda_min", "trace=trace.estimate", "loss", "n_params")

    @property
    def eigenvalues(self) -> np.ndarray:
        return np.asarray(self.array_data.get("eigenvalues", np.zeros(0)))

    @property
    def eigenvectors(self) -> np.ndarray | None:
        v = self.array_data.get("eigenvectors")
        return None if v is None else np.asarray(v)

    def text(self) -> str:
        from probe.text import format_table

        r = self.data
        lines = [f"{r['operator']} of the {r['criterion']} loss on {r['n']} {r.get('data', '')} samples "
                 f"(loss {r['loss']:.5g}, P={r['n_params']}, BatchNorm {r['bn']}): {r['n_hvps']} products, "
                 f"{r['wall_time_s']:.1f}s"]
        if r.get("top_eigenvalues"):
            lines.append("largest eigenvalues: " + ", ".join(f"{v:.5g}" for v in r["top_eigenvalues"]))
        if r.get("smallest_eigenvalues"):
            lines.append("smallest eigenvalues: " + ", ".join(f"{v:.5g}" for v in r["smallest_eigenvalues"]))
        if r.get("lr"):
            lines.append(f"2/lr = {2.0 / r['lr']:.5g} (edge of stability) at lr {r['lr']:.3g}")
        tr = r.get("trace")
        if tr:
            lines.append(f"trace ({tr['method']}, {tr['n_matvecs']} products): {tr['estimate']:.5g} "
                         f"+- {tr['stderr']:.2g}")
        if r.get("density"):
            d = r["density"]
            lines.append(f"density: SLQ, {d['probes']} probes x {d['steps']} steps, support "
                         f"[{d['support'][0]:.4g}, {d['support'][1]:.4g}]")
        if r.get("blocks"):
            lines.append("per block:")
            lines.append("  " + format_table(r["blocks"], [
                ("name", "block"), ("n_params", "params"), ("lambda_max", "lambda_max"),
                ("lambda_min", "lambda_min"), ("trace_estimate", "trace"), ("trace_stderr", "+-")]
            ).replace("\n", "\n  "))
        lines += [f"note: {note}" for note in r.get("notes", [])]
        return "\n".join(lines)
