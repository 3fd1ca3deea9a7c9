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
from probe.probes.registry import StoredResult

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


@dataclass(frozen=True, eq=False)
class HessianResult:
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
                "batch_size": self.batch_size, "bn": self.bn, "dtype": self.dtype, "n_hvps": self.n_hvps,
                "wall_time_s": self.wall_time_s, "seed": self.seed, "converged": self.converged,
                "notes": list(self.notes)}


class HessianProbeResult(StoredResult):
    """The stored Hessian result: the summary the catalog and ``--json`` show (``lambda_max``,
    ``top_eigenvalues``, ``trace``, ``blocks``, ``loss``, ``lr``, ...) and its arrays
    (``eigenvalues``, ``smallest_eigenvalues``, ``eigenvectors`` (P, k) float32, ``residuals``,
    ``density_grid`` / ``density``, ``density_nodes`` / ``density_weights`` (probes x steps))."""

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
