"""The Hessian probe registered with the probe framework (``probe hessian``): extreme eigenvalues,
trace, spectral density and per-block curvature of the training loss, stored with the top
eigenvectors (the loss-surface probe uses them as directions)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from probe.checks import check_int
from probe.errors import UserError
from probe.figures.hessian import hessian_across_training, hessian_blocks_figure, hessian_figure
from probe.probes.hessian.result import HessianProbeResult
from probe.probes.registry import Figure, Measure, Probe, ProbeContext, register, summary_number

__all__ = ["HESSIAN_PROBE", "HessianParams", "compute"]


@dataclass(frozen=True)
class HessianParams:
    """Options of ``probe hessian``."""

    operator: str = field(default="hessian", metadata={
        "help": "curvature operator: hessian (H v by a double backward through the kept gradient graph) or ggn (Gauss-Newton J^T H_out J, PSD)",
        "choices": ("hessian", "ggn")})
    k: int = field(default=5, metadata={"help": "eigenvalues (and eigenvectors) to compute by block Lanczos"})
    which: str = field(default="largest", metadata={
        "help": "largest or smallest algebraic eigenvalues, or both (negative curvature)",
        "choices": ("largest", "smallest", "both")})
    trace: str = field(default="hutchinson", metadata={
        "help": "trace estimator with a fixed budget of products (none: skip); Hutch++ pays only when a few "
                "eigenvalues dominate the trace, which a network Hessian's flat, indefinite bulk does not",
        "choices": ("hutchpp", "hutchinson", "none")})
    trace_matvecs: int = field(default=100, metadata={"help": "Hessian-vector products of the trace estimate"})
    density: bool = field(default=True, metadata={"help": "spectral density by stochastic Lanczos quadrature"})
    density_probes: int = field(default=3, metadata={"help": "random probe vectors of the density"})
    density_steps: int = field(default=50, metadata={"help": "Lanczos steps per density probe"})
    blocks: str = field(default="", metadata={
        "help": "per-block results: stage, layer, or a glob/regex over parameter names (empty: none)"})
    batch_size: int = field(default=0, metadata={
        "help": "samples per mini-batch of each product (0: the whole subset at once)"})
    bn: str = field(default="eval", metadata={
        "help": "BatchNorm with its running statistics (eval) or batch statistics of the subset (train)",
        "choices": ("eval", "train")})
    dtype: str = field(default="float32", metadata={
        "help": "dtype of the products", "choices": ("float32", "float64")})
    eigenvectors: bool = field(default=True, metadata={
        "help": "store the top-k eigenvectors (P x k float32; the surface probe's hessian directions)"})

    def __post_init__(self):
        check_int("k", self.k, 1, 10_000)
        check_int("trace products", self.trace_matvecs, 3, 1_000_000)
        check_int("density probes", self.density_probes, 1, 10_000)
        check_int("density steps", self.density_steps, 2, 100_000)
        check_int("batch size", self.batch_size, 0, 10_000_000)


def compute(ctx: ProbeContext, p: HessianParams) -> HessianProbeResult:
    """The curvature of the cross-entropy loss on the context's inputs and labels."""
    from probe.probes.hessian.api import hessian_spectrum

    n = int(ctx.x.shape[0])
    res = hessian_spectrum(ctx.model, ctx.x, ctx.y, criterion="cross_entropy", operator=p.operator, k=p.k,
                           which=p.which, trace=None if p.trace == "none" else p.trace,
                           trace_matvecs=p.trace_matvecs, density=p.density, density_probes=p.density_probes,
                           density_steps=p.density_steps, blocks=p.blocks or None, n_samples=None,
                           batch_size=p.batch_size or None, bn=p.bn, dtype=p.dtype, device=ctx.device,
                           seed=ctx.seed, return_eigenvectors=p.eigenvectors, progress=ctx.progress)
    if not np.isfinite(res.loss):                     # hessian_spectrum refuses this; never store it
        raise UserError(f"the loss at this point is not finite ({res.loss}): nothing stored")
    return res.stored(model=ctx.model_name, epoch=ctx.epoch, data=ctx.data, n=n, lr=ctx.lr)


HESSIAN_PROBE = register(Probe(
    name="hessian", help="Hessian / Gauss-Newton spectrum: top-k, trace, density, per block",
    params=HessianParams, result=HessianProbeResult, compute=compute, figure=hessian_figure, default_n=200,
    extra_figures=(Figure("per-block curvature", hessian_blocks_figure),
                   Figure("sharpness across training vs 2/lr", hessian_across_training, series=True)),
    quick=({"k": 2, "trace_matvecs": 20, "density": False}, 64), full=({"k": 5, "trace_matvecs": 100}, 200),
    smoke={"k": 2, "trace_matvecs": 6, "density_probes": 1, "density_steps": 6}, order=30,
    measures=(Measure("lambda_max", "Hessian l_max", "optimisation", summary_number("lambda_max"),
                      "largest Hessian eigenvalue of the mean cross-entropy"),
              Measure("hessian_trace", "Hessian trace", "optimisation", summary_number("trace", "estimate"),
                      "Hutchinson estimate of the Hessian trace")),
    description="Curvature of the cross-entropy loss over n fixed, seeded probe samples (200 by default, as "
                "PyHessian's example): the k largest (or smallest) eigenvalues and eigenvectors by block Lanczos "
                "over Hessian-vector products (a double backward through the kept gradient graph), the trace by Hutch++ or Hutchinson with a fixed "
                "budget and a standard error, the spectral density by stochastic Lanczos quadrature, and the "
                "same per parameter block. With --checkpoint all, lambda_max across training is drawn against "
                "the run's own 2/lr (edge of stability)."))
