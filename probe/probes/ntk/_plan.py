"""Planning of the NTK probe: the measuring pass, then memory and cost models of every method.

One forward pass of one sample measures the model's outputs O, the activations saved for the
backward pass (A, per sample), the forward FLOPs [FP] and the shapes of the structured layers;
each method's planner then finds the largest blocks of samples whose peak working set fits the
memory budget and estimates its cost (the cost model is documented in :func:`empirical_ntk`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from probe.autodiff import (StructuredLayer, check_closed_forms, check_cost_bytes, record_layer_calls,
                             set_layer_shapes)
from probe.functional import FunctionalModel
from probe.errors import UserError
from probe.probes.ntk._util import (_BWD_FP, _GRAM_BLOCK, _GRAM_MAX_CHUNK, _JVP_FP, _LANCZOS_MAX_BLOCK,
                                    _NTVP_BLOCK,
                                    _VMAP_OVERHEAD, _mib, _ranges)
from probe.probes.ntk.result import LanczosMethod, NtkKind

aten = torch.ops.aten


# --------------------------------------------------------------------------------------------
# The measuring pass: outputs, saved activations, FLOPs, layer shapes
# --------------------------------------------------------------------------------------------


@dataclass
class _Stats:
    n_outputs: int
    saved_numel: int      # activations saved for backward, per sample (elements)
    flops: float          # forward FLOPs per sample


class _FlopCount(TorchDispatchMode):
    """Forward FLOPs of the operations that dominate a network's cost: matrix products,
    convolutions and fused attention, 2 per multiply-add. A light stand-in for
    ``torch.utils.flop_counter.FlopCounterMode``, whose first use imports sympy (~1.5 s on CPU,
    paid on every cold call of the probe); the cost model needs only the order of magnitude."""

    _MM = (aten.mm, aten.bmm)
    _ADDMM = (aten.addmm, aten.baddbmm)
    _SDPA = tuple(getattr(aten, n) for n in ("_scaled_dot_product_flash_attention_for_cpu",
                                             "_scaled_dot_product_flash_attention",
                                             "_scaled_dot_product_efficient_attention",
                                             "_scaled_dot_product_cudnn_attention") if hasattr(aten, n))

    def __init__(self):
        super().__init__()
        self.flops = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in dynamo.disable unless told not to, and the
        # first call imports torch._dynamo (2-9 s of CPU time in every process); nothing is
        # compiled under this mode
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.overloadpacket
        try:
            if op in self._MM:
                self.flops += 2 * out.numel() * args[0].shape[-1]
            elif op in self._ADDMM:
                self.flops += 2 * out.numel() * args[1].shape[-1]
            elif op is aten.convolution:
                w, transposed = args[1], bool(args[6])
                if transposed:       # weight (C_in, C_out / groups, *k): per input element
                    self.flops += 2 * args[0].numel() * (w.numel() // w.shape[0])
                else:                # weight (C_out, C_in / groups, *k): per output element
                    self.flops += 2 * out.numel() * (w.numel() // w.shape[0])
            elif op in self._SDPA:   # q (B, H, L, E), k (B, H, S, E), v (B, H, S, Ev)
                q, k, v = args[0], args[1], args[2]
                self.flops += 2 * q.numel() * k.shape[-2] + 2 * (q.numel() // q.shape[-1]) * k.shape[-2] * v.shape[-1]
        except (AttributeError, IndexError, TypeError):
            pass                     # an unusual signature: not counted
        return out


def _measure(fm: FunctionalModel, x0: Tensor, layers: Sequence[StructuredLayer]) -> _Stats:
    """One forward pass of one sample with the graph recorded: O, saved activations, FLOPs; fills
    the shape fields of ``layers`` (:func:`probe.autodiff.set_layer_shapes`)."""
    params = {n: p.detach().requires_grad_() for n, p in fm.params.items()}
    known = set()
    for t in [*fm.params.values(), *fm.fixed.values(), *fm.buffers.values()]:
        known.add(t.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t):
        try:
            if t.untyped_storage().data_ptr() not in known:
                key = t.data_ptr()
                seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with record_layer_calls(layers) as calls, torch.enable_grad(), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FlopCount() as fc:
        y = fm(params, x0)
    if y.dim() < 1 or y.shape[0] != x0.shape[0]:
        raise UserError(f"model output has shape {tuple(y.shape)}; expected a leading batch axis of "
                        f"size {x0.shape[0]} (outputs (N, ...) for inputs (N, ...))")
    itemsize = torch.empty((), dtype=fm.dtype).element_size()
    set_layer_shapes(layers, calls, fm.params)
    return _Stats(n_outputs=int(y[0].numel()), saved_numel=sum(seen.values()) // itemsize,
                  flops=float(fc.flops))


# --------------------------------------------------------------------------------------------
# Planning: memory and cost model
# --------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    fm: FunctionalModel
    kind: NtkKind
    x1: Tensor
    x2: Tensor
    sym: bool
    stats: _Stats
    itemsize: int
    budget: int
    check_bytes: int = 0          # peak of the closed-form self-check (set by _checked_layers)

    @property
    def n1(self) -> int:
        return self.x1.shape[0]

    @property
    def n2(self) -> int:
        return self.x2.shape[0]

    @property
    def O(self) -> int:  # noqa: E743 -- the paper's symbol
        return self.stats.n_outputs

    @property
    def q(self) -> int:
        """Output pairs per sample pair the kernel keeps: O^2 (full), O (diagonal), 1 (trace)."""
        return {NtkKind.FULL: self.O ** 2, NtkKind.DIAGONAL: self.O, NtkKind.TRACE: 1}[self.kind]

    @property
    def kernel_bytes(self) -> int:
        return self.n1 * self.n2 * self.q * 8

    @property
    def fp(self) -> float:
        return max(self.stats.flops, 2.0 * self.fm.n_params)


@dataclass
class _Plan:
    method: str                   # the name of the kernel method (:data:`._methods.KERNEL_METHODS`)
    feasible: bool
    reason: str = ""
    block: int = 1
    chunk: int = 1
    groups: list[list[str]] | None = None
    peak_bytes: int = 0
    min_bytes: int = 0            # smallest budget this method could work with
    flops: float = 0.0
    cost: float = math.inf
    n_blocks: int = 0
    schedule: str = ""
    layers: list[StructuredLayer] = field(default_factory=list)
    fallback: "_Plan | None" = None


def _pair_count(n1: int, n2: int, b: int, sym: bool) -> tuple[int, float]:
    """(block pairs, sample Jacobian evaluations) of the row-block x column-block schedule."""
    r, c = len(_ranges(n1, b)), len(_ranges(n2, b))
    if b >= max(n1, n2):
        return 1, float(n1 + (0 if sym else n2))
    if sym:
        return r * (r + 1) // 2, n1 + n1 * (r - 1) / 2.0
    return r * c, float(n1 + r * n2)


def _plan_jacobian(c: _Ctx, names: Sequence[str], free: int, block_size: int | None) -> _Plan:
    it, O, S = c.itemsize, c.O, c.stats.saved_numel
    sizes = {n: c.fm.params[n].numel() for n in names}
    P = sum(sizes.values())
    s_j = O * P * it                           # one sample's Jacobian
    s_t = (1 + O) * S * it                      # one sample's jacrev working set (forward + O grads)
    n_feat = c.n1 + (0 if c.sym else c.n2)
    nmax = max(c.n1, c.n2)
    per_eval = (1 + _BWD_FP * O) * c.fp * _VMAP_OVERHEAD
    contraction = 2.0 * c.n1 * c.n2 * c.q * P
    plan = _Plan("jacobian", False, min_bytes=3 * O * max(sizes.values()) * it + s_t)

    def finish(block, chunk, groups, peak):
        pairs, evals = _pair_count(c.n1, c.n2, block, c.sym)
        g = 1 if groups is None else len(groups)
        frac = 1.0 if (block >= nmax or not c.sym) else (len(_ranges(c.n1, block)) + 1) / (
            2.0 * len(_ranges(c.n1, block)))
        if groups:
            sched = f"blocks of {block} sample(s) x {g} parameter groups"
        elif block >= nmax:
            sched = f"resident (Jacobians of all samples, chunks of {chunk})"
        else:
            sched = f"blocks of {block} samples"
        plan.__dict__.update(feasible=True, block=block, chunk=chunk, groups=groups, peak_bytes=peak,
                             n_blocks=pairs * g, schedule=sched)
        plan.flops = evals * g * (1 + _BWD_FP * O) * c.fp + contraction * frac
        plan.cost = evals * g * per_eval + contraction * frac
        return plan

    if block_size:
        b = int(block_size)
        peak = 2 * b * s_j + b * (s_t + s_j)
        if peak > free:
            plan.reason = (f"block_size={b} needs {_mib(peak)} for Jacobians but only {_mib(free)} is "
                           f"left in the budget")
            return plan
        return finish(min(b, nmax), b, None, peak)
    # every Jacobian resident, computed in chunks
    chunk = (free - n_feat * s_j) // (s_t + s_j) if free > n_feat * s_j else 0
    if chunk >= 1:
        chunk = min(chunk, nmax)
        return finish(nmax, chunk, None, n_feat * s_j + chunk * (s_t + s_j))
    # row block x column block, Jacobians of both blocks held
    b = free // (3 * s_j + s_t)
    if b >= 1:
        return finish(b, b, None, b * (3 * s_j + s_t))
    # one sample at a time, parameters in groups
    cap = (free - s_t) // (3 * O * it) if free > s_t else 0
    if cap < max(sizes.values()):
        plan.reason = (f"one sample's Jacobian working set needs at least {_mib(plan.min_bytes)} "
                       f"(largest parameter tensor x {O} outputs, plus activations)")
        return plan
    groups, cur, cur_n = [], [], 0
    for n, s in sizes.items():
        if cur and cur_n + s > cap:
            groups.append(cur)
            cur, cur_n = [], 0
        cur.append(n)
        cur_n += s
    groups.append(cur)
    return finish(1, 1, groups, 3 * O * max(sum(sizes[n] for n in g) for g in groups) * it + s_t)


def _plan_ntvp(c: _Ctx, free: int, block_size: int | None) -> _Plan:
    it, O, S, P = c.itemsize, c.O, c.stats.saved_numel, c.fm.n_params
    col = (P + 2 * S) * it                      # one column's parameter tangent + its VJP
    cell = (2 * S + O) * it                     # one (column, row sample) JVP working set
    plan = _Plan("ntvp", False, min_bytes=col + cell)
    ncols = c.n2 * O
    rows = min(c.n1, int(block_size) if block_size else c.n1)
    # columns per chunk: a quarter of the budget for tangents, then rows fill the rest
    cols = max(1, min(ncols, free // (4 * col)))
    while cols > 1 and cols * (col + cell) > free:
        cols //= 2
    if not block_size:
        rows = int(min(c.n1, max(1, (free - cols * col) // (cols * cell))))
    peak = cols * (col + rows * cell)
    if peak > free:
        plan.reason = (f"one kernel column needs {_mib(col + rows * cell)} (P-vector plus "
                       f"activations of {rows} row sample(s))")
        return plan
    plan.__dict__.update(feasible=True, block=rows, chunk=cols, peak_bytes=peak,
                         n_blocks=len(_ranges(ncols, cols)) * len(_ranges(c.n1, rows)),
                         schedule=f"{cols} columns x {rows} rows at once")
    plan.flops = ncols * (3.0 + _JVP_FP * c.n1) * c.fp
    plan.cost = plan.flops * _VMAP_OVERHEAD
    return plan


def _layer_use_gram(layer: StructuredLayer, kind: NtkKind, O: int) -> bool:
    if layer.kind == "bn" or layer.calls != 1 or layer.w is None:
        return False
    if layer.kind == "conv" and layer.module.groups != 1:
        return False
    t, k, d = layer.t, layer.d_in + (1 if layer.b else 0), layer.d_out
    if kind == NtkKind.FULL:
        return t == 1
    # per sample pair: Gram t^2*(k/O + d + 1) against the Jacobian contraction k*d
    return t == 1 or t * t * (k / O + d + 1) < 0.5 * k * d


def _plan_layerwise(c: _Ctx, layers: list[StructuredLayer], fallback: list[str], free: int,
                    block_size: int | None) -> _Plan:
    """Memory and cost of the layerwise method (see :class:`NtkMethod`).

    trace / diagonal: per block pair one forward pass over both blocks (graph + layer outputs
    kept), then per output a backward pass contracting one layer at a time; per sample
    ~ (2 A + layer outputs + the rows buffer of the largest layer whose rows are written into it
    + the largest other layer's rows + the running sum of a module called several times + the
    largest patch matrix formed on the fly + the patch matrices kept across outputs); per block
    pair the float64 kernel block and its accumulator in the model's dtype. When the pair has
    more than ``_LW_CHUNK`` samples and the budget allows, the forward and backward passes run
    over chunks of ``_LW_CHUNK`` samples (``plan.chunk``; measured 25-35% faster on CPU than one
    pass over 256 samples): then every layer's rows of one output are kept for all samples of
    the pair (sum of the layers' P, Gram layers their factors) and the per-layer buffers above
    are per chunk. Patch matrices are kept (``keep_patches``) for the conv layers whose rows go
    through them, as many as fit the budget at the chosen block size.
    full: each block keeps the gradients of all O outputs at every layer output.

    The plan's ``layers`` are copies of ``layers`` carrying this plan's decisions (``gram``,
    ``keep_patches``), so that plans for other sample counts do not change them.
    """
    import dataclasses

    from probe.autodiff.layers import conv_rows_by_patches, grad_blocks_scratch_numel

    it, O, S = c.itemsize, c.O, c.stats.saved_numel
    full = c.kind == NtkKind.FULL
    plan = _Plan("layerwise", False)
    if not layers:
        plan.reason = "no Linear/Conv2d/BatchNorm parameter is selected"
        return plan
    layers = [dataclasses.replace(layer, gram=_layer_use_gram(layer, c.kind, O), keep_patches=False)
              for layer in layers]
    sum_out = sum(layer.out_numel for layer in layers)
    clones = sum(layer.out_numel for layer in layers if layer.inplace_out)
    rowed = [layer for layer in layers if not layer.gram]
    if full:
        p_mat = max([layer.p for layer in rowed] + [0])
        unf = max([layer.unfold_numel for layer in layers] + [0])
        per_sample = (2 * S + clones + O + O * sum_out + O * p_mat + unf) * it
        by_patches: list[StructuredLayer] = []
    else:
        by_patches = [layer for layer in rowed if conv_rows_by_patches(layer) and layer.w]
        patched = {id(layer) for layer in by_patches}
        buffered = {id(layer) for layer in rowed
                    if layer.w and (layer.kind == "linear" or id(layer) in patched)}
        p_buf = grad_blocks_scratch_numel(layers)                      # one reused scratch buffer
        # rows not written into it (conv by batch-as-groups backward, biases, BatchNorm), and
        # BatchNorm's product g * a where the scratch does not hold it
        p_other = max([layer.p for layer in rowed if id(layer) not in buffered]
                      + [layer.out_numel for layer in rowed if layer.kind == "bn" and layer.calls > 1]
                      + [0])
        p_pend = max([layer.p for layer in rowed if layer.calls > 1] + [0])
        per_sample = (2 * S + clones + O + p_buf + p_other + p_pend) * it
        graph = (2 * S + clones + O) * it
        per_chunk = (2 * p_buf + p_other + p_pend) * it   # scratch, a first call's rows, transients
        kept_rows = sum(layer.p for layer in rowed) * it
        kept_gram = sum(layer.t * (layer.d_in + 1 + layer.d_out) for layer in layers if layer.gram) * it

    nmax = max(c.n1, c.n2)

    def peak(b: int, cached: Sequence[StructuredLayer] = (), chunk: int | None = None) -> int:
        # samples in one forward pass: both blocks of a pair (one block: x1 with itself)
        one = c.sym and b >= nmax
        n = b if one else 2 * b
        gram = sum(2 * n * n * layer.t ** 2 * it for layer in layers if layer.gram)
        if full:
            return n * per_sample + gram
        keep = {id(layer) for layer in cached}
        unf = max([layer.unfold_numel for layer in by_patches if id(layer) not in keep] + [0])
        kept = sum(layer.unfold_numel for layer in cached)
        b1, b2 = min(b, c.n1), (min(b, c.n1) if one else min(b, c.n2))
        pair = b1 * b2 * (it + 8 * (O if c.kind == NtkKind.DIAGONAL else 1))   # accumulator, block
        if chunk is None or chunk >= n:
            return n * (per_sample + (unf + kept) * it) + gram + pair
        return (n * (graph + kept_rows + kept_gram + kept * it) + min(chunk, n) * (per_chunk + unf * it)
                + gram + pair)

    if block_size:
        b = min(int(block_size), nmax)
    elif peak(nmax) <= free:
        b = nmax
    else:                                 # peak is increasing in b: bisect the largest that fits
        lo, hi = 0, nmax
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if peak(mid) <= free else (lo, mid)
        b = lo
    plan.min_bytes = peak(1)
    if b < 1 or peak(b) > free:
        plan.reason = f"one sample's layerwise working set needs {_mib(peak(max(b, 1)))}"
        return plan
    _LW_CHUNK = 64
    n_pair = b if (c.sym and b >= nmax) else 2 * b
    chunk = None
    if not full and n_pair > _LW_CHUNK and peak(b, (), _LW_CHUNK) <= free:
        chunk = _LW_CHUNK
    cached: list[StructuredLayer] = []
    for layer in sorted((lay for lay in by_patches if lay.calls == 1), key=lambda lay: lay.unfold_numel):
        if peak(b, cached + [layer], chunk) <= free:   # a kept patch matrix saves one unfold per output
            cached.append(layer)
            layer.keep_patches = True
    pairs, evals = _pair_count(c.n1, c.n2, b, c.sym)
    rows, cols = len(_ranges(c.n1, b)), len(_ranges(c.n2, b))
    if b >= nmax:
        pass_samples = c.n1 + (0 if c.sym else c.n2)
    else:                                 # backward (and, but for "full", forward) per block pair
        pass_samples = (c.n1 * cols + c.n2 * rows) / (2.0 if c.sym else 1.0)
    fwd = (evals if full else pass_samples) * c.fp
    flops = fwd + pass_samples * O * _BWD_FP * c.fp
    frac = 1.0 if (b >= nmax or not c.sym) else (rows + 1) / (2.0 * rows)
    for layer in layers:
        if layer.gram:
            k = layer.d_in + (1 if layer.b else 0)
            flops += 2.0 * c.n1 * c.n2 * layer.t ** 2 * (k + O * (layer.d_out + 1)) * frac
        else:
            flops += 2.0 * c.n1 * c.n2 * c.q * layer.p * frac
    n_gram = sum(layer.gram for layer in layers)
    plan.__dict__.update(feasible=True, block=b, chunk=O if full else (chunk or n_pair),
                         peak_bytes=peak(b, cached, chunk), n_blocks=pairs,
                         layers=layers, flops=flops, cost=flops,
                         schedule=(("one block" if b >= nmax else f"blocks of {b} samples")
                                   + f", {len(layers)} structured layers ({n_gram} by Gram)"
                                   + (f", passes over chunks of {chunk} samples" if chunk else "")))
    if fallback:
        fb = _plan_jacobian(c, fallback, free, None)
        if not fb.feasible:
            plan.feasible = False
            plan.reason = f"parameters outside structured layers: {fb.reason}"
            return plan
        plan.fallback = fb
        plan.schedule += f"; {len(fallback)} other parameter tensors: {fb.schedule}"
        plan.flops += fb.flops
        plan.cost += fb.cost
        plan.peak_bytes = max(plan.peak_bytes, fb.peak_bytes)
    return plan


def _checked_layers(c: _Ctx, layers: list[StructuredLayer], free: int | None = None,
                    notes: list[str] | None = None
                    ) -> tuple[list[StructuredLayer], list[str], list[str]]:
    """(structured layers that pass the closed-form self-check, parameter names left to the
    generic ``vmap(jacrev)`` path, names that failed the check).

    The check (:func:`probe.autodiff.check_closed_forms`) holds the graph of two samples and,
    per checked layer, :func:`probe.autodiff.check_cost_bytes`. With ``free`` bytes the layers
    are checked in groups that fit, one pass per group; a layer whose own check does not fit is
    not trusted (its parameters go to the generic path, and a note says so): an unchecked closed
    form could be silently wrong.
    """
    called = [lay for lay in layers if lay.calls > 0]
    groups: list[list[StructuredLayer]] = [called] if called else []
    too_big: list[StructuredLayer] = []
    if free is not None and called:
        it = c.itemsize
        room = free - 2 * 2 * c.stats.saved_numel * it                # the graph of two samples
        groups, cur, used = [], [], 0
        for lay in sorted(called, key=lambda lay: lay.p):
            cost = check_cost_bytes(lay, it)
            if cost > room:
                too_big.append(lay)
                continue
            if cur and used + cost > room:
                groups.append(cur)
                cur, used = [], 0
            cur.append(lay)
            used += cost
        if cur:
            groups.append(cur)
    good, bad = [], []
    it = c.itemsize
    c.check_bytes = max([2 * 2 * c.stats.saved_numel * it + sum(check_cost_bytes(lay, it) for lay in g)
                         for g in groups] + [c.check_bytes])
    for group in groups:
        g, b = check_closed_forms(c.fm, c.x1, group, c.O)
        good += g
        bad += b
    order = {id(lay): i for i, lay in enumerate(layers)}
    good.sort(key=lambda lay: order[id(lay)])
    if too_big and notes is not None:
        biggest = max(lay.p for lay in too_big)
        notes.append(f"closed-form self-check does not fit the memory budget for {len(too_big)} "
                     f"layer(s) (the largest with {biggest} parameters needs "
                     f"{_mib(check_cost_bytes(max(too_big, key=lambda lay: lay.p), c.itemsize))}): "
                     f"they use the generic Jacobian path")
    covered = {nm for lay in good for nm in lay.names}
    return good, [nm for nm in c.fm.params if nm not in covered], bad


def _default_block(method: LanczosMethod, k: int) -> int:
    # gram: one data pass per block, and its matrix products are memory-bound (a block of 20 costs
    # ~1.2x one of 10): 20 to 40 vectors were fastest for top-20 on ResNet-20 kernels (6-7 passes).
    # ntvp: every vector costs its own VJPs and JVPs, but a single vector sees each eigenvalue once
    # (a full kernel restricted to a linear head repeats each O times): blocks of up to 10
    # resolve such multiplicities, and larger clusters are reported (multiplicity_note).
    return min(k, _GRAM_BLOCK) if method == LanczosMethod.GRAM else min(k, _NTVP_BLOCK)


def _plan_gram(c: _Ctx, layers: list[StructuredLayer], fallback: list[str], k: int, s: int, dim_cap: int,
               n_units: int, block_size: int | None) -> _Plan:
    """Memory plan of :class:`_GramOperator` + :func:`probe.linalg.block_lanczos`: basis and blocks
    in parameter space, then the largest sample blocks that fit (``block``: forward graph and O
    output gradients per sample; ``chunk``: samples whose layer rows are formed at once)."""
    it, O, S, P = c.itemsize, c.O, c.stats.saved_numel, c.fm.n_params
    F = P * (O if c.kind == NtkKind.TRACE else 1)
    plan = _Plan("layerwise", False)
    sum_out = sum(layer.out_numel for layer in layers)
    clones = sum(layer.out_numel for layer in layers if layer.inplace_out)
    unf = max([layer.unfold_numel for layer in layers] + [0])
    per_sample = (2 * S + clones + O * sum_out + O) * it                # block: graph + O gradients
    per_row = (2 * O * P + unf) * it                                    # chunk: rows (+ one copy)
    work_min = per_sample + per_row

    def fixed(d: int) -> int:
        return (d + 4 * s) * F * it + 8 * d * d

    dims = dim_cap
    if fixed(dims) + work_min > c.budget:                               # shrink the Krylov space
        fit = (c.budget - work_min - 8 * dims * dims) // (F * it) - 4 * s
        dims = int(fit // s * s) if fit > 0 else 0
    need_dims = min(F, -(-k // s) * s + s)
    if dims < need_dims:
        plan.reason = (f"the parameter-space basis needs {_mib(fixed(need_dims) + work_min)} for "
                       f"{need_dims} vectors of {F} elements")
        plan.min_bytes = fixed(need_dims) + work_min
        return plan
    free = c.budget - fixed(dims)
    chunk = int(max(1, min(_GRAM_MAX_CHUNK, (free // 3) // per_row)))
    if block_size:
        block = int(block_size)
    else:
        block = int(max(chunk, min(_LANCZOS_MAX_BLOCK, (free - chunk * per_row) // per_sample)))
    chunk = min(chunk, block)
    plan.__dict__.update(feasible=True, block=min(block, c.n1), chunk=chunk,
                         peak_bytes=fixed(dims) + block * per_sample + chunk * per_row,
                         layers=layers, n_blocks=dims,
                         schedule=f"blocks of {min(block, c.n1)} samples, rows of {chunk} at once")
    plan.groups = [list(fallback)]
    return plan


def _fit_n(free: int, q: int, n2: int | None) -> int:
    """The largest N whose kernel (q float64 entries per sample pair) fits ``free`` bytes: N x N
    (``n2`` None) or N x n2."""
    if free <= 0:
        return 0
    if n2 is None:
        return int(math.isqrt(free // (8 * q)))
    return int(free // (8 * q * n2))


def _no_plan_error(c: _Ctx, plans: list[_Plan], sym: bool) -> UserError:
    """Why no plan fits: each method's reason, and for the memory-bound ones the budget needed."""
    why = "; ".join(f"{p.method}: {p.reason}" for p in plans)
    sized = [p for p in plans if p.min_bytes > 0]
    if not sized:
        return UserError(f"no NTK method can run: {why}")
    best = min(sized, key=lambda p: p.min_bytes)
    fit = _fit_n(c.budget - best.min_bytes - c.fm.copied_bytes, c.q, None if sym else c.n2)
    fits = (f"with this budget at most N={fit} samples fit" if fit >= 1 else
            "with this budget not even one sample fits")
    return UserError(f"no NTK method fits memory_budget_bytes={_mib(c.budget)} (kernel "
                     f"{_mib(c.kernel_bytes)}): {why}. method={best.method!r} needs "
                     f"memory_budget_bytes >= {_mib(best.min_bytes + c.kernel_bytes + c.fm.copied_bytes)} "
                     f"for this N; {fits}")
