"""Figure builders are pure functions from results to plotly figures."""
from __future__ import annotations

import numpy as np

from probe.figures import (eigenlearning_figure, ntk_across_training, ntk_spectrum_figure, training_curves,
                           write_html)


class _Spectrum:
    def __init__(self, ev, cond=10.0, rank=3.0):
        self.eigenvalues = np.asarray(ev, dtype=float)
        self._s = {"spectrum": {"condition_number": cond, "effective_rank": rank}}

    def summary(self):
        return self._s


def test_training_curves_overlay_runs_and_mark_the_best_epoch():
    metrics = [{"epoch": e, "test_top1": t, "train_top1": t + 5, "test_top5": t + 10, "test_loss": 1 / e,
                "train_loss": 0.5 / e} for e, t in ((1, 50.0), (2, 70.0), (3, 65.0))]
    fig = training_curves([({"run_id": "r-aaaaaa", "model": "add"}, metrics),
                           ({"run_id": "r-bbbbbb", "model": "mul"}, metrics[:2])])
    stars = [t for t in fig.data if t.mode == "markers+text"]
    assert len(stars) == 2 and list(stars[0].x) == [2] and list(stars[0].y) == [70.0]
    assert "gap 5.0" in stars[0].text[0] and "gap 0.0" in stars[1].text[0]
    assert len(fig.data) == 2 * 6  # five curves and the best marker per run


def test_ntk_spectrum_is_log_log_and_drops_non_positive_eigenvalues(tmp_path):
    fig = ntk_spectrum_figure([({"model": "add", "run_id": None, "epoch": None}, _Spectrum([1e3, 10, 1, -1e-12])),
                               ({"model": "mul", "run_id": "r", "epoch": 4}, _Spectrum([5, 4, 3]))])
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert list(fig.data[0].y) == [1e3, 10, 1] and list(fig.data[0].x) == [1, 2, 3]
    assert fig.data[0].name == "add (init)" and fig.data[1].name == "mul run r @ epoch 4"
    page = write_html(fig, tmp_path / "ntk.html")
    assert page.read_text().startswith("<html>") or "<html" in page.read_text()[:200]


def test_ntk_across_training_is_ordered_by_epoch():
    fig = ntk_across_training([({"epoch": 2}, _Spectrum([1], cond=5.0)), ({"epoch": 0}, _Spectrum([1], cond=50.0))])
    assert list(fig.data[0].x) == [0, 2] and list(fig.data[0].y) == [50.0, 5.0]


def test_eigenlearning_figure_pairs_prediction_and_measurement():
    class _El:
        def summary(self):
            return {"eigenlearning": {"rows": [
                {"n": 4, "predicted_test_mse": 0.5, "measured_test_mse": 0.45, "measured_test_mse_std": 0.05},
                {"n": 8, "predicted_test_mse": 0.3, "measured_test_mse": 0.32, "measured_test_mse_std": 0.02}]}}

    class _Lanczos:
        def summary(self):
            return {}

    fig = eigenlearning_figure([({"model": "add", "run_id": "r", "epoch": 3}, _El()),
                                ({"model": "mul", "run_id": "r", "epoch": 3}, _Lanczos())])
    assert len(fig.data) == 2  # the Lanczos entry has no eigenlearning rows
    pred, meas = fig.data
    assert list(pred.x) == [4, 8] and list(pred.y) == [0.5, 0.3] and list(meas.error_y.array) == [0.05, 0.02]
