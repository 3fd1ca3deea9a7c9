"""The ``layerwise`` method: one batched forward pass per block pair, then per output one
backward pass during which each structured layer's per-sample Jacobian rows are rebuilt from
(layer input, output gradient) by the closed forms of :mod:`probe.autodiff` and contracted into
the kernel (see :class:`~probe.probes.ntk.NtkMethod`)."""
from __future__ import annotations

import torch
from torch import Tensor

from probe.autodiff import (ForwardRecord, StructuredLayer, conv_patches, gram_factors, input_leaf,
                            output_gradients, per_sample_grad_rows, record_forward, stream_backward)
from probe.autodiff.layers import grad_blocks_scratch_numel, per_sample_grad_blocks
from probe.probes.ntk._blocks import _block_shape, _put, _schedule
from probe.probes.ntk._plan import _Ctx, _Plan
from probe.probes.ntk._util import _ranges
from probe.probes.ntk.result import NtkKind


def _run_layerwise(c: _Ctx, plan: _Plan, K: Tensor, pbar) -> None:
    """K += the kernel of the plan's structured layers (the other parameters: ``_run_jacobian``)."""
    if c.kind == NtkKind.FULL:
        _run_layerwise_full(c, plan, K, pbar)
    else:
        _run_layerwise_stream(c, plan, K, pbar)


def _run_layerwise_stream(c: _Ctx, plan: _Plan, K: Tensor, pbar) -> None:
    """Trace / diagonal kernels: per block pair one forward pass over both blocks, then per output
    one backward pass during which every layer's contribution is contracted as its gradient
    arrives (hooks on the layer outputs): memory ~ the forward graph + one layer at a time. With
    ``plan.chunk`` smaller than a pair, the passes run over chunks of samples and each output's
    rows are kept for the pair (see :func:`_lw_stream_pair`)."""
    fm, layers = c.fm, plan.layers
    params = {n: p.detach().requires_grad_() for n, p in fm.params.items()}
    rows = _ranges(c.n1, plan.block)
    cols = rows if c.sym else _ranges(c.n2, plan.block)
    for bi, r in enumerate(rows):
        for bj, s in enumerate(cols):
            if c.sym and bj < bi:
                continue
            same = c.sym and bi == bj
            xa = c.x1[r[0]:r[1]]
            x = xa if same else torch.cat([xa, c.x2[s[0]:s[1]]])
            n1, n2 = r[1] - r[0], s[1] - s[0]
            blk = _lw_stream_pair(c, layers, params, x, n1, n2, same, plan.chunk)
            _put(K, c.kind, blk, r, s)
            if c.sym and bj > bi:
                _put(K, c.kind, blk, r, s, transpose=True)
            pbar.update(1)


# J J^T of a block with itself: the lower block triangle only, by column blocks of at least
# _TRI_ROWS samples (at most _TRI_MAX of them), then mirrored. 4 blocks of 64 of 256 samples do
# 62% of the multiply-adds in ~85% of the time of the full product (measured on CPU).
_TRI_ROWS = 64
_TRI_MAX = 4


def _tri_blocks(n: int) -> list[tuple[int, int]]:
    """Column blocks of the lower block triangle of an (n, n) symmetric product."""
    r = max(1, min(_TRI_MAX, n // _TRI_ROWS))
    return _ranges(n, -(-n // r))


def _mirror_(blk: Tensor, tri: list[tuple[int, int]]) -> None:
    """Blocks above the block diagonal of the last two axes := the transposed blocks below it."""
    for bi, (i0, i1) in enumerate(tri):
        for j0, j1 in tri[bi + 1:]:
            blk[..., i0:i1, j0:j1] = blk[..., j0:j1, i0:i1].transpose(-1, -2)


def _lw_stream_pair(c: _Ctx, layers: list[StructuredLayer], params: dict[str, Tensor], x: Tensor,
                    n1: int, n2: int, same: bool, chunk: int | None = None) -> Tensor:
    """Kernel block between x[:n1] and x[n1:] (or x and itself when ``same``).

    Per output, every layer's rows (n, p) are contracted into an (n1, n2) accumulator in the
    model's dtype -- one product per layer (``same``: its lower block triangle) -- and after the
    output's backward passes the accumulator is added to the float64 block. With ``chunk`` < n
    the samples are recorded in chunks of ``chunk`` and each backward pass runs chunk by chunk
    (smaller passes are faster on CPU: their tensors stay in cache), the rows of every chunk
    written into per-layer buffers (n, p) and contracted once the output's last chunk is through;
    otherwise one recorded pass, every layer contracted as its gradient arrives."""
    O, n = c.O, x.shape[0]
    dtype, dev = c.fm.dtype, x.device
    parts = _ranges(n, chunk if chunk and chunk < n else n)
    blk = torch.zeros(_block_shape(c.kind, n1, n2, O), dtype=torch.float64, device=dev)
    acc = torch.zeros((n1, n2), dtype=dtype, device=dev)
    tri = _tri_blocks(n1) if same else []
    aa_cache: dict[int, Tensor] = {}

    def contract(J: Tensor) -> None:
        if same:
            for j0, j1 in tri:
                acc[j0:, j0:j1].addmm_(J[j0:], J[j0:j1].T)
        else:
            acc.addmm_(J[:n1], J[n1:].T)

    def gram(li: int, A: Tensor, G: Tensor) -> None:   # sum_ts (a1_t . a2_s)(g1_t . g2_s), J never formed
        T = G.shape[1]
        G1 = G[:n1].reshape(n1 * T, -1)
        G2 = G1 if same else G[n1:].reshape(n2 * T, -1)
        if li not in aa_cache:
            A1 = A[:n1].reshape(n1 * T, -1)
            aa_cache[li] = (A1 @ (A1 if same else A[n1:].reshape(n2 * T, -1)).T).view(n1, T, n2, T)
        acc.add_((aa_cache[li] * (G1 @ G2.T).view(n1, T, n2, T)).sum((1, 3)))

    def done(o: int) -> None:
        (blk if c.kind == NtkKind.TRACE else blk[o]).add_(acc)
        acc.zero_()

    def summed(li: int, layer: StructuredLayer, blocks: list[Tensor], pending: dict) -> list[Tensor] | None:
        """A module called several times: the sum of its calls' rows once the last one is in."""
        if layer.calls == 1:
            return blocks
        prev, seen = pending.pop(li, (None, 0))
        blocks = [b.clone() for b in blocks] if prev is None else [p.add_(b) for p, b in zip(prev, blocks)]
        if seen + 1 < layer.calls:
            pending[li] = (blocks, seen + 1)
            return None
        return blocks

    leaves, recs = [], []
    for c0, c1 in parts:
        xc = x[c0:c1]
        leaves.append(input_leaf(xc))
        recs.append(record_forward(c.fm, params, leaves[-1] if leaves[-1] is not None else xc, layers))
    width = max(c1 - c0 for c0, c1 in parts)
    scratch_numel = grad_blocks_scratch_numel(layers)
    scratch = torch.empty(width * scratch_numel, dtype=dtype, device=dev) if scratch_numel else None
    patches: dict[tuple[int, int], Tensor] = {}
    pending: dict[int, tuple[list[Tensor], int]] = {}

    def blocks_of(ci: int, k: int, g: Tensor, out: Tensor | None) -> tuple[StructuredLayer, list[Tensor] | None]:
        rec = recs[ci].recs[k]
        layer = layers[rec.layer]
        U = None
        if layer.keep_patches:
            U = patches.get((ci, k))
            if U is None:
                U = patches[(ci, k)] = conv_patches(layer.module, rec.src.detach())
        blocks = per_sample_grad_blocks(layer, rec, g, U, out if layer.calls == 1 else None, scratch)
        return layer, summed(rec.layer, layer, blocks, pending)

    if len(parts) == 1:
        def on_grad(o: int, k: int, g: Tensor) -> None:
            rec = recs[0].recs[k]
            if layers[rec.layer].gram:
                A, G = gram_factors(layers[rec.layer], None if rec.layer in aa_cache else rec.src.detach(),
                                    g.unsqueeze(0))                    # (n, T, k) or None, (1, n, T, d)
                gram(rec.layer, A, G[0])
                return
            _, blocks = blocks_of(0, k, g, scratch)                                  # [(n, p_i)]
            for J in blocks or []:
                contract(J)

        stream_backward(recs[0], leaves[0], range(O), on_grad, done)
    else:
        rows: dict[int, list[Tensor]] = {}             # layer -> its rows (n, p_i) for this output
        gs: dict[int, Tensor] = {}                     # Gram layer -> G (n, T, d) for this output
        As: dict[int, Tensor] = {}                     # Gram layer -> A (n, T, k), until aa is cached
        for li, layer in enumerate(layers):            # A depends on the forward pass only
            if layer.gram and all(li in r.by_layer for r in recs):
                As[li] = torch.cat([gram_factors(layer, r.recs[r.by_layer[li][0]].src.detach(),
                                                 r.recs[r.by_layer[li][0]].z.detach().unsqueeze(0))[0]
                                    for r in recs])
        at = {"ci": 0}
        filled: set[tuple[int, int]] = set()           # (layer, chunk) reached by this output's pass

        def on_grad_chunk(o: int, k: int, g: Tensor) -> None:
            ci = at["ci"]
            c0, c1 = parts[ci]
            rec = recs[ci].recs[k]
            li = rec.layer
            filled.add((li, ci))
            if layers[li].gram:
                _, G = gram_factors(layers[li], None, g.unsqueeze(0))
                if li not in gs:
                    gs[li] = G.new_empty((n,) + G.shape[2:])
                gs[li][c0:c1] = G[0]
                return
            dest = rows.get(li)
            _, blocks = blocks_of(ci, k, g, None if dest is None else dest[0][c0:c1])
            if blocks is None:
                return
            if dest is None:
                dest = rows[li] = [b.new_empty((n, b.shape[1])) for b in blocks]
            for d, b in zip(dest, blocks):
                piece = d[c0:c1]
                if b.data_ptr() != piece.data_ptr():
                    piece.copy_(b)

        for o in range(O):
            filled.clear()
            for ci in range(len(parts)):
                at["ci"] = ci
                stream_backward(recs[ci], leaves[ci], [o], on_grad_chunk)
            for li, bufs in [*rows.items(), *((li, [G]) for li, G in gs.items())]:
                for ci, (c0, c1) in enumerate(parts):   # not reached: no gradient, rows are zero
                    if (li, ci) not in filled:
                        for d in bufs:
                            d[c0:c1].zero_()
            for Js in rows.values():
                for J in Js:
                    contract(J)
            for li, G in gs.items():
                gram(li, As.pop(li, None), G)
            done(o)
    if len(tri) > 1:
        _mirror_(blk, tri)
    return blk


def _run_layerwise_full(c: _Ctx, plan: _Plan, K: Tensor, pbar) -> None:
    """Full kernel: the output pairs (o, o') of a layer need the gradients of all O outputs at once,
    so each block keeps them (O x the layer outputs) and contracts layer by layer."""
    fm, O, layers = c.fm, c.O, plan.layers
    params = {n: p.detach().requires_grad_() for n, p in fm.params.items()}

    def feats(x):
        return record_forward(fm, params, x, layers)

    def layer_rows(ctx, li, grads):                        # (n, O, P_layer), summed over calls
        rows = None
        for k in ctx.by_layer[li]:
            j = per_sample_grad_rows(layers[li], ctx.recs[k], grads[k])
            rows = j if rows is None else rows + j
        return rows

    def contract(f1: ForwardRecord, f2: ForwardRecord):
        same = f1 is f2
        n1, n2 = f1.n, f2.n
        blk = torch.zeros((n1, O, n2, O), dtype=torch.float64, device=K.device)
        g1 = output_gradients(f1, 0, O)                                                 # (O, n, ...)
        g2 = g1 if same else output_gradients(f2, 0, O)
        for li in [li for li in range(len(layers)) if li in f1.by_layer and li in f2.by_layer]:
            layer = layers[li]
            if layer.gram:                                   # T == 1: (a1 . a2 + 1)(g1 . g2)
                k1, k2 = f1.by_layer[li][0], f2.by_layer[li][0]
                A1, G1 = gram_factors(layer, f1.recs[k1].src.detach(), g1[k1])  # (n1, 1, k), (O, n1, 1, d)
                A2, G2 = (A1, G1) if same else gram_factors(layer, f2.recs[k2].src.detach(), g2[k2])
                aa = A1[:, 0] @ A2[:, 0].T                                         # (n1, n2)
                gg = torch.einsum("oic,pjc->iojp", G1[:, :, 0], G2[:, :, 0])       # (n1,O,n2,O)
                blk += (gg * aa[:, None, :, None]).to(torch.float64)
                continue
            J1 = layer_rows(f1, li, g1)                                            # (n1, O, p)
            J2 = J1 if same else layer_rows(f2, li, g2)
            blk += (J1.reshape(n1 * O, -1) @ J2.reshape(n2 * O, -1).T).view(
                n1, O, n2, O).to(torch.float64)
            del J1, J2
        return blk

    _schedule(c, K, plan.block, feats, contract, pbar)

