"""The loss-surface probe registered with the probe framework (``probe surface``): loss and accuracy
over 1D / 2D weight-space directions (random filter-normalised, top Hessian eigenvectors, PCA of
the training trajectory, or towards another checkpoint / run) on the fixed probe subset."""
from __future__ import annotations

from dataclasses import dataclass, field

from probe.checks import check_int, check_number
from probe.errors import UserError
from probe.figures.surface import surface_3d, surface_curves, surface_figure, surface_trajectory
from probe.probes.registry import Figure, Measure, Probe, ProbeContext, register
from probe.probes.surface._directions import NORMS
from probe.probes.surface._grid import parse_grid
from probe.probes.surface.result import SurfaceProbeResult

__all__ = ["SURFACE_PROBE", "SurfaceParams", "compute"]

DIRECTIONS = ("random", "hessian", "pca", "towards")


@dataclass(frozen=True)
class SurfaceParams:
    """Options of ``probe surface``."""

    directions: str = field(default="random", metadata={
        "help": "random (Gaussian, normalised against the weights), hessian (top eigenvectors: a stored probe "
                "hessian row of this target, else computed), pca (of the run's checkpoint trajectory) or towards "
                "(1D, to another checkpoint or run)", "choices": DIRECTIONS})
    dims: int = field(default=2, metadata={"help": "a 1D curve or a 2D surface", "choices": (1, 2)})
    grid: str = field(default="-1:1:51", metadata={
        "help": "START:STOP:COUNT for both axes, or two of them separated by a comma (first axis, second axis)"})
    norm: str = field(default="filter", metadata={
        "help": "scaling of random directions: per filter (Li et al.), per layer, or none", "choices": NORMS})
    include_bn: bool = field(default=False, metadata={
        "help": "move biases and BatchNorm / normalisation parameters too (random and pca; default: held fixed)"})
    direction_seed: int = field(default=123, metadata={"help": "seed of the random directions (Li et al.: 123)"})
    to: str = field(default="", metadata={
        "help": "towards: an epoch of this run, init or last (with to_run: of that run; default its last)"})
    to_run: str = field(default="", metadata={"help": "towards: another run of the same architecture"})
    bn: str = field(default="eval", metadata={
        "help": "BatchNorm with the target's running statistics (eval) or re-estimated at every point by a "
                "train-mode pass over the subset (recalibrate: twice the cost, point by point)",
        "choices": ("eval", "recalibrate")})
    vectorize: str = field(default="auto", metadata={
        "help": "grid points batched by vmap over functional_call, one at a time (loop), or by the measured rule "
                "(auto: vmap while one point's forward pass is small)", "choices": ("auto", "vmap", "loop")})
    memory_gb: float = field(default=0.0, metadata={
        "help": "memory budget in GiB of the evaluation (samples per pass, points per vmap call; 0: 2 GiB on the "
                "CPU; on CUDA 0.75 of the free device memory, at most 64 GiB)"})
    chunk: int = field(default=0, metadata={
        "help": "grid points per saved chunk, the unit of resuming (0: one vmap call, or 16 points)"})
    dtype: str = field(default="float32", metadata={
        "help": "dtype of the forward passes", "choices": ("float32", "float64")})

    def __post_init__(self):
        parse_grid(self.grid, self.dims)
        check_int("direction seed", self.direction_seed, 0, 2 ** 63 - 1)
        check_number("memory budget (GB)", self.memory_gb, 0.0, 1e5)
        check_int("chunk", self.chunk, 0, 10 ** 7)
        if self.directions == "towards":
            if self.dims != 1:
                raise UserError("towards is one direction (this point to another): use dims 1")
            if not (self.to or self.to_run):
                raise UserError("towards needs the other point: to (an epoch of this run, init or last) or "
                                "to_run (another run)")
        elif self.to or self.to_run:
            raise UserError(f"to and to_run apply to towards directions, not {self.directions}")
        if self.bn == "recalibrate" and self.vectorize == "vmap":
            raise UserError("BatchNorm re-estimation (bn recalibrate) runs point by point; use vectorize auto or loop")


def compute(ctx: ProbeContext, p: SurfaceParams) -> SurfaceProbeResult:
    """The loss surface of the cross-entropy on the context's inputs and labels."""
    from probe.probes.surface._sources import directions_for
    from probe.probes.surface.api import loss_surface

    dirs = directions_for(ctx, p)
    res = loss_surface(ctx.model, ctx.x, ctx.y, dirs, p.grid, bn=p.bn, vectorize=p.vectorize,
                       memory_gb=p.memory_gb or None, chunk=p.chunk, dtype=p.dtype, device=ctx.device,
                       partial=ctx.partial, progress=ctx.progress)
    summary = {"model": ctx.model_name, "epoch": ctx.epoch, "data": ctx.data, "n": int(ctx.x.shape[0]),
               "lr": ctx.lr, **res.summary()}
    return SurfaceProbeResult(summary, res.arrays())



def _rise(summary: dict, result: SurfaceProbeResult) -> float | None:
    return result.mean_rise(0.5)


SURFACE_PROBE = register(Probe(
    name="surface", help="loss and accuracy over 1D / 2D weight-space directions (random, hessian, pca, towards)",
    params=SurfaceParams, result=SurfaceProbeResult, compute=compute, figure=surface_figure, default_n=256,
    extra_figures=(Figure("3D surface", surface_3d), Figure("1D curves", surface_curves),
                   Figure("training trajectory (pca)", surface_trajectory)),
    quick=({"grid": "-1:1:9"}, 128), full=({"grid": "-1:1:21"}, 256), smoke={"grid": "-1:1:3"}, order=40,
    measures=(Measure("surface_rise", "surface rise", "optimisation", _rise,
                      "mean loss rise over the |a|, |b| <= 0.5 square of a filter-normalised random plane"),),
    description="Loss and top-1 accuracy of the cross-entropy over a grid theta0 + a d1 + b d2 in weight space, on "
                "n fixed, seeded probe samples (256 by default) kept on the device. Li et al.'s defaults: grid "
                "-1:1:51 on both axes, Gaussian directions normalised filter by filter against the weights, biases "
                "and BatchNorm parameters held fixed, BatchNorm in eval mode, seed 123. Stored with every surface: "
                "the centre loss (the model's own loss on the subset), direction norms and their cosine, and the "
                "loss scale; non-finite points are NaN (gaps in the figures). Cost: one forward pass over the n "
                "samples per grid point (2601 for 51 x 51), twice that with bn recalibrate. Each finished chunk "
                "of points is saved, so an interrupted job resumes where it stopped."))
