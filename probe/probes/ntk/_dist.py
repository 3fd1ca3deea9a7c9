"""The NTK kernel under ``torchrun``: shared out over the ranks of the job.

:func:`_tiled` shares the tiles of the kernel out over the ranks, each computed alone (every
method and kind, at the price of recomputing each tile's rows and columns).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from probe.probes.ntk.result import NtkKind, NtkResult
from probe.runtime.chunks import map_chunks
from probe.runtime.dist import Dist, local


def _tiled(ddp: Dist, ntk: Callable[..., NtkResult], model: nn.Module, x1: Tensor, x2: Tensor | None, t0: float,
           *, kind: NtkKind, **kw) -> NtkResult:
    """The kernel under ``torchrun``: the samples in ``ddp.world`` contiguous row (and column)
    blocks, the tiles of the upper triangle (all tiles when x2 is given) shared out over the ranks
    (:func:`probe.runtime.chunks.map_chunks`), each computed alone by ``ntk``
    (:func:`~probe.probes.ntk.empirical_ntk`), and assembled on every rank; the lower triangle is the transpose of the upper. Models whose
    samples interact (BatchNorm statistics of the batch) are not tiled."""
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
        f"{', '.join(sorted({p.method for p in parts}))})",)
    return dataclasses.replace(first, kernel=K, n1=n1, n2=n2, symmetric=sym, wall_time_s=time.perf_counter() - t0,
                               peak_memory_bytes=max(p.peak_memory_bytes for p in parts),
                               n_blocks=sum(p.n_blocks for p in parts), est_gflop=sum(p.est_gflop for p in parts),
                               notes=notes)
