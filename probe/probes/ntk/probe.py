"""The NTK probe: empirical kernel spectra of a target and eigenlearning predictions, registered
with the probe framework (``probe ntk``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from probe.checks import check_int, check_number
from probe.figures.ntk import eigenlearning_figure, ntk_across_training, ntk_spectrum_figure
from probe.probes.ntk._methods import KERNEL_METHODS
from probe.probes.ntk.result import NTKProbeResult
from probe.probes.registry import Figure, Measure, Probe, ProbeContext, register, summary_number

__all__ = ["NTKParams", "compute"]


@dataclass(frozen=True)
class NTKParams:
    """Options of ``probe ntk``."""

    kind: str = field(default="trace", metadata={
        "help": "trace (N x N, summed over outputs), full (NO x NO) or diagonal (O x N x N)",
        "choices": ("trace", "full", "diagonal")})
    method: str = field(default="auto", metadata={
        "help": "kernel method, or lanczos for matrix-free top-k eigenvalues",
        "choices": ("auto", *KERNEL_METHODS, "lanczos")})
    topk: int = field(default=10, metadata={"help": "eigenvalues to print / compute with lanczos"})
    lanczos_operator: str = field(default="auto", metadata={
        "help": "with method lanczos: gram (parameter space, one data pass per block) or ntvp (VJP/JVP "
                "products); auto picks gram when it applies and fits the memory budget",
        "choices": ("auto", "gram", "ntvp")})
    memory_gb: float = field(default=0.0, metadata={
        "help": "memory budget in GiB for the kernel computation (0: 2 GiB on the CPU; on CUDA 0.75 of the free "
                "device memory, at most 64 GiB)"})
    eigenlearning: bool = field(default=True, metadata={
        "help": "eigenlearning predictions and the kernel-regression check (trace kernels)"})
    trials: int = field(default=10, metadata={"help": "kernel-regression trials per training-set size"})
    dtype: str = field(default="float64", metadata={"help": "kernel dtype", "choices": ("float32", "float64")})
    output: str = field(default="", metadata={
        "help": "for a model returning a dict / ModelOutput: the key of the tensor to use (default: "
                "'logits' if present, else its only tensor; of a tuple the first element)"})

    def __post_init__(self):
        check_int("topk", self.topk, 1, 100_000)
        check_int("trials", self.trials, 1, 10_000)
        check_number("memory budget (GiB)", self.memory_gb, 0.0, 1e6)


def _eigenlearning(K: np.ndarray, y: np.ndarray, num_classes: int, ns: list[int], trials: int, seed: int) -> dict:
    from probe.eigenlearning import kernel_regression_mse, predict_from_kernel

    Y = np.eye(num_classes)[y] - 1.0 / num_classes  # centred one-hot (M, C)
    curve = predict_from_kernel(K, Y, ns)
    rows = []
    for i, n in enumerate(ns):
        meas = kernel_regression_mse(K, Y, n, trials=trials, rng=seed + i)
        rows.append({"n": int(n), "predicted_test_mse": float(curve.test_mse[i]),
                     "measured_test_mse": meas.test_mse, "measured_test_mse_std": meas.test_mse_std,
                     "predicted_learnability": float(curve.target_learnability[i]),
                     "measured_learnability": meas.learnability, "kappa": float(curve.kappa[i]),
                     "e0": float(curve.e0[i])})
    return {"targets": "centred one-hot", "rows": rows}


def compute(ctx: ProbeContext, p: NTKParams) -> NTKProbeResult:
    """Kernel (or Lanczos top-k) on the context's inputs, its spectrum and eigenlearning."""
    from probe.probes.ntk.api import empirical_ntk, ntk_spectrum, ntk_topk_lanczos

    x, n = ctx.x, int(ctx.x.shape[0])
    y = ctx.y.detach().cpu()                    # labels on the host (a library caller may pass CUDA ones)
    budget = int(p.memory_gb * 2 ** 30) or None          # None: the device's default (runtime.memory_budget)
    arrays: dict[str, np.ndarray] = {"labels": y.numpy()}
    summary: dict = {"model": ctx.model_name, "epoch": ctx.epoch, "data": ctx.data, "n": n, "kind": p.kind}
    if p.method == "lanczos":
        lz = ntk_topk_lanczos(ctx.model, x, k=p.topk, kind=p.kind, method=p.lanczos_operator, dtype=p.dtype,
                              device=ctx.device, memory_budget_bytes=budget, seed=ctx.seed,
                              output=p.output or None, progress=ctx.progress)
        arrays["eigenvalues"] = np.asarray(lz.eigenvalues)
        summary.update({"method": "lanczos", "lanczos": lz.summary(),
                        "top_eigenvalues": [float(v) for v in lz.eigenvalues[:p.topk]]})
        if p.eigenlearning:
            summary["notes"] = ["eigenlearning needs the whole spectrum: skipped with method lanczos"]
        return NTKProbeResult(summary, arrays)
    res = empirical_ntk(ctx.model, x, kind=p.kind, method=p.method, memory_budget_bytes=budget, dtype=p.dtype,
                        device=ctx.device, output=p.output or None, progress=ctx.progress)
    K = res.kernel
    summary.update(res.summary())
    spec_kernel = K if p.kind != "diagonal" else K.sum(0)
    yy = np.eye(ctx.num_classes)[y.numpy()] - 1.0 / ctx.num_classes if p.kind != "full" else None
    spec = ntk_spectrum(spec_kernel, yy)
    summary["spectrum"] = spec.summary()
    summary["top_eigenvalues"] = [float(v) for v in spec.eigenvalues[:p.topk]]
    arrays["kernel"] = K
    arrays["eigenvalues"] = spec.eigenvalues
    if p.eigenlearning and p.kind == "trace":
        Kper = K / res.n_outputs  # per-output kernel: the trace kernel sums O output kernels
        ns = sorted({max(2, n // 8), max(2, n // 4), max(2, n // 2)})
        el = _eigenlearning(Kper, y.numpy(), ctx.num_classes, ns, p.trials, ctx.seed)
        summary["eigenlearning"] = el
        arrays["el_n"] = np.array([r["n"] for r in el["rows"]])
        arrays["el_predicted"] = np.array([r["predicted_test_mse"] for r in el["rows"]])
        arrays["el_measured"] = np.array([r["measured_test_mse"] for r in el["rows"]])
    return NTKProbeResult(summary, arrays)



def _last_eigenlearning(key: str) -> Callable[[dict, Any], float | None]:
    """A headline getter: ``key`` of the last (largest n) eigenlearning row."""
    def get(summary: dict, result: Any) -> float | None:
        rows = (summary.get("eigenlearning") or {}).get("rows") or []
        v = rows[-1].get(key) if rows else None
        return float(v) if isinstance(v, (int, float)) else None
    return get


NTK_PROBE = register(Probe(
    name="ntk", help="empirical NTK spectrum and eigenlearning predictions", params=NTKParams,
    result=NTKProbeResult, compute=compute, figure=ntk_spectrum_figure, default_n=128,
    extra_figures=(Figure("condition number and effective rank across training", ntk_across_training, series=True),
                   Figure("eigenlearning: predicted vs measured", eigenlearning_figure)),
    quick=({"trials": 4}, 32), full=({"trials": 10}, 128), smoke={"trials": 2}, order=50,
    measures=(Measure("ntk_cond", "NTK cond", "generalisation", summary_number("spectrum", "condition_number"),
                      "condition number of the trace NTK on the probe inputs"),
              Measure("ntk_eff_rank", "NTK eff. rank", "generalisation", summary_number("spectrum", "effective_rank"),
                      "effective rank (exp of the spectral entropy) of the trace NTK"),
              Measure("el_pred_mse", "EL pred. MSE", "generalisation", _last_eigenlearning("predicted_test_mse"),
                      "eigenlearning prediction of kernel regression's test MSE with the model's NTK"),
              Measure("el_meas_mse", "KRR meas. MSE", "generalisation", _last_eigenlearning("measured_test_mse"),
                      "measured test MSE of kernel regression with the same kernel")),
    description="Empirical neural tangent kernel of the target on n probe inputs: its spectrum (float64), "
                "condition number, effective rank, kernel-target alignment, and eigenlearning predictions of "
                "kernel regression checked against kernel regression with the same kernel."))
