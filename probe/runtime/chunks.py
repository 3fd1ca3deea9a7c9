"""Independent chunks of one probe's work, shared out over the ranks of a ``torchrun`` job and
saved as they finish: the one mechanism behind grid chunks, sample blocks and probe vectors.

:func:`map_chunks` computes ``compute(i)`` for ``i`` in ``range(n)``. Chunks saved by an
interrupted attempt of the same job (``partial``) are taken as they are; the missing ones go round
robin to the ranks, a round of one chunk per rank at a time, and after each round every rank has
every result of the round (so all ranks go on with the same numbers) and rank 0 saves them. A
single process computes them in order: the same code path, the same results.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["map_chunks"]


def map_chunks(n: int, compute: Callable[[int], dict[str, np.ndarray]], *, piece: Callable[[int], str],
               partial: Any = None, fits: Callable[[int, dict], bool] | None = None, dist=None,
               progress=None, desc: str = "", done_of: Callable[[int], int] | None = None,
               total: int | None = None) -> tuple[list[dict[str, np.ndarray]], int]:
    """``([compute(0), ..., compute(n - 1)], number taken from partial)`` on every rank.

    ``piece(i)`` names chunk i in ``partial`` (:class:`probe.runtime.partial.PartialResults`, read
    and written by rank 0 only); ``fits(i, arrays)`` whether a saved chunk belongs to this job's
    layout; ``dist`` the :class:`probe.runtime.dist.Dist` (default: :func:`probe.runtime.dist.current`);
    ``progress(desc, done_of(i), total)`` after each chunk."""
    from probe.runtime.dist import current

    ddp = dist if dist is not None else current()
    saved: dict[int, dict] = {}
    if ddp.main and partial is not None:
        for i in range(n):
            got = partial.get(piece(i))
            if got is not None and (fits is None or fits(i, got)):
                saved[i] = got
    saved = ddp.broadcast(saved)
    results: dict[int, dict] = dict(saved)
    missing = [i for i in range(n) if i not in saved]
    total = n if total is None else total
    for start in range(0, len(missing), ddp.world):
        batch = missing[start:start + ddp.world]
        mine = batch[ddp.rank] if ddp.rank < len(batch) else None
        out = compute(mine) if mine is not None else None
        for i, arrays in ddp.all_gather((mine, out)):
            if i is None:
                continue
            results[i] = arrays
            if ddp.main and partial is not None:
                partial.put(piece(i), arrays)
        if progress is not None:
            progress(desc, done_of(max(batch)) if done_of else max(batch) + 1, total)
    return [results[i] for i in range(n)], len(saved)
