"""The input-space interpolation probe registered with the probe framework (``probe interp``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from probe.checks import check_choice
from probe.figures.interp import (interp_across_training, interp_degree_figure, interp_paths_figure,
                                  interp_planes_figure)
from probe.probes.interp.api import check_options, interpolation_paths
from probe.probes.interp.result import InterpResult
from probe.probes.registry import Figure, Measure, Probe, ProbeContext, register, summary_number

__all__ = ["InterpParams", "compute", "INTERP_PROBE"]


@dataclass(frozen=True)
class InterpParams:
    """Options of ``probe interp``."""

    pairs: int = field(default=64, metadata={
        "help": "mixup paths between pairs of samples (same-class and different-class together)"})
    same_class_fraction: float = field(default=0.5, metadata={
        "help": "fraction of the pairs whose two samples share their label (the rest differ)"})
    steps: int = field(default=33, metadata={"help": "points t along each path, both ends included"})
    degree_tol: float = field(default=0.01, metadata={
        "help": "a degree fits when it leaves at most this fraction of the path's logit variation "
                "unexplained (relative least-squares residual)"})
    max_degree: int = field(default=12, metadata={
        "help": "highest polynomial degree tried (at most steps - 2); paths above it count as max_degree + 1"})
    triples: int = field(default=3, metadata={
        "help": "planes through three samples (decision regions); 0: none"})
    plane_resolution: int = field(default=41, metadata={"help": "grid points per axis of each plane"})
    plane_margin: float = field(default=0.25, metadata={
        "help": "each plane axis spans [-margin, 1 + margin] in the frame of the three samples"})
    batch_size: int = field(default=512, metadata={
        "help": "inputs per forward pass (path and grid points of many pairs together)"})
    dtype: str = field(default="float32", metadata={
        "help": "dtype of the forward passes", "choices": ("float32", "float64")})

    def __post_init__(self):
        check_options(pairs=self.pairs, same_class_fraction=self.same_class_fraction, steps=self.steps,
                      degree_tol=self.degree_tol, max_degree=self.max_degree, triples=self.triples,
                      plane_resolution=self.plane_resolution, plane_margin=self.plane_margin,
                      batch_size=self.batch_size)
        check_choice("dtype", self.dtype, ("float32", "float64"))


def compute(ctx: ProbeContext, p: InterpParams) -> InterpResult:
    """The runner's adapter: :func:`interpolation_paths` on the context's (test) samples."""
    return interpolation_paths(ctx.model, ctx.x, ctx.y, pairs=p.pairs, steps=p.steps,
                               same_class_fraction=p.same_class_fraction, degree_tol=p.degree_tol,
                               max_degree=p.max_degree, triples=p.triples, plane_resolution=p.plane_resolution,
                               plane_margin=p.plane_margin, seed=ctx.seed, batch_size=p.batch_size,
                               dtype=p.dtype, device=ctx.device, progress=ctx.progress)


INTERP_PROBE = register(Probe(
    name="interp",
    help="the function in input space: mixup paths between test samples (deviation from linear, degree) and planes",
    params=InterpParams, result=InterpResult, compute=compute, figure=interp_paths_figure,
    extra_figures=(Figure("decision regions on planes through three samples", interp_planes_figure),
                   Figure("fitted polynomial degree of the paths", interp_degree_figure),
                   Figure("across training", interp_across_training, series=True)),
    default_n=256, split="test",
    quick=({"pairs": 32, "steps": 17, "max_degree": 8, "triples": 1, "plane_resolution": 15}, 128), full=({}, 256),
    smoke={"pairs": 6, "steps": 9, "max_degree": 4, "triples": 1, "plane_resolution": 5}, order=60,
    measures=(Measure("path_deviation", "path deviation", "generalisation",
                      summary_number("all", "deviation_max_mean"),
                      "mean over mixup paths of the largest deviation of the logits from the chord (relative)"),
              Measure("path_degree", "path degree", "generalisation", summary_number("all", "degree_mean"),
                      "mean Chebyshev degree that fits the logits along a mixup path")),
    description=("The model's logits along straight mixup paths x(t) = (1-t) x_a + t x_b between seeded pairs of "
                 "test samples (same-class and different-class): deviation from the chord between the end "
                 "outputs relative to its length, the lowest Chebyshev degree fitting the path within degree_tol, "
                 "predicted-class changes beyond those the ends require, and the mixup loss barrier; plus the "
                 "predicted class and confidence over the plane through three samples. Per-group summary "
                 "numbers (same vs different class) compare two models; --checkpoint all draws them across "
                 "training."),
))
