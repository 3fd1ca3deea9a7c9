"""The scripted experiments: one quick experiment end to end (its runs trained into the store, its
csv, figure json and html written, its numbers equal to what the store holds, a second call
skipped and --force redoing it), bad input, and all of them quick under ``-m slow``."""
from __future__ import annotations

import csv
import json

import pytest

from experiments import EXPERIMENTS, run_experiment
from experiments.__main__ import main
from experiments._common import Context, is_done


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_landscape_experiment_end_to_end(tmp_path, capsys):
    from probe.jobs import load_result
    from probe.store import RunStore

    runs, out = tmp_path / "runs", tmp_path / "out"
    code = main(["pair_landscape", "--quick", "--runs", str(runs), "--out", str(out), "--quiet", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in doc["experiments"]] == ["pair_landscape"] and not doc["experiments"][0]["skipped"]
    folder = out / "pair_landscape"
    meta = json.loads((folder / "runs.json").read_text())
    store = RunStore(runs)
    assert sorted(r["model"] for r in store.list_runs()) == ["add_resnet", "mul_resnet"]
    assert set(meta["run_ids"]) == {r["run_id"] for r in store.list_runs()}
    page = (folder / "contours.html").read_text()
    assert '"type":"contour"' in page.replace(" ", "") and "../plotly.min.js" in page   # the figure, the shared bundle
    assert (folder.parent / "plotly.min.js").stat().st_size > 1_000_000
    fig = json.loads((folder / "contours.json").read_text())
    assert fig["data"] and fig["data"][0]["type"] == "contour"
    rows = _rows(folder / "numbers.csv")
    assert len(rows) == 2 and {r["model"] for r in rows} == {"add_resnet", "mul_resnet"}
    for row in rows:                                    # the csv holds what the store holds
        _, result = load_result(store, row["probe_id"])
        s = result.summary()
        assert row["probe_id"] in meta["probe_ids"]
        assert float(row["centre_loss"]) == pytest.approx(s["centre_loss"], rel=1e-12)
        assert float(row["loss_scale.max"]) == pytest.approx(s["loss_scale"]["max"], rel=1e-12)
        assert int(row["n_points"]) == 121                 # quick: 11 x 11
    # done: a second call skips it and reuses everything; --force redoes it with the same runs
    ctx = Context(store=store, out=out, quick=True)
    again = run_experiment(ctx, "pair_landscape")
    assert again["skipped"] and again["found"] == meta["found"]
    redo = run_experiment(ctx, "pair_landscape", force=True)
    assert not redo["skipped"]
    assert len(store.list_runs()) == 2                     # the pair's runs were reused, not retrained
    # another setting (full) is not "done"
    assert not is_done(Context(store=store, out=out, quick=False), "pair_landscape")


def test_bad_names_are_one_line_errors(tmp_path, capsys):
    code = main(["nope", "--quick", "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown experiment(s) nope" in err and len(err.strip().splitlines()) == 1
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in EXPERIMENTS)


@pytest.mark.slow
def test_all_experiments_quick(tmp_path, capsys):
    code = main(["all", "--quick", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--quiet",
                 "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in doc["experiments"]] == list(EXPERIMENTS)
    for r in doc["experiments"]:
        assert (tmp_path / "out" / r["name"] / "done.json").exists() and r["found"]
