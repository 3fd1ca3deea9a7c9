"""Kernel blocks: their shapes per kind, and the row block x column block schedule.

A kernel is assembled block by block: rows of x1 against columns of x2 (with x2 = x1 only the
blocks on and above the diagonal are computed and mirrored). Blocks are float64, shaped
(b1, b2) (trace), (O, b1, b2) (diagonal) or (b1, O, b2, O) (full, reshaped to the sample-major
(N1*O, N2*O) kernel at the end).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from probe.probes.ntk._plan import _Ctx
from probe.probes.ntk._util import _ranges
from probe.probes.ntk.result import NtkKind


def _block_shape(kind: NtkKind, b1: int, b2: int, O: int) -> tuple[int, ...]:
    return {NtkKind.TRACE: (b1, b2), NtkKind.DIAGONAL: (O, b1, b2),
            NtkKind.FULL: (b1, O, b2, O)}[kind]


def _put(K: Tensor, kind: NtkKind, blk: Tensor, r: tuple[int, int], s: tuple[int, int],
         transpose: bool = False) -> None:
    """K[rows r, cols s] += blk (or, transposed, K[cols s, rows r] += blk^T)."""
    if transpose:
        r, s = s, r
        blk = {NtkKind.TRACE: lambda t: t.T, NtkKind.DIAGONAL: lambda t: t.transpose(1, 2),
               NtkKind.FULL: lambda t: t.permute(2, 3, 0, 1)}[kind](blk)
    if kind == NtkKind.TRACE:
        K[r[0]:r[1], s[0]:s[1]] += blk
    elif kind == NtkKind.DIAGONAL:
        K[:, r[0]:r[1], s[0]:s[1]] += blk
    else:
        K[r[0]:r[1], :, s[0]:s[1], :] += blk


def _schedule(c: _Ctx, K: Tensor, block: int, feats: Callable[[Tensor], Any],
              contract: Callable[[Any, Any], Tensor], pbar) -> None:
    """Row block x column block loop; with x2 = x1 only blocks j >= i are computed and mirrored."""
    rows = _ranges(c.n1, block)
    cols = rows if c.sym else _ranges(c.n2, block)
    for bi, r in enumerate(rows):
        f1 = feats(c.x1[r[0]:r[1]])
        for bj, s in enumerate(cols):
            if c.sym and bj < bi:
                continue
            f2 = f1 if (c.sym and bj == bi) else feats(c.x2[s[0]:s[1]])
            blk = contract(f1, f2)
            _put(K, c.kind, blk, r, s)
            if c.sym and bj > bi:
                _put(K, c.kind, blk, r, s, transpose=True)
            del f2, blk
            pbar.update(1)
        del f1


def _symmetrize_(K: Tensor, block: int = 1024) -> None:
    """K = (K + K^T) / 2 over the last two axes, in place, by blocks (no kernel-sized temporary)."""
    n = K.shape[-1]
    for i in range(0, n, block):
        for j in range(i, n, block):
            a = K[..., i:i + block, j:j + block]
            if i == j:
                a.copy_(0.5 * (a + a.transpose(-1, -2)))
            else:
                b = K[..., j:j + block, i:i + block]
                m = 0.5 * (a + b.transpose(-1, -2))
                a.copy_(m)
                b.copy_(m.transpose(-1, -2))
