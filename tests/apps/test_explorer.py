"""The explorer with ``streamlit.testing.v1.AppTest``: every page on a store with tiny runs and
every probe, and the empty-store, failed-run, corrupt- and missing-artifact cases."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from probe.jobs import run_probe
from probe.probes.registry import get_probe, list_probes
from probe.store import RunStore
from probe.training import TrainConfig, train

APP = str(Path(__file__).resolve().parents[2] / "apps" / "explorer.py")


def _app(root, monkeypatch, timeout: float = 60):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PROBE_RUNS", str(root))
    at = AppTest.from_file(APP, default_timeout=timeout)
    at.run()
    return at


def _goto(at, page: str):
    at.sidebar.radio(key="page").set_value(page).run()
    return at


def _text(at) -> str:
    parts = [e.value for e in (*at.info, *at.warning, *at.error, *at.markdown, *at.caption)]
    return "\n".join(str(p) for p in parts)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    store = RunStore(root)
    ids = []
    for model in ("tiny_add", "tiny_mul"):
        res = train(TrainConfig(model=model, epochs=2, limit_train=64, limit_test=32), store)
        ids.append(res.run_id)
        for name in list_probes():
            run_probe(store, name, get_probe(name).smoke, run=res.run_id, checkpoint="all", n=16)
    return root, ids


def test_every_page_renders_without_an_exception(store_root, monkeypatch):
    root, ids = store_root
    at = _app(root, monkeypatch)
    assert not at.exception, at.exception
    assert len(at.dataframe) == 1 and at.dataframe[0].value.shape[0] == 2  # the runs table
    assert any(ids[0] in str(v) for v in at.dataframe[0].value["run"])
    for page in (*list_probes(), "Compare", "Seed table"):
        _goto(at, page)
        assert not at.exception, (page, at.exception)
        assert not at.error, (page, [e.value for e in at.error])
        if page in list_probes():  # the probe's figure and its extra figures, each downloadable
            n = 1 + len(get_probe(page).extra_figures)
            assert len(at.get("plotly_chart")) == n and len(at.get("download_button")) == n, page
    _goto(at, "Seed table")
    table = at.dataframe[0].value
    assert table.shape[0] == 59 and "Caltech-101 top-1" in table.columns


def test_compare_shows_the_probes_both_runs_have(store_root, monkeypatch):
    root, _ = store_root
    at = _goto(_app(root, monkeypatch), "Compare")
    assert not at.exception
    assert {s.value for s in at.subheader} >= set(list_probes())
    assert len(at.dataframe) >= 1 and "differs" in at.dataframe[0].value.columns


def test_an_empty_store_says_how_to_fill_it(tmp_path, monkeypatch):
    at = _app(tmp_path / "nothing", monkeypatch)
    assert not at.exception and "No runs in" in _text(at)
    for page in list_probes():
        _goto(at, page)
        assert not at.exception and f"probe {page} --model" in _text(at)
    assert not (tmp_path / "nothing").exists()  # the explorer created nothing


def test_failed_run_corrupt_and_missing_artifacts_are_messages(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    store = RunStore(root)
    res = train(TrainConfig(model="tiny_add", epochs=1, limit_train=64, limit_test=32), store)
    store.update_run(res.run_id, status="failed", error="loss became nan at epoch 1, step 2")
    outcomes = run_probe(store, "ntk", {"trials": 2}, run=res.run_id, checkpoint="all", n=8)
    first, second = (Path(store.get_probe(o.info["probe_id"])["artifact"]) for o in outcomes)
    first.write_bytes(first.read_bytes()[:-10])  # corrupt
    second.unlink()  # missing
    at = _app(root, monkeypatch)
    assert not at.exception and "loss became nan" in _text(at)
    _goto(at, "ntk")
    at.multiselect(key="ntk-pick").set_value(at.multiselect(key="ntk-pick").options).run()
    assert not at.exception
    errors = " ".join(e.value for e in at.error)
    assert "corrupt or truncated" in errors and "missing" in errors


def test_a_newer_catalog_is_a_message(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    RunStore(root).close()
    con = sqlite3.connect(root / "catalog.sqlite")
    con.execute("UPDATE schema_version SET version = 99")
    con.commit()
    con.close()
    at = _app(root, monkeypatch)
    assert not at.exception and "upgrade landscape-probe" in " ".join(e.value for e in at.error)
