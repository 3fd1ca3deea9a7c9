"""The kernel methods of the NTK probe, in one table: name -> (documentation, planner, runner).

:data:`KERNEL_METHODS` is what :func:`~probe.probes.ntk.empirical_ntk` plans and runs (``auto``
plans every method and runs the cheapest plan that fits, trying them in ``rank`` order where costs
tie), what :class:`NtkMethod` enumerates and what ``probe ntk --method`` offers. A new method is
one :class:`KernelMethod` row here: its planner (:mod:`._plan`: blocks that fit the memory budget
and an estimated cost) and its runner (adds the kernel into ``K``).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

from torch import Tensor

from probe.probes.ntk._jacobian import _run_jacobian
from probe.probes.ntk._layerwise import _run_layerwise
from probe.probes.ntk._ntvp import _run_ntvp
from probe.probes.ntk._plan import _Ctx, _Plan, _plan_jacobian, _plan_layerwise, _plan_ntvp
from probe.probes.ntk._util import _progress

__all__ = ["KernelMethod", "KERNEL_METHODS", "NtkMethod", "candidates", "run_plan"]

#: ``(structured layers that passed the closed-form check, parameter names left to the Jacobian
#: path)``: what a method that uses the per-layer closed forms is planned with.
Checked = tuple[list, list[str]]


@dataclass(frozen=True)
class KernelMethod:
    """One way to compute the kernel: ``name`` (the ``method=`` value), ``doc``, ``plan(c,
    checked, free, block_size) -> _Plan`` (blocks of samples whose working set fits ``free``
    bytes, with its cost), ``run(c, plan, K, pbar)`` (adds the kernel into ``K``); ``structured``:
    it uses the per-layer closed forms, so the layers are checked first; ``rank``: the order in
    which ``auto`` plans (and reports) the methods."""

    name: str
    doc: str
    plan: Callable[[_Ctx, Checked, int, "int | None"], _Plan]
    run: Callable[[_Ctx, _Plan, Tensor, Any], None]
    structured: bool = False
    rank: int = 0


def _jacobian_plan(c: _Ctx, checked: Checked, free: int, block_size: int | None) -> _Plan:
    return _plan_jacobian(c, list(c.fm.params), free, block_size)


def _jacobian_run(c: _Ctx, plan: _Plan, K: Tensor, pbar) -> None:
    _run_jacobian(c, plan, list(c.fm.params), K, pbar)


def _ntvp_plan(c: _Ctx, checked: Checked, free: int, block_size: int | None) -> _Plan:
    return _plan_ntvp(c, free, block_size)


def _layerwise_plan(c: _Ctx, checked: Checked, free: int, block_size: int | None) -> _Plan:
    good, fallback = checked
    return _plan_layerwise(c, good, fallback, free, block_size)


def _layerwise_run(c: _Ctx, plan: _Plan, K: Tensor, pbar) -> None:
    """The structured layers, then the Jacobian path for the parameters outside them."""
    _run_layerwise(c, plan, K, pbar)
    if plan.fallback is not None:
        covered = {m for lay in plan.layers for m in lay.names}
        _run_jacobian(c, plan.fallback, [n for n in c.fm.params if n not in covered], K, pbar)


_AUTO_DOC = """Pick the cheapest method whose memory plan fits ``memory_budget_bytes`` (cost model in
:func:`empirical_ntk`)."""

#: The kernel methods, in the order :class:`NtkMethod` lists them.
KERNEL_METHODS: dict[str, KernelMethod] = {m.name: m for m in (
    KernelMethod("jacobian", """Per-sample Jacobians by ``vmap(jacrev)`` on blocks of samples, contracted block pair by block
pair. Time N*(1 + 2*O)*[FP] + N1*N2*O*P (trace, diagonal) or N1*N2*O^2*P (full); memory
N*O*P when every Jacobian fits, otherwise 2*b*O*P for blocks of b samples (Jacobians of
column blocks are then recomputed once per row block) or, below one sample, per parameter
group.""", _jacobian_plan, _jacobian_run, rank=1),
    KernelMethod("ntvp", """NTK-vector products: one VJP per column (sample j, output b) gives the parameter tangent
d f_b(x2_j)/d theta, one JVP over the row samples gives a whole kernel column. No Jacobian is
stored. Time ~N2*O*(3 + 2.5*N1)*[FP]; memory c*P + c*b*A for c columns and b rows at once.""",
                 _ntvp_plan, _run_ntvp, rank=2),
    KernelMethod("layerwise", """Structured per-layer contraction, no vmap. One batched forward pass over a block pair, then
per output one backward pass; as the gradient g at a Linear/Conv2d/BatchNorm output arrives,
that layer's per-sample Jacobian is rebuilt from (layer input, g) -- a sum over positions of
outer products, or sum g * x_hat for BatchNorm -- and contracted into the kernel before the
next layer's gradient exists. Layers with few positions T are contracted without forming
it, through the Gram identity sum_ts (a_it . a_js)(g_it . g_js) (cost T^2*(d_in + d_out)
instead of d_in*d_out per sample pair). Time ~N*(1 + 2*O)*[FP] + N1*N2*O*P; memory per sample
~2A + one layer's Jacobian row and input patches, instead of O*P (``full`` keeps all O
output gradients per layer). Parameters elsewhere (or failing the built-in exactness
self-check) go through ``jacobian``. Needs a model whose eval-mode forward treats samples
independently.""", _layerwise_plan, _layerwise_run, structured=True, rank=0),
)}

NtkMethod = Enum("NtkMethod", [("AUTO", "auto")] + [(name.upper(), name) for name in KERNEL_METHODS],
                 type=str, module=__name__, qualname="NtkMethod")
NtkMethod.__doc__ = ("How the kernel is computed. N = N1 + N2 samples, O outputs, P parameters, [FP] one "
                     "forward pass of one sample, A the activations saved for the backward pass of one sample.\n\n"
                     + "\n\n".join(f"``{name}``: {doc}" for name, doc in
                                   [("auto", _AUTO_DOC)] + [(m.name, m.doc) for m in KERNEL_METHODS.values()]))


def candidates(method: NtkMethod) -> list[KernelMethod]:
    """The methods ``method`` plans: every one in ``rank`` order for ``auto``, else that one."""
    if method == NtkMethod.AUTO:
        return sorted(KERNEL_METHODS.values(), key=lambda m: m.rank)
    return [KERNEL_METHODS[method.value]]


def run_plan(c: _Ctx, plan: _Plan, K: Tensor, progress) -> None:
    """K += the kernel by ``plan`` (and its Jacobian fallback for the other parameters)."""
    total = plan.n_blocks + (plan.fallback.n_blocks if plan.fallback else 0)
    with _progress(total, f"ntk {c.kind.value} ({plan.method})", progress) as pbar:
        KERNEL_METHODS[plan.method].run(c, plan, K, pbar)
