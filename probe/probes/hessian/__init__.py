"""The Hessian probe (library layer): curvature of the training loss in parameter space.

For a model f(theta, x), a criterion l and a fixed data subset of n samples, the loss is
L(theta) = (1/n) sum_i l(f(theta, x_i), y_i) over the selected parameters theta (P elements,
flattened in ``named_parameters`` order). Two operators (:mod:`._operators`), both
:class:`probe.linalg.SymmetricOperator` over vectors of P elements in the model's dtype:

* the Hessian H = d^2 L / d theta^2, products H v by a backward pass through the gradient's kept
  graph (reverse-over-reverse; ``jvp`` over ``grad``, forward-over-reverse, on request),
* the generalized Gauss-Newton G = J^T H_out J (PSD), products by a JVP, the output-space
  Hessian and a VJP,

evaluated with explicit parameters and buffers (``torch.func.functional_call``), BatchNorm in
eval mode unless ``bn="train"``, in mini-batches whose products are summed with weights b / n.

On these operators, generic estimators (:mod:`probe.linalg`, any symmetric operator): the k
largest / smallest eigenpairs by :func:`probe.linalg.block_lanczos`, the trace by Hutchinson or
Hutch++, the spectral density by stochastic Lanczos quadrature. :func:`hessian_spectrum` runs
them on a model and returns a :class:`HessianResult` (:mod:`.result`), per parameter block on
request (:func:`group_blocks`).

    >>> res = hessian_spectrum(model, x, y, k=5, blocks="stage")
    >>> res.eigenvalues, res.trace_estimate, res.blocks["layer1"].largest
"""
from probe.probes.hessian._operators import GGNOperator, HessianOperator
from probe.probes.hessian.api import curvature_operator, group_blocks, hessian_spectrum, resolve_criterion
from probe.probes.hessian.result import BlockResult, Eigenpairs, HessianProbeResult, HessianResult

__all__ = ["hessian_spectrum", "curvature_operator", "group_blocks", "resolve_criterion",
           "HessianOperator", "GGNOperator", "Eigenpairs", "BlockResult", "HessianResult", "HessianProbeResult"]

from probe.probes.hessian.probe import HESSIAN_PROBE, HessianParams, compute  # noqa: E402  (registers `probe hessian`)

__all__ += ["HESSIAN_PROBE", "HessianParams", "compute"]
