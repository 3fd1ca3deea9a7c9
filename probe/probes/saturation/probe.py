"""The saturation probe registered with the probe framework (``probe saturation``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from probe.figures.saturation import saturation_by_group, saturation_figure
from probe.probes.registry import Figure, Measure, Probe, ProbeContext, register, summary_number
from probe.probes.saturation.api import check_options, saturation
from probe.probes.saturation.result import SaturationResult

__all__ = ["SaturationParams", "compute", "SATURATION_PROBE"]


@dataclass(frozen=True)
class SaturationParams:
    """Options of the saturation probe."""

    batch_size: int = field(default=128, metadata={
        "help": "inputs per forward pass; statistics are streamed over the chunks, so this only bounds memory"})
    bins: int = field(default=64, metadata={
        "help": "number of equal logit-histogram bins between -hist_max and hist_max (plus under/overflow)"})
    threshold: float = field(default=3.0, metadata={
        "help": "logit cut: the fraction of logits with |z| above it is reported"})
    hist_max: float = field(default=12.0, metadata={
        "help": "half-width of the logit histogram's range (logits beyond it are counted as under/overflow)"})

    def __post_init__(self):
        check_options(batch_size=self.batch_size, bins=self.bins, threshold=self.threshold, hist_max=self.hist_max)


def compute(ctx: ProbeContext, params: SaturationParams) -> SaturationResult:
    """The runner's adapter: :func:`saturation` on the context's model and inputs."""
    return saturation(ctx.model, ctx.x, batch_size=params.batch_size, bins=params.bins,
                      threshold=params.threshold, hist_max=params.hist_max, device=ctx.device,
                      progress=ctx.progress)


SATURATION_PROBE = register(Probe(
    name="saturation",
    help="how saturated every sigmoid / tanh / hard-sigmoid gate is: |z| > 3, outputs near 0/1, local gain",
    params=SaturationParams,
    result=SaturationResult,
    compute=compute,
    figure=saturation_figure,
    extra_figures=(Figure("per gate kind", saturation_by_group),),
    default_n=256,
    quick=({}, 128), full=({}, 512), smoke={"batch_size": 8}, order=10,
    measures=(Measure("sat_frac", "gate sat. frac", "optimisation", summary_number("model", "frac_logit_sat"),
                      "fraction of gate logits with |z| > 3 over every gate (none: the model has no gate)"),),
    description=("For every gate (models.Gate, nn.Sigmoid/Tanh/Hardsigmoid/Hardswish modules, functional "
                 "torch.sigmoid/tanh/F.hardsigmoid calls) the distribution of its input logits over the probe "
                 "inputs: the fraction with |z| > threshold, the fraction of outputs outside [0.05, 0.95] "
                 "(tanh: [-0.9, 0.9]), the mean local gain g'(z)/g'(0), logit mean/std and a histogram; "
                 "per gate, per stage (block), per gate kind and role, and model-wide."),
))
