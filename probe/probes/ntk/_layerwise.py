"""The ``layerwise`` method: one batched forward pass per block pair, then per output one
backward pass during which each structured layer's per-sample Jacobian rows are rebuilt from
(layer input, output gradient) by the closed forms of :mod:`probe.autodiff` and contracted into
the kernel (see :class:`~probe.probes.ntk.NtkMethod`)."""
from __future__ import annotations

import torch
from torch import Tensor

from probe.autodiff import (ForwardRecord, StructuredLayer, gram_factors, input_leaf, output_gradients,
                            per_sample_grad_rows, record_forward, stream_backward)
from probe.probes.ntk._blocks import _block_shape, _put, _schedule
from probe.probes.ntk._plan import _Ctx, _Plan
from probe.probes.ntk._util import _ranges
from probe.probes.ntk.results import NtkKind


def _run_layerwise(c: _Ctx, plan: _Plan, K: Tensor, pbar) -> None:
    """K += the kernel of the plan's structured layers (the other parameters: ``_run_jacobian``)."""
    if c.kind == NtkKind.FULL:
        _run_layerwise_full(c, plan, K, pbar)
    else:
        _run_layerwise_stream(c, plan, K, pbar)


def _run_layerwise_stream(c: _Ctx, plan: _Plan, K: Tensor, pbar) -> None:
    """Trace / diagonal kernels: per block pair one forward pass over both blocks, then per output
    one backward pass during which every layer's contribution is contracted as its gradient
    arrives (hooks on the layer outputs): memory ~ the forward graph + one layer at a time."""
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
            blk = _lw_stream_pair(c, layers, params, x, n1, n2, same)
            _put(K, c.kind, blk, r, s)
            if c.sym and bj > bi:
                _put(K, c.kind, blk, r, s, transpose=True)
            pbar.update(1)


def _lw_stream_pair(c: _Ctx, layers: list[StructuredLayer], params: dict[str, Tensor], x: Tensor,
                    n1: int, n2: int, same: bool) -> Tensor:
    """Kernel block between x[:n1] and x[n1:] (or x and itself when ``same``)."""
    O = c.O
    leaf = input_leaf(x)
    ctx = record_forward(c.fm, params, leaf if leaf is not None else x, layers)
    blk = torch.zeros(_block_shape(c.kind, n1, n2, O), dtype=torch.float64, device=x.device)
    pending: dict[int, tuple[Tensor, int]] = {}
    aa_cache: dict[int, Tensor] = {}

    def on_grad(o: int, k: int, g: Tensor) -> None:
        rec = ctx.recs[k]
        li = rec.layer
        layer = layers[li]
        if layer.gram:                      # sum_ts (a1_t . a2_s)(g1_t . g2_s), J never formed
            A, G = gram_factors(layer, rec.src.detach(), g.unsqueeze(0))          # (N, T, k), (1, N, T, d)
            G = G[0]
            T = A.shape[1]
            A1, G1 = A[:n1].reshape(n1 * T, -1), G[:n1].reshape(n1 * T, -1)
            A2, G2 = (A1, G1) if same else (A[n1:].reshape(n2 * T, -1), G[n1:].reshape(n2 * T, -1))
            if li not in aa_cache:
                aa_cache[li] = (A1 @ A2.T).view(n1, T, n2, T)
            val = (aa_cache[li] * (G1 @ G2.T).view(n1, T, n2, T)).sum((1, 3))
        else:
            J = per_sample_grad_rows(layer, rec, g.unsqueeze(0))[:, 0]          # (N, P_layer)
            if layer.calls > 1:                  # a module called several times: sum its calls
                prev, seen = pending.pop(li, (None, 0))
                J = J if prev is None else prev + J
                if seen + 1 < layer.calls:
                    pending[li] = (J, seen + 1)
                    return
            J1 = J[:n1]
            val = J1 @ (J1 if same else J[n1:]).T                      # (n1, n2)
        if c.kind == NtkKind.TRACE:
            blk.add_(val.to(torch.float64))
        else:
            blk[o].add_(val.to(torch.float64))

    stream_backward(ctx, leaf, range(O), on_grad)
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

