"""Moments computed in parts and merged (probe.runtime.moments) against one pass over all the
values, in float64: scalars far from zero (where a naive sum of squares would cancel), vectors,
uneven and empty parts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probe.runtime.dist import Dist
from probe.runtime.moments import all_reduce_moments, from_shifted, merge_moments


def _parts(values: np.ndarray, cuts: list[int]):
    """Each part's shifted sums (shift: the part's first value, as the streaming code does) -> (n, mean, m2)."""
    out = []
    for lo, hi in zip([0] + cuts, cuts + [len(values)]):
        v = values[lo:hi]
        if len(v) == 0:
            out.append(from_shifted(0, 0.0, 0.0, 0.0))
            continue
        c = float(v[0])
        out.append(from_shifted(len(v), c, float(np.sum(v - c)), float(np.sum((v - c) ** 2))))
    return out


@pytest.mark.parametrize("offset", [0.0, 1e8])
def test_scalar_parts_merge_to_the_one_pass_moments(offset):
    rng = np.random.default_rng(0)
    values = offset + rng.standard_normal(1001) * 3.0
    mean, m2 = values.mean(), np.sum((values - values.mean()) ** 2)   # one pass, two-pass formula
    for cuts in ([500], [1, 2, 700, 700, 1000], list(range(37, 1001, 37)), [0, 0, 1001]):
        n, got_mean, got_m2 = merge_moments(_parts(values, cuts))
        assert n == 1001
        assert got_mean == pytest.approx(mean, rel=1e-14, abs=1e-14)
        assert got_m2 == pytest.approx(m2, rel=1e-10)          # the variance: exact but for rounding


def test_vector_parts_merge_to_the_one_pass_trace_of_the_covariance():
    torch.manual_seed(1)
    rows = torch.randn(301, 17, dtype=torch.float64) * torch.linspace(0.1, 10, 17) + 5.0
    parts = []
    for lo, hi in ((0, 3), (3, 3), (3, 150), (150, 301)):
        r = rows[lo:hi]
        if len(r) == 0:
            parts.append(from_shifted(0, torch.zeros(17, dtype=torch.float64), torch.zeros(17, dtype=torch.float64),
                                      0.0))
            continue
        c = r[0]
        d = r - c
        parts.append(from_shifted(len(r), c, d.sum(0), float((d * d).sum())))
    n, mean, m2 = merge_moments(parts)
    assert n == 301
    torch.testing.assert_close(mean, rows.mean(0), rtol=1e-14, atol=1e-13)
    want = float(((rows - rows.mean(0)) ** 2).sum())
    assert m2 == pytest.approx(want, rel=1e-12)


def test_empty_parts_and_a_single_process_are_passed_through():
    assert merge_moments([]) == (0, 0.0, 0.0)
    assert merge_moments([(0, 7.0, 0.0), (2, 1.5, 0.5), (0, -3.0, 0.0)]) == (2, 1.5, 0.5)
    assert from_shifted(0, 3.0, 0.0, 0.0) == (0, 0.0, 0.0)
    mean = torch.tensor([1.0, 2.0], dtype=torch.float64)
    n, means, m2 = all_reduce_moments(Dist(), 4, [mean], [2.5])       # no process group: its own part
    assert n == 4 and torch.equal(means[0], mean) and m2 == [2.5]
