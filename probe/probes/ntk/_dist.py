"""The NTK kernel under ``torchrun``: shared out over the ranks of the job.

:func:`_factored` (the trace and diagonal kernels of x1 with itself by the ``layerwise`` closed
forms): each rank computes the layer factors of its share of the samples once and the ranks
exchange them. :func:`_tiled` (everything else, and where the factors do not fit the memory
budget): the tiles of the kernel shared out over the ranks, each computed alone, at the price of
recomputing each tile's rows and columns.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from probe.autodiff import LayerCall, StructuredLayer, conv_patches, gram_factors, input_leaf, record_forward, \
    stream_backward
from probe.autodiff.layers import conv_rows_by_patches, grad_blocks_scratch_numel, per_sample_grad_blocks
from probe.probes.ntk._blocks import _block_shape
from probe.probes.ntk._layerwise import _mirror_, _tri_blocks
from probe.probes.ntk._plan import _Ctx, _layer_use_gram, _Plan
from probe.probes.ntk._util import _BWD_FP, _progress, _ranges
from probe.probes.ntk.result import NtkKind, NtkResult
from probe.runtime.chunks import map_chunks
from probe.runtime.dist import Dist, local


def _tiled(ddp: Dist, ntk: Callable[..., NtkResult], model: nn.Module, x1: Tensor, x2: Tensor | None, t0: float,
           *, kind: NtkKind, why: str = "", **kw) -> NtkResult:
    """The kernel under ``torchrun``: the samples in ``ddp.world`` contiguous row (and column)
    blocks, the tiles of the upper triangle (all tiles when x2 is given) shared out over the ranks
    (:func:`probe.runtime.chunks.map_chunks`), each computed alone by ``ntk``
    (:func:`~probe.probes.ntk.empirical_ntk`), and assembled on every rank; the lower triangle is the transpose of the upper. Models whose
    samples interact (BatchNorm statistics of the batch) are not tiled. ``why``: a note on why
    tiles (and not :func:`_factored`)."""
    sym = x2 is None
    rows = [c for c in torch.arange(x1.shape[0]).tensor_split(ddp.world) if c.numel()]
    cols = rows if sym else [c for c in torch.arange(x2.shape[0]).tensor_split(ddp.world) if c.numel()]
    tiles = [(i, j) for i in range(len(rows)) for j in range(len(cols)) if not sym or j >= i]
    other = x1 if sym else x2

    def tile(t: int):
        i, j = tiles[t]
        with local():
            return ntk(model, x1[rows[i]], None if sym and i == j else other[cols[j]], kind=kind, **kw)

    parts, _ = map_chunks(len(tiles), tile, piece=lambda t: f"tile-{t}", dist=ddp)
    O = parts[0].n_outputs
    n1, n2 = x1.shape[0], other.shape[0]
    K = np.zeros(((n1 * O, n2 * O) if kind == NtkKind.FULL else (O, n1, n2) if kind == NtkKind.DIAGONAL
                  else (n1, n2)), dtype=np.float64)

    def place(r, c, block):
        if kind == NtkKind.FULL:
            K[r[0] * O:(r[-1] + 1) * O, c[0] * O:(c[-1] + 1) * O] = block
        elif kind == NtkKind.DIAGONAL:
            K[:, r[0]:r[-1] + 1, c[0]:c[-1] + 1] = block
        else:
            K[r[0]:r[-1] + 1, c[0]:c[-1] + 1] = block

    for (i, j), res in zip(tiles, parts):
        place(rows[i], cols[j], res.kernel)
        if sym and i != j:
            place(cols[j], rows[i], np.swapaxes(res.kernel, -1, -2))
    first = parts[0]
    notes = tuple(dict.fromkeys(n for p in parts for n in p.notes)) + (
        f"kernel in {len(tiles)} tiles over {ddp.world} ranks (methods: "
        f"{', '.join(sorted({p.method for p in parts}))})" + (f": {why}" if why else ""),)
    return dataclasses.replace(first, kernel=K, n1=n1, n2=n2, symmetric=sym, wall_time_s=time.perf_counter() - t0,
                               peak_memory_bytes=max(p.peak_memory_bytes for p in parts),
                               n_blocks=sum(p.n_blocks for p in parts), est_gflop=sum(p.est_gflop for p in parts),
                               notes=notes)


# --------------------------------------------------------------------------------------------
# The layerwise kernel from per-rank factors
# --------------------------------------------------------------------------------------------

_CHUNK = 256    # samples per recorded forward and backward pass; a share of at most this many: one pass
#                whose gradients are kept as autograd returns them (no copy into per-chunk buffers)


def _shares(n: int, world: int) -> list[tuple[int, int]]:
    """Every rank's contiguous share [lo, hi) of range(n), as :meth:`Dist.shard` cuts it."""
    base, extra = divmod(n, world)
    out, start = [], 0
    for r in range(world):
        size = base + (1 if r < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def _item_cost(layer: StructuredLayer) -> float:
    """Multiply-adds per sample pair of one (output, layer) item of the kernel."""
    if layer.gram:
        return float(layer.t ** 2 * (layer.d_in + layer.d_out + 2))
    return float(layer.p)


def _split(items: set, layers: list[StructuredLayer], a: int, b: int) -> dict[int, set]:
    """The (output, layer) items of the kernel block between the samples of ranks a and b, split
    between the two ranks by cost (greedy, the same on every rank)."""
    lo, hi = min(a, b), max(a, b)
    load, out = {lo: 0.0, hi: 0.0}, {lo: set(), hi: set()}
    for item in sorted(items, key=lambda it: (-_item_cost(layers[it[1]]), it[1], it[0])):
        r = lo if load[lo] <= load[hi] else hi
        out[r].add(item)
        load[r] += _item_cost(layers[item[1]])
    return out


@dataclass
class _Factors:
    """The layer factors of a set of samples: per layer call k its input ``A[k]`` (n, ...), per
    (call, output) the gradient of the output at the call's output ``G[(k, o)]`` (n, ...)."""

    n: int
    A: dict[int, Tensor]
    G: dict[tuple[int, int], Tensor]
    rows: Tensor | None = None     # where their Jacobian rows are written, one item at a time


def _keys(items: set, by_layer: dict[int, list[int]]) -> list[tuple]:
    """What the rank that computes ``items`` needs of another rank's factors, in a fixed order:
    the inputs of every call of their layers, then the gradients of each item's calls."""
    keys: list[tuple] = [("a", k) for li in sorted({li for _, li in items}) for k in by_layer[li]]
    return keys + [("g", k, o) for o, li in sorted(items, key=lambda it: (it[1], it[0])) for k in by_layer[li]]


def _pack(f: _Factors, keys: list[tuple]) -> Tensor:
    return torch.cat([(f.A[key[1]] if key[0] == "a" else f.G[key[1:]]).reshape(-1) for key in keys])


def _unpack(flat: Tensor, keys: list[tuple], n: int, shapes: dict[tuple, tuple]) -> _Factors:
    f, at = _Factors(n, {}, {}), 0
    for key in keys:
        shape = (n,) + shapes[key[:2]]
        size = math.prod(shape)
        view = flat[at:at + size].view(shape)
        at += size
        if key[0] == "a":
            f.A[key[1]] = view
        else:
            f.G[key[1:]] = view
    return f


def _budget(c: _Ctx, layers: list[StructuredLayer], used: list[int], n_me: int, n_big: int, free: int
            ) -> tuple[int, int, bool]:
    """(outputs whose factors are held at once, peak bytes, whether the own samples' patch
    matrices and input Gram products are kept across outputs): the recorded passes of this rank's
    samples and their layer inputs, per output their gradients (own, sent and received), and one
    layer at a time the rows or patch matrices of both sides, Gram products and a kernel block;
    what is left after the outputs keeps the own samples' patch matrices and Gram products of
    every layer when it can (else they are formed again where a layer's items come in twice).
    0 outputs when not even one fits."""
    it, O, S = c.itemsize, c.O, c.stats.saved_numel
    sum_in = sum(layers[li].in_numel for li in used)
    sum_out = sum(layers[li].out_numel for li in used)
    clones = sum(layers[li].out_numel for li in used if layers[li].inplace_out)
    pair = n_me + n_big
    fixed = n_me * (2 * S + clones + O + sum_in) * it + pair * sum_in * it
    work = 0
    for li in used:
        lay = layers[li]
        if lay.gram:
            w = 3 * n_me * pair * lay.t ** 2 * it + pair * lay.t * (lay.d_in + lay.d_out + 2) * it
        else:
            w = pair * (lay.p + (lay.calls * lay.unfold_numel if conv_rows_by_patches(lay) else 0)
                        + (lay.out_numel if lay.kind == "bn" else 0)) * it
        work = max(work, w)
    work += n_me * pair * it
    per_out = (n_me + pair) * sum_out * it
    room = free - fixed - work
    m = int(min(O, room // per_out)) if room > 0 else 0
    kept = sum(n_me * (layers[li].t ** 2 * n_me if layers[li].gram else
                       layers[li].calls * layers[li].unfold_numel if conv_rows_by_patches(layers[li]) else 0)
               for li in used) * it
    keep = m > 0 and room - m * per_out >= kept
    return m, fixed + work + m * per_out + (kept if keep else 0), keep


def _factored(c: _Ctx, layers: list[StructuredLayer], fallback: list[str], ddp: Dist, free: int,
              progress) -> tuple[Tensor, _Plan, int] | None:
    """The trace or diagonal kernel of x1 with itself under ``torchrun``, from layer factors.

    Each rank records the forward pass of its share of the samples once and, per output, one
    backward pass, keeping every structured layer's input and output gradient (the factors of
    the per-sample Jacobian rows, :mod:`probe.autodiff`). The kernel block of its samples with
    themselves it contracts alone (the ``layerwise`` closed forms, rows rebuilt from the factors);
    the block between the samples of two ranks is split between them by (output, layer) items of
    equal cost, and each sends the other the factors of the other's items: ring steps d = 1 ..
    world - 1 (send to rank + d, receive from rank - d), the first overlapped with the items of
    the own block that the cross block does not need. The blocks are summed over the ranks (an
    all-reduce of the kernel, zeros elsewhere) on every rank, each cross block the sum of its two
    halves. When the factors of even one output do not fit ``free`` bytes with the work, or a
    parameter lies outside the structured layers: None (the caller shares out tiles).
    Returns (K, plan, bytes this rank sent)."""
    fm, O, N, it, kind = c.fm, c.O, c.n1, c.itemsize, c.kind
    W, me = ddp.world, ddp.rank
    shares = _shares(N, W)
    lo, hi = shares[me]
    n_me, n_big = hi - lo, max(b - a for a, b in shares)
    layers = [dataclasses.replace(lay, gram=_layer_use_gram(lay, kind, O), keep_patches=False) for lay in layers]
    used = [li for li, lay in enumerate(layers) if lay.calls > 0]
    if fallback or not used or N < W or kind == NtkKind.FULL:
        return None
    m, peak, keep_own = _budget(c, layers, used, n_big, n_big, free)   # the largest share's: the same on every rank
    if m < 1:
        return None

    params = {n: p.detach().requires_grad_() for n, p in fm.params.items()}
    x = c.x1[lo:hi]
    parts = _ranges(n_me, _CHUNK)
    recs, leaves = [], []
    for c0, c1 in parts:
        leaves.append(input_leaf(x[c0:c1]))
        recs.append(record_forward(fm, params, leaves[-1] if leaves[-1] is not None else x[c0:c1], layers))
    first = recs[0]
    by_layer = {li: ks for li, ks in first.by_layer.items() if li in used}
    calls = [k for ks in by_layer.values() for k in ks]
    norms = {k: first.recs[k].norm for k in calls}
    shapes = {("a", k): tuple(first.recs[k].src.shape[1:]) for k in calls}
    shapes.update({("g", k): tuple(first.recs[k].z.shape[1:]) for k in calls})
    mine = _Factors(n_me, {k: torch.cat([r.recs[k].src.detach() for r in recs]) if len(recs) > 1
                           else recs[0].recs[k].src.detach() for k in calls}, {})
    K = torch.zeros(_block_shape(kind, N, N, O), dtype=torch.float64, device=fm.device)
    tri = _tri_blocks(n_me)

    def block(o: int, r: tuple[int, int], s: tuple[int, int]) -> Tensor:
        return K[r[0]:r[1], s[0]:s[1]] if kind == NtkKind.TRACE else K[o, r[0]:r[1], s[0]:s[1]]

    # rows written into reused buffers (no new memory per item), one for each side of a product
    width = grad_blocks_scratch_numel(layers)
    mine.rows = torch.empty(n_me * width, dtype=fm.dtype, device=fm.device) if width else None
    their_rows = torch.empty(n_big * width, dtype=fm.dtype, device=fm.device) if width else None
    acc_own = torch.empty((n_me, n_me), dtype=fm.dtype, device=fm.device)
    kept: dict | None = {} if keep_own else None    # per layer: own patch matrices / input Gram product

    def rows(li: int, f: _Factors, o: int, patches: dict[int, Tensor]) -> list[Tensor]:
        total, layer = None, layers[li]
        out = f.rows if layer.calls == 1 else None
        for k in by_layer[li]:
            blocks = per_sample_grad_blocks(layer, LayerCall(li, f.A[k], None, 0, norms[k]), f.G[(k, o)],
                                            patches.get(k), out)
            total = blocks if total is None else [t.add_(b) for t, b in zip(total, blocks)]
        return total

    def gram(li: int, f1: _Factors, f2: _Factors, o: int, aa: dict) -> Tensor:
        """(n1, n2) sum_ts (a1_t . a2_s)(g1_t . g2_s) of output o; ``aa`` keeps the inputs' Gram
        products of the layer (the same for every output: its patch matrices formed once)."""
        layer, k = layers[li], by_layer[li][0]
        key = (li, f2 is f1)
        have = key in aa
        A1, G1 = gram_factors(layer, None if have else f1.A[k], f1.G[(k, o)].unsqueeze(0))   # (n, T, k), (1, n, T, d)
        A2, G2 = (A1, G1) if f2 is f1 else gram_factors(layer, None if have else f2.A[k],
                                                        f2.G[(k, o)].unsqueeze(0))
        n1, T, n2 = G1.shape[1], G1.shape[2], G2.shape[1]
        if not have:
            aa[key] = (A1.reshape(n1 * T, -1) @ A2.reshape(n2 * T, -1).T).view(n1, T, n2, T)
        return (aa[key] * (G1[0].reshape(n1 * T, -1) @ G2[0].reshape(n2 * T, -1).T).view(n1, T, n2, T)).sum((1, 3))

    def run(own: set, cross: set, theirs: _Factors | None, s: tuple[int, int] | None) -> None:
        """K[mine, mine] += the ``own`` items; K[mine, s] += the ``cross`` items (``theirs``:
        the factors of the samples s). Layer by layer, so that patch matrices and Gram products
        are formed once per layer."""
        for li in used:
            outs = sorted({o for o, lj in own | cross if lj == li})
            if not outs:
                continue
            layer = layers[li]
            if layer.gram:
                aa_own = kept.setdefault(li, {}) if kept is not None else {}
                aa_cross = {}
                for o in outs:
                    if (o, li) in own:
                        block(o, (lo, hi), (lo, hi)).add_(gram(li, mine, mine, o, aa_own))
                    if (o, li) in cross:
                        block(o, (lo, hi), s).add_(gram(li, mine, theirs, o, aa_cross))
                continue
            patched = layer.kind == "conv" and layer.w is not None and conv_rows_by_patches(layer)
            u_own = kept.get(li) if kept is not None else None
            if u_own is None:
                u_own = {k: conv_patches(layer.module, mine.A[k]) for k in by_layer[li]} if patched else {}
                if kept is not None:
                    kept[li] = u_own
            u_cross = ({k: conv_patches(layer.module, theirs.A[k]) for k in by_layer[li]}
                       if patched and any((o, li) in cross for o in outs) else {})
            for o in outs:
                R = rows(li, mine, o, u_own)
                if (o, li) in own:          # the lower block triangle, mirrored at the end
                    acc_own.zero_()
                    for J in R:
                        for j0, j1 in tri:
                            acc_own[j0:, j0:j1].addmm_(J[j0:], J[j0:j1].T)
                    block(o, (lo, hi), (lo, hi)).add_(acc_own)
                if (o, li) in cross:
                    acc = None
                    for J, J2 in zip(R, rows(li, theirs, o, u_cross)):
                        acc = J @ J2.T if acc is None else acc.addmm_(J, J2.T)
                    block(o, (lo, hi), s).add_(acc)
            del u_own, u_cross

    sent = 0
    groups = _ranges(O, m)
    with _progress(len(groups) * W, f"ntk {kind.value} (layer factors over {W} ranks)", progress) as pbar:
        for o0, o1 in groups:
            one = len(parts) == 1              # one pass: autograd's gradients kept as they are
            mine.G = {} if one else {(k, o): torch.empty((n_me,) + shapes[("g", k)], dtype=fm.dtype,
                                                         device=fm.device)
                                     for k in calls for o in range(o0, o1)}
            filled = set()
            for o in range(o0, o1):
                for ci, (c0, c1) in enumerate(parts):
                    def keep(_o, k, g, o=o, ci=ci, c0=c0, c1=c1):
                        if k in norms:
                            if one:
                                mine.G[(k, o)] = g
                            else:
                                mine.G[(k, o)][c0:c1] = g
                            filled.add((k, o, ci))
                    stream_backward(recs[ci], leaves[ci], [o], keep)
            for k in calls:                           # no gradient reached the call: its rows are zero
                for o in range(o0, o1):
                    for ci, (c0, c1) in enumerate(parts):
                        if (k, o, ci) not in filled:
                            if one:
                                mine.G[(k, o)] = torch.zeros((n_me,) + shapes[("g", k)], dtype=fm.dtype,
                                                             device=fm.device)
                            else:
                                mine.G[(k, o)][c0:c1].zero_()
            items = {(o, li) for o in range(o0, o1) for li in used}
            for d in range(1, W):
                dst, src = (me + d) % W, (me - d) % W
                give, take = _split(items, layers, me, dst)[dst], _split(items, layers, me, src)[me]
                keys = _keys(take, by_layer)
                n_src = shares[src][1] - shares[src][0]
                recv = torch.empty(sum(n_src * math.prod(shapes[k[:2]]) for k in keys), dtype=fm.dtype,
                                   device=fm.device)
                send = _pack(mine, _keys(give, by_layer))
                sent += send.numel() * it
                wait = ddp.sendrecv(send, dst, recv, src)
                del send
                if d == 1:                  # overlapped: the own items the cross block does not need
                    run(items - take, set(), None, None)
                    pbar.update(1)
                theirs = _unpack(wait(), keys, n_src, shapes)
                theirs.rows = their_rows
                run(take if d == 1 else set(), take, theirs, shares[src])
                del theirs, recv
                pbar.update(1)
    del recs, leaves, mine, kept
    if len(tri) > 1:
        _mirror_(K[..., lo:hi, lo:hi], tri)
    ddp.all_reduce_(K)
    for i, (a0, a1) in enumerate(shares):          # each cross block: the sum of its two halves
        for b0, b1 in shares[i + 1:]:
            up, down = K[..., a0:a1, b0:b1], K[..., b0:b1, a0:a1]
            both = up + down.transpose(-1, -2)
            up.copy_(both)
            down.copy_(both.transpose(-1, -2))
    n_gram = sum(layers[li].gram for li in used)
    frac = (W + 1) / (2.0 * W)
    flops = N * (1 + _BWD_FP * O) * c.fp + sum(
        2.0 * N * N * O * (layers[li].p if not layers[li].gram else _item_cost(layers[li])) * frac for li in used)
    plan = _Plan("layerwise", True, block=n_me, chunk=_CHUNK, peak_bytes=peak, n_blocks=len(groups) * W,
                 flops=flops, cost=flops, layers=layers,
                 schedule=(f"layer factors of {n_me} samples per rank over {W} ranks, exchanged "
                           f"{m} output(s) at a time, {len(used)} structured layers ({n_gram} by Gram)"
                           + ("" if keep_own else "; own patch matrices formed again per pass (memory budget)")))
    return K, plan, sent
