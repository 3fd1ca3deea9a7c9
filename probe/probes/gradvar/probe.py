"""The gradient-variance probe registered with the probe framework (``probe gradvar``); its options
are :class:`GradVarParams` (:mod:`._common`: the options of :func:`gradient_variance` too)."""
from probe.figures.gradvar import gradvar_figure
from probe.probes.gradvar._common import GradVarParams
from probe.probes.gradvar.api import gradient_variance
from probe.probes.gradvar.result import GradVarResult
from probe.probes.registry import Measure, Probe, ProbeContext, register, summary_number

__all__ = ["GradVarParams", "compute", "GRADVAR_PROBE"]


def compute(ctx: ProbeContext, params: GradVarParams) -> GradVarResult:
    """The runner's adapter: ``ctx.lr`` (else ``params.lr``), ``ctx.rebuild`` for the depth curves."""
    return gradient_variance(ctx.model, ctx.x, ctx.y, params, seed=ctx.seed, lr=ctx.lr, rebuild=ctx.rebuild,
                             at_init=ctx.at_init, device=ctx.device, progress=ctx.progress)


GRADVAR_PROBE = register(Probe(
    name="gradvar",
    help="per-layer gradient variance, SNR, noise scale and relative update size; depth curves at init",
    params=GradVarParams, result=GradVarResult, compute=compute, figure=gradvar_figure, default_n=512,
    quick=({"batches": 4, "batch_size": 32, "seeds": 2}, 128), full=({}, 512),
    smoke={"batches": 2, "batch_size": 4, "seeds": 2, "chunk": 8}, order=20,
    measures=(Measure("grad_snr", "grad SNR", "optimisation", summary_number("aggregates", "snr"),
                      "|mean gradient|^2 / trace of the mini-batch gradient covariance"),
              Measure("rel_update", "rel. update", "optimisation", summary_number("aggregates", "rel_update"),
                      "lr x rms mini-batch gradient / weight norm: the step size relative to the weights")),
    description=("Over K seeded mini-batches (without replacement): per layer the mean gradient norm |G|, the "
                 "trace of the mini-batch gradient covariance tr(Sigma_B), SNR |G|^2/tr(Sigma_B), the gradient "
                 "noise scale B_simple = B tr(Sigma_B)/|G|^2 (McCandlish et al. 2018) and the relative update "
                 "size lr |g|/|w|; the per-sample gradient variance tr(Sigma_1) over all n samples (closed form for "
                 "Linear/Conv2d/BatchNorm, vmap(grad) otherwise); and at "
                 "initialisation the activation variance and gradient norm per residual block vs depth, averaged "
                 "over seeds."),
))
