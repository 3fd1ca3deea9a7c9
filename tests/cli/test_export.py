"""`probe export` and probe.run_metrics_frame: a run's metrics and its probes' numbers out as CSV
(read back here), TensorBoard event files (read back when tensorboard is installed), a DataFrame."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from probe.jobs import run_probe
from probe.store import RunStore, run_metrics_frame
from probe.store.export import flatten_summary
from probe.training import TrainConfig, train
from tests.probes.test_registry import cli


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """A 2-epoch tiny_add run with one Hessian probe of its last checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    store = RunStore(root)
    res = train(TrainConfig(model="tiny_add", epochs=2, limit_train=64, limit_test=32, schedule="constant"), store)
    [o] = run_probe(store, "hessian", {"k": 3, "density": True, "density_probes": 1, "density_steps": 8,
                                       "trace_matvecs": 6}, run=res.run_id, n=32)
    return root, res.run_id, o.info["probe_id"]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _close(text, value):
    if value is None:
        return text == ""
    return math.isclose(float(text), float(value), rel_tol=1e-12, abs_tol=0.0)


def test_csv_export_reads_back(probed, tmp_path, capsys):
    root, run_id, probe_id = probed
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "export", run_id, "--format", "csv", "--out", out, "--runs", root, "--json")
    assert code == 0, err
    files = json.loads(stdout)["files"]
    store = RunStore(root, readonly=True)
    rows = _read(out / f"{run_id}_metrics.csv")
    metrics = store.get_metrics(run_id)
    header = rows[0]
    assert header[0] == "epoch" and len(rows) == 1 + len(metrics) == 3
    for row, m in zip(rows[1:], metrics):
        for name, text in zip(header, row):
            assert _close(text, m.get(name)), (name, text, m.get(name))
    summary = dict(_read(out / f"{probe_id}_summary.csv")[1:])
    p = store.get_probe(probe_id)
    assert summary["kind"] == "hessian" and summary["run_id"] == run_id and summary["checkpoint_epoch"] == "2"
    assert _close(summary["lambda_max"], p["summary"]["lambda_max"])
    assert _close(summary["top_eigenvalues.2"], p["summary"]["top_eigenvalues"][2])
    arrays = store.load_probe_arrays(probe_id)
    name = next(k for k, v in arrays.items() if np.asarray(v).ndim == 1 and np.asarray(v).dtype.kind == "f")
    back = _read(out / f"{probe_id}_{name}.csv")
    assert back[0] == ["index", "value"]
    np.testing.assert_allclose([float(r[1]) for r in back[1:]], np.asarray(arrays[name]), rtol=1e-15)
    assert str(out / f"{run_id}_metrics.csv") in files


def test_metrics_as_a_dataframe(probed):
    root, run_id, _ = probed
    store = RunStore(root, readonly=True)
    frame = run_metrics_frame(store, run_id[:12])
    metrics = store.get_metrics(run_id)
    assert list(frame.index) == [1, 2]
    assert frame.loc[2, "test_top1"] == metrics[1]["test_top1"]
    assert frame.loc[1, "train_loss"] == metrics[0]["train_loss"]


def test_flatten_summary():
    assert flatten_summary({"a": {"b": 1, "c": [2, 3]}, "d": "x"}) == {"a.b": 1, "a.c.0": 2, "a.c.1": 3, "d": "x"}


def test_tensorboard_export_reads_back_or_says_what_it_needs(probed, tmp_path, capsys):
    root, run_id, probe_id = probed
    code, out, err = cli(capsys, "export", run_id, "--format", "tensorboard", "--out", tmp_path / "tb",
                         "--runs", root)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert code == 2 and len(err.strip().splitlines()) == 1 and "needs the tensorboard package" in err, err
        pytest.skip("tensorboard is not installed: the one-line refusal was checked")
    assert code == 0, err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / run_id), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    metrics = RunStore(root, readonly=True).get_metrics(run_id)
    got = [(e.step, e.value) for e in acc.Scalars("metrics/test_loss")]
    assert [s for s, _ in got] == [1, 2]
    np.testing.assert_allclose([v for _, v in got], [m["test_loss"] for m in metrics], rtol=1e-6)
    assert "hessian/lambda_max" in acc.Tags()["scalars"] and acc.Tags()["histograms"]


def test_export_bad_input_one_line(probed, tmp_path, capsys):
    root, run_id, _ = probed
    f = tmp_path / "afile"
    f.write_text("x")
    for argv, needle in ((["export", "--runs", root], "give a run or at least one probe id"),
                         (["export", run_id, "--out", f, "--runs", root], "a file, not a folder"),
                         (["export", run_id, "--probe", "nope", "--runs", root], "nope"),
                         (["export", run_id, "--format", "xls", "--runs", root], "invalid choice")):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (argv, err)
