"""Mean and sample standard deviation over seeds, and the band figure built from them, against
:mod:`statistics` (exact to float rounding)."""
from __future__ import annotations

import math
import statistics

import pytest

from probe.figures.seeds import mean_sd, seed_band_curves


def test_mean_sd_is_the_sample_mean_and_standard_deviation_of_the_finite_values():
    values = [0.91, 0.87, 0.95, 0.9]
    mean, sd, n = mean_sd(values + [None, float("nan"), float("inf"), True])
    assert n == 4
    assert mean == pytest.approx(statistics.fmean(values), rel=1e-15)
    assert sd == pytest.approx(statistics.stdev(values), rel=1e-12)     # n - 1 in the denominator
    assert mean_sd([3.0]) == (3.0, None, 1)
    assert mean_sd([None, float("nan")]) == (None, None, 0)


def test_seed_bands_are_mean_plus_minus_sd_per_epoch_over_the_runs_that_reached_it():
    run = lambda accs: [{"epoch": e + 1, "test_top1": a, "train_top1": a + 1, "test_loss": 2 - a / 100,
                         "train_loss": 1.0} for e, a in enumerate(accs)]
    runs = [run([50.0, 70.0, 80.0]), run([54.0, 74.0]), run([58.0, 72.0])]
    fig = seed_band_curves([("A", runs), ("B", [run([10.0, 20.0])])])
    by_name = {t.name: t for t in fig.data}
    mean = by_name["A (n=3) test top-1"]
    assert list(mean.x) == [1, 2, 3]
    assert list(mean.y) == pytest.approx([54.0, 72.0, 80.0])            # epoch 3: the one run that got there
    band = by_name["A (n=3) test top-1 +/- sd"]
    sd1, sd2 = statistics.stdev([50.0, 54.0, 58.0]), statistics.stdev([70.0, 74.0, 72.0])
    assert list(band.x) == [1, 2, 2, 1]                                 # no band where one run is left
    assert list(band.y) == pytest.approx([54 + sd1, 72 + sd2, 72 - sd2, 54 - sd1])
    assert "B (n=1) test top-1 +/- sd" not in by_name                   # one run: no band
    assert math.isclose(by_name["B (n=1) test top-1"].y[1], 20.0)
    assert fig.layout.yaxis.title.text == "top-1 (%)" and "nats" in fig.layout.yaxis2.title.text
