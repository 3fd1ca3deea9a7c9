"""The explorer's Compare, Runs and Seed-table pages with ``streamlit.testing.v1.AppTest``: probes of
two runs drawn on shared axes, checkpoints picked, mean +/- sd over the seeds of a recipe, bookkeeping
rows hidden, and the comparison pair linked to its seed rows (fmm01, fmm18)."""
from __future__ import annotations

import json
import statistics

import pytest

from probe.jobs import run_probe
from probe.store import RunStore
from probe.training import TrainConfig, train

from tests.apps import test_explorer as explorer


def _app(root, monkeypatch):
    return explorer._app(root, monkeypatch, timeout=120)


def _goto(at, page: str):
    at = explorer._goto(at, page)
    assert not at.exception, at.exception
    return at


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    """tiny_add with seeds 0 and 1 (one recipe), tiny_mul with seed 0; the NTK at init and after
    each of their 2 epochs; add_resnet and mul_resnet registered as runs of their default fusions."""
    root = tmp_path_factory.mktemp("runs")
    store = RunStore(root)
    runs = {}
    for model, seed in (("tiny_add", 0), ("tiny_add", 1), ("tiny_mul", 0)):
        res = train(TrainConfig(model=model, epochs=2, limit_train=64, limit_test=32, seed=seed), store)
        run_probe(store, "ntk", {"trials": 2}, run=res.run_id, checkpoint="all", n=8)
        runs[(model, seed)] = res.run_id
    for model in ("add_resnet", "mul_resnet"):
        runs[(model, 0)] = store.new_run(model, "digits", TrainConfig(model=model, epochs=1).to_dict())
    return root, runs


def _ntk_rows(root, run_id: str, epoch: int) -> list[dict]:
    rows = [p for p in RunStore(root, readonly=True).list_probes()
            if p["run_id"] == run_id and p["kind"] == "ntk" and (p["checkpoint_epoch"] or 0) == epoch]
    assert rows
    return rows


def _pick(at, a: str, b: str):
    at.selectbox(key="cmp-a").set_value(_label(at, "cmp-a", a)).run()
    at.selectbox(key="cmp-b").set_value(_label(at, "cmp-b", b)).run()
    assert not at.exception, at.exception
    return at


def _label(at, key: str, run_id: str) -> str:
    (label,) = [o for o in at.selectbox(key=key).options if o.endswith(run_id)]
    return label


def _table(at) -> dict:
    frame = at.dataframe[0].value
    return {row["quantity"]: row for row in frame.to_dict("records")}


def test_compare_overlays_both_runs_in_one_figure_and_hides_bookkeeping(store_root, monkeypatch):
    root, runs = store_root
    a, b = runs[("tiny_add", 0)], runs[("tiny_mul", 0)]
    at = _pick(_goto(_app(root, monkeypatch), "Compare"), a, b)
    assert [s.value for s in at.subheader] == ["ntk"]
    charts = at.get("plotly_chart")
    assert len(charts) == 2                          # training curves + one NTK figure with A and B overlaid
    table = _table(at)
    assert "n_params" not in table and "epoch" not in table and not any(q.endswith(".n_params") for q in table)
    newest_a, newest_b = _ntk_rows(root, a, 2)[-1], _ntk_rows(root, b, 2)[-1]
    key = next(k for k in table if k.endswith("condition_number"))
    want = newest_a["summary"]
    for part in key.split("."):
        want = want[part]
    assert table[key]["A"] == pytest.approx(want, rel=1e-12)
    at.checkbox(key="cmp-bookkeeping").check().run()
    assert any(q.rsplit(".", 1)[-1] == "n_params" for q in _table(at))
    assert newest_b["run_id"] == b


def test_compare_reads_the_checkpoints_picked(store_root, monkeypatch):
    root, runs = store_root
    a, b = runs[("tiny_add", 0)], runs[("tiny_mul", 0)]
    at = _pick(_goto(_app(root, monkeypatch), "Compare"), a, b)
    assert at.selectbox(key="cmp-ckpt-a").options == ["init", "epoch 1", "epoch 2"]
    at.selectbox(key="cmp-ckpt-a").set_value(0).run()       # A at initialisation, B after training
    table = _table(at)
    key = next(k for k in table if k.endswith("kernel_trace"))
    init_a, last_b = _ntk_rows(root, a, 0)[-1]["summary"], _ntk_rows(root, b, 2)[-1]["summary"]
    for part in key.split("."):
        init_a, last_b = init_a[part], last_b[part]
    assert table[key]["A"] == pytest.approx(init_a, rel=1e-12)
    assert table[key]["B"] == pytest.approx(last_b, rel=1e-12)


def test_compare_pools_the_seeds_of_a_recipe_into_mean_and_sd(store_root, monkeypatch):
    root, runs = store_root
    a, a1, b = runs[("tiny_add", 0)], runs[("tiny_add", 1)], runs[("tiny_mul", 0)]
    at = _pick(_goto(_app(root, monkeypatch), "Compare"), a, b)
    at.checkbox(key="cmp-seeds").check().run()
    assert not at.exception, at.exception
    assert any("A: 2 run(s), seed 0, 1; B: 1 run(s), seed 0" in c.value for c in at.caption)
    table = _table(at)
    key = next(k for k in table if k.endswith("kernel_trace"))
    values = []
    for run_id in (a, a1):
        v = _ntk_rows(root, run_id, 2)[-1]["summary"]
        for part in key.split("."):
            v = v[part]
        values.append(v)
    row = table[key]
    assert row["n A"] == 2 and row["n B"] == 1
    assert row["A"] == pytest.approx(statistics.fmean(values), rel=1e-12)
    assert row["sd A"] == pytest.approx(statistics.stdev(values), rel=1e-9)
    names = [trace.get("name") for trace in json.loads(at.get("plotly_chart")[0].proto.spec)["data"]]
    assert "A tiny_add (n=2) test top-1" in names and "A tiny_add (n=2) test top-1 +/- sd" in names


def test_runs_and_seed_table_link_the_pair_to_fmm01_and_fmm18(store_root, monkeypatch):
    root, runs = store_root
    at = _app(root, monkeypatch)
    rows = {r["run"]: r for r in at.dataframe[0].value.to_dict("records")}
    add, mul = rows[runs[("add_resnet", 0)]], rows[runs[("mul_resnet", 0)]]
    assert (add["fusion"], add["seed row"]) == ("add,r=bn,s=id", "fmm01")
    assert (mul["fusion"], mul["seed row"]) == ("mul,r=bn,s=bn", "fmm18")
    assert rows[runs[("tiny_add", 1)]]["seed"] == 1
    _goto(at, "Seed table")
    seed = {r["id"]: r for r in at.dataframe[0].value.to_dict("records")}
    by_fusion = {}
    for row in rows.values():
        by_fusion.setdefault(row["fusion"], []).append(row)
    for sid, fusion, model in (("fmm01", "add,r=bn,s=id", "add_resnet"), ("fmm18", "mul,r=bn,s=bn", "mul_resnet")):
        assert seed[sid]["runs here"] == len(by_fusion[fusion])       # tiny models of the same fusion count too
        assert model in seed[sid]["models"].split(", ")
