"""First and second moments computed in parts (ranks, chunks) and merged exactly.

A part is ``(n, mean, m2)``: ``n`` values (scalars, or vectors of one length), their ``mean``
(a float, or a float64 tensor for vectors) and ``m2 = sum_i |x_i - mean|^2`` (a float: for vectors
the squared norms summed), so that the population variance is ``m2 / n`` (the trace of the
covariance for vectors) and the unbiased one ``m2 / (n - 1)``. Streaming code keeps shifted sums
instead (``s1 = sum (x - c)``, ``s2 = sum |x - c|^2`` around a shift ``c`` near the data, so that
nothing cancels); :func:`from_shifted` turns them into a part.

:func:`merge_moments` merges parts pairwise (Chan, Golub & LeVeque 1979, "Updating formulae and a
pairwise algorithm for computing sample variances"): with ``delta = mean_b - mean_a``,
``mean = mean_a + delta n_b / n`` and ``m2 = m2_a + m2_b + |delta|^2 n_a n_b / n`` -- every term
non-negative, so nothing cancels however far the parts' means lie from zero.
:func:`all_reduce_moments` merges every rank's part over a process group with two sums:
``mean = sum_r n_r mean_r / n`` and ``m2 = sum_r (m2_r + n_r |mean_r - mean|^2)`` (the same merge
for many parts at once), for a list of quantities sharing one count in three all-reduces. Both equal the one-pass moments of all the values up to float64 rounding.
"""
from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch
from torch import Tensor

__all__ = ["from_shifted", "merge_moments", "all_reduce_moments"]

Mean = Union[float, Tensor]


def from_shifted(n: int, shift: Mean, s1: Mean, s2: float) -> tuple[int, Mean, float]:
    """The part ``(n, mean, m2)`` of shifted sums ``s1 = sum (x - shift)`` and ``s2 = sum |x - shift|^2``
    (``mean = shift + s1 / n``, ``m2 = s2 - |s1|^2 / n``, clipped at 0). ``n = 0``: ``(0, 0, 0)``."""
    if n <= 0:
        zero = torch.zeros_like(s1) if isinstance(s1, Tensor) else 0.0
        return 0, zero, 0.0
    d = s1 / n
    sq = float(torch.dot(s1.reshape(-1), d.reshape(-1))) if isinstance(s1, Tensor) else s1 * d
    return int(n), shift + d, max(float(s2) - sq, 0.0)


def _sqnorm(t: Mean) -> float:
    return float(torch.dot(t.reshape(-1), t.reshape(-1))) if isinstance(t, Tensor) else float(t) * float(t)


def merge_moments(parts: Iterable[tuple[int, Mean, float]]) -> tuple[int, Mean, float]:
    """The moments ``(n, mean, m2)`` of the union of ``parts``, merged pairwise in a balanced tree
    (Chan et al.); parts with ``n = 0`` are skipped. No part with values: ``(0, 0.0, 0.0)``."""
    level = [(int(n), mean, float(m2)) for n, mean, m2 in parts if n > 0]
    if not level:
        return 0, 0.0, 0.0
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level) - 1, 2):
            (na, ma, qa), (nb, mb, qb) = level[i], level[i + 1]
            n = na + nb
            delta = mb - ma
            nxt.append((n, ma + delta * (nb / n), qa + qb + _sqnorm(delta) * (na * nb / n)))
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def all_reduce_moments(ddp, n: int, means: Sequence[Tensor], m2: Sequence[float]
                       ) -> tuple[int, list[Tensor], list[float]]:
    """Every rank's parts merged over the process group ``ddp`` (a :class:`probe.runtime.dist.Dist`;
    a single process gets its parts back): ``L`` parts with one count ``n`` (vectors ``means[j]``,
    float64, and ``m2[j]``), merged part by part with three all-reduces in all -- of ``n``, of the
    ``n mean_j`` (concatenated) and of the ``m2_j + n |mean_j - mean_all_j|^2``. A rank with
    ``n = 0`` adds nothing; no values on any rank: ``(0, zeros, zeros)``."""
    means = [m.to(torch.float64).reshape(-1) for m in means]
    if not ddp.active:
        return n, means, [float(q) for q in m2]
    device = means[0].device if means else torch.device("cpu")
    counts = ddp.all_reduce_(torch.tensor([float(n)], dtype=torch.float64, device=device))
    total = int(round(float(counts[0])))
    sizes = [m.numel() for m in means]
    flat = torch.cat(means) * float(n) if n > 0 and means else torch.zeros(sum(sizes), dtype=torch.float64,
                                                                           device=device)
    mu = ddp.all_reduce_(flat) / max(total, 1)
    mus = list(torch.split(mu, sizes))
    own = torch.zeros(len(means), dtype=torch.float64, device=device)
    if n > 0:
        for j, (m, u) in enumerate(zip(means, mus)):
            d = m - u
            own[j] = float(m2[j]) + n * torch.dot(d, d)
    q = ddp.all_reduce_(own).tolist()
    return total, mus, q
