"""The gradient-variance probe registered with the probe framework (``probe gradvar``); its options
are :class:`GradVarParams` (:mod:`._common`: the options of :func:`gradient_variance` too)."""
from probe.figures.gradvar import gradvar_figure
from probe.probes.gradvar._common import GradVarParams
from probe.probes.gradvar.api import gradient_variance
from probe.probes.gradvar.result import GradVarResult
from probe.probes.registry import Probe, ProbeContext, register

__all__ = ["GradVarParams", "compute", "GRADVAR_PROBE"]


def compute(ctx: ProbeContext, params: GradVarParams) -> GradVarResult:
    """The runner's adapter: ``ctx.lr`` (else ``params.lr``), ``ctx.rebuild`` for the depth curves."""
    return gradient_variance(ctx.model, ctx.x, ctx.y, params, seed=ctx.seed, lr=ctx.lr, rebuild=ctx.rebuild,
                             at_init=ctx.at_init, device=ctx.device, progress=ctx.progress)


GRADVAR_PROBE = register(Probe(
    name="gradvar",
    help="per-layer gradient variance, SNR, noise scale and relative update size; depth curves at init",
    params=GradVarParams, result=GradVarResult, compute=compute, figure=gradvar_figure, default_n=512,
    description=("Over K seeded mini-batches (without replacement): per layer the mean gradient norm |G|, the "
                 "trace of the mini-batch gradient covariance tr(Sigma_B), SNR |G|^2/tr(Sigma_B), the gradient "
                 "noise scale B_simple = B tr(Sigma_B)/|G|^2 (McCandlish et al. 2018) and the relative update "
                 "size lr |g|/|w|; the per-sample gradient variance tr(Sigma_1) over all n samples (closed form for "
                 "Linear/Conv2d/BatchNorm, vmap(grad) otherwise); and at "
                 "initialisation the activation variance and gradient norm per residual block vs depth, averaged "
                 "over seeds."),
))
