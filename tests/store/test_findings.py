"""Findings: the store's findings table (save, list, get, supersede, migration, damaged rows,
rebuild), the figure builders of probe/figures/findings.py and the explorer's Findings page."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import probe.store.findings as store_mod
from probe.errors import StoreError, UserError
from probe.figures.findings import (FINDING_KINDS, cells_figure, correlations_figure, finding_figures, finding_tables,
                                    seed_table_figure, trainability_loss_figure, trainability_tests_figure,
                                    validate_finding, verdict_figure)
from probe.store import SCHEMA_VERSION, RunStore
from probe.store.records import valid_id

APP = str(Path(__file__).resolve().parents[2] / "apps" / "explorer.py")


# ---- payloads of every kind --------------------------------------------------------------------


def _cell(variant, seed, train_err, test_err, regime="small", formula="x + y"):
    return {"regime": regime, "data": "digits", "n_train": 512, "depth": 8, "image_size": None, "epochs": 2,
            "variant": variant, "formula": formula, "seed": seed, "run_id": f"run-{variant}-{seed}",
            "status": "finished", "train_loss": 0.1, "train_err": train_err, "test_loss": 0.3, "test_err": test_err}


def cells_payload() -> dict:
    return {"kind": "cells", "title": "Errors per regime", "rows": [
        _cell("fmm08", 0, 10.0, 20.0, formula="x * y"), _cell("fmm08", 1, 14.0, 24.0, formula="x * y"),
        _cell("fmm01", 0, 1.0, 5.0), _cell("fmm01", 1, 3.0, 7.0),
        _cell("fmm08", 0, None, None, regime="large", formula="x * y"), _cell("fmm01", 0, 2.0, 6.0, regime="large")]}


def _verdict_row(variant, test_gap, train_gap, lo, hi, regime="small"):
    return {"regime": regime, "variant": variant, "formula": "x * y", "n_seeds": 2, "test_gap": test_gap,
            "test_gap_lo": lo, "test_gap_hi": hi, "train_gap": train_gap, "opt_share": 0.5, "opt_share_lo": 0.2,
            "opt_share_hi": 0.8, "matched_status": "matched", "matched_gap": 3.0, "matched_gap_lo": 1.0,
            "matched_gap_hi": 5.0, "predictor": "ntk_cond", "predictor_rho": 0.6, "predictor_p_holm": 0.04,
            "answer": "mostly optimisation"}


def verdict_payload() -> dict:
    return {"kind": "verdict", "title": "Verdict per regime", "baseline": "fmm01",
            "paragraph": "Multiplication loses 15 points, half of them in training.",
            "rows": [_verdict_row("fmm08", 15.0, 6.0, 12.0, 18.0),
                     _verdict_row("fmm09", 8.0, None, None, None, regime="large")]}


def trainability_payload() -> dict:
    rows = [{"depth": d, "variant": v, "seed": s, "trained": loss is not None and loss < 1.0, "train_loss": loss,
             "measures": {"signal_slope": 0.1 * d, "ntk_cond": None, "custom": 1.0}}
            for d, v, s, loss in ((8, "fmm01", 0, 0.01), (8, "fmm01", 1, 0.03), (32, "fmm01", 0, 0.05),
                                  (8, "fmm08", 0, 0.2), (32, "fmm08", 0, 2.3), (32, "fmm08", 1, None))]
    tests = [{"depth": 8, "measure": "signal_slope", "rho": 0.5, "p": 0.01, "p_holm": 0.03, "n": 12},
             {"depth": "all", "measure": "ntk_cond", "rho": -0.25, "p": 0.2, "p_holm": 0.6, "n": 24},
             {"depth": 32, "measure": "signal_slope", "rho": None, "p": None, "p_holm": None, "n": 3}]
    return {"kind": "trainability", "title": "Trainability over depth", "rows": rows, "tests": tests}


def seed_table_payload() -> dict:
    return {"kind": "seed_table", "title": "Seed table reproduced", "protocol": "digits-2ep", "rho": 0.62,
            "lo": 0.31, "hi": 0.83, "n": 3, "rows": [
                {"id": "fmm01", "formula": "bn(r) + s", "group": "add", "caltech": 70.5, "acc_mean": 95.0,
                 "acc_sd": 0.5, "n_seeds": 2},
                {"id": "fmm08", "formula": "r * s", "group": "mul", "caltech": 60.0, "acc_mean": 90.0,
                 "acc_sd": None, "n_seeds": 1},
                {"id": "fmm09", "formula": "sig(r) * s", "group": "mul", "caltech": None, "acc_mean": 91.0,
                 "acc_sd": 1.0, "n_seeds": 2}]}


def correlations_payload() -> dict:
    return {"kind": "correlations", "title": "Measures against the gap", "when": "trained", "rows": [
        {"measure": "sat", "label": "saturation", "kind": "optimisation", "group": "all", "rho": 0.4, "lo": 0.1,
         "hi": 0.7, "p": 0.01, "p_holm": 0.05, "n": 20},
        {"measure": "sat", "label": "saturation", "kind": "optimisation", "group": "mul", "rho": None, "lo": None,
         "hi": None, "p": None, "p_holm": None, "n": 4},
        {"measure": "cond", "label": "NTK cond", "kind": "generalisation", "group": "all", "rho": -0.2, "lo": -0.5,
         "hi": 0.1, "p": 0.3, "p_holm": 1.0, "n": 20}]}


PAYLOADS = {"cells": cells_payload, "verdict": verdict_payload, "trainability": trainability_payload,
            "seed_table": seed_table_payload, "correlations": correlations_payload}


def _values(seq) -> list:
    """A trace's values as a list (plotly may hand back a tuple or an array)."""
    return list(seq)


@pytest.fixture
def store(tmp_path):
    s = RunStore(tmp_path / "runs")
    yield s
    s.close()


def _tamper(store: RunStore, sql: str, params: tuple = ()) -> None:
    con = sqlite3.connect(store.catalog_path, isolation_level=None)
    con.execute(sql, params)
    con.close()


# ---- the store -------------------------------------------------------------------------------


def test_every_kind_has_a_sample_payload_that_validates():
    assert set(PAYLOADS) == set(FINDING_KINDS)
    for kind, make in PAYLOADS.items():
        assert validate_finding(make()) is None, kind


def test_save_list_get_round_trip_and_the_newer_supersedes(store):
    payload = cells_payload()
    payload["extra"] = {"acc": np.float32(0.5), "n": np.int64(3), "arr": np.arange(3), "nan": float("nan")}
    fid = store.save_finding("regimes", "cells", payload)
    assert valid_id(fid) and "regimes-cells" in fid
    other = store.save_finding("fusion_table", "seed_table", seed_table_payload())
    got = store.get_finding("regimes", "cells")
    assert got["finding_id"] == fid and got["experiment"] == "regimes" and got["name"] == "cells"
    assert got["payload"]["extra"] == {"acc": 0.5, "n": 3, "arr": [0, 1, 2], "nan": None}
    assert got["payload"]["rows"] == payload["rows"] and "error" not in got
    on_disk = json.loads((store.root / "findings" / f"{fid}.json").read_text())
    assert on_disk == {k: got[k] for k in ("finding_id", "experiment", "name", "created_at", "payload")}

    newer = cells_payload()
    newer["title"] = "Errors per regime, again"
    fid2 = store.save_finding("regimes", "cells", newer)
    listed = store.list_findings()
    assert [(f["experiment"], f["name"]) for f in listed] == [("fusion_table", "seed_table"), ("regimes", "cells")]
    assert listed[1]["finding_id"] == fid2 and listed[1]["payload"]["title"] == "Errors per regime, again"
    assert store.get_finding("regimes", "cells")["finding_id"] == fid2
    assert [f["finding_id"] for f in store.list_findings("fusion_table")] == [other]
    assert store.list_findings("nothing") == [] and store.get_finding("regimes", "nothing") is None
    assert store.skipped == []
    reader = RunStore(store.root, readonly=True)
    assert [f["finding_id"] for f in reader.list_findings()] == [other, fid2]
    with pytest.raises(StoreError, match="read-only"):
        reader.save_finding("regimes", "cells", newer)


def test_unknown_kinds_are_stored_and_bad_payloads_and_names_refused(store, monkeypatch):
    fid = store.save_finding("x", "mystery", {"kind": "sonar", "pings": [1, 2]})
    assert store.get_finding("x", "mystery")["finding_id"] == fid
    bad = cells_payload()
    bad["rows"][2]["test_err"] = "five"
    for payload, needle in ((["kind"], "must be a dict"), ({"title": "t"}, "needs a 'kind'"),
                            ({"kind": 3}, "needs a 'kind'"), ({"kind": "x", "o": object()}, "cannot be stored as JSON"),
                            (bad, r"rows\[2\].test_err must be a number or null, got 'five'")):
        with pytest.raises(UserError, match=needle):
            store.save_finding("x", "y", payload)
    for name in ("", "  ", "a\nb", "x" * 201, 5, None):
        with pytest.raises(UserError, match="invalid finding name"):
            store.save_finding("x", name, {"kind": "sonar"})
    with pytest.raises(UserError, match="invalid experiment name"):
        store.save_finding("a\x1b[31m", "y", {"kind": "sonar"})
    monkeypatch.setattr(store_mod, "FINDING_MAX_BYTES", 1000)
    with pytest.raises(UserError, match="over the 0 MiB limit"):
        store.save_finding("x", "big", {"kind": "sonar", "blob": "a" * 2000})
    assert store.get_finding("x", "big") is None and store.get_finding("x", "y") is None
    assert len(list((store.root / "findings").iterdir())) == 1  # only the stored one has a file


def test_a_readonly_older_catalog_reads_with_no_findings_and_a_writer_migrates_it(tmp_path):
    root = tmp_path / "runs"
    s = RunStore(root)
    rid = s.new_run("m", "d", {})
    s.close()
    con = sqlite3.connect(root / "catalog.sqlite", isolation_level=None)
    con.execute("DROP TABLE findings")
    con.execute("UPDATE schema_version SET version = 1")
    con.close()
    before = (root / "catalog.sqlite").read_bytes()
    old = RunStore(root, readonly=True)
    assert old.list_findings() == [] and old.get_finding("a", "b") is None
    assert [r["run_id"] for r in old.list_runs()] == [rid]
    old.close()
    assert (root / "catalog.sqlite").read_bytes() == before
    new = RunStore(root)  # a writer upgrades it
    assert new._read("SELECT version FROM schema_version")[0][0] == SCHEMA_VERSION == 2
    new.save_finding("a", "b", {"kind": "sonar"})
    assert [f["name"] for f in new.list_findings()] == ["b"]
    new.close()


def test_an_older_catalog_missing_a_table_of_its_version_is_damaged(tmp_path):
    root = tmp_path / "runs"
    RunStore(root).close()
    con = sqlite3.connect(root / "catalog.sqlite", isolation_level=None)
    con.execute("DROP TABLE findings")
    con.execute("DROP TABLE probes")
    con.execute("UPDATE schema_version SET version = 1")
    con.close()
    for readonly in (True, False):
        with pytest.raises(StoreError, match="damaged .table probes is missing"):
            RunStore(root, readonly=readonly)


def test_damaged_rows_come_back_as_one_line_errors(store, monkeypatch):
    good = store.save_finding("regimes", "cells", cells_payload())
    for i, text in enumerate(("{not json", "[1, 2]", '{"title": "no kind"}', '"text"', "[" * 100000,
                              '{"kind": 5}')):
        _tamper(store, "INSERT INTO findings VALUES (?, 'broken', ?, ?, ?)",
                (f"bad-{i}", f"row{i}", f"2099-01-0{i + 1}", text))
    _tamper(store, "INSERT INTO findings VALUES ('../evil', 'broken', 'id', '2099', '{\"kind\": \"x\"}')")
    _tamper(store, "INSERT INTO findings VALUES ('nan-1', 'broken', 'nan', '2099', '{\"kind\": \"x\", \"v\": NaN, "
                   "\"w\": 1e999}')")
    listed = store.list_findings()
    by_name = {f["name"]: f for f in listed}
    assert by_name["cells"]["finding_id"] == good and "error" not in by_name["cells"]
    assert by_name["nan"]["payload"] == {"kind": "x", "v": None, "w": None}  # strict JSON values only
    for i, needle in enumerate(("not valid JSON", "not a JSON object (list)", "has no kind", "not a JSON object (str)",
                                "not valid JSON", "has no kind (kind is 5)")):
        f = by_name[f"row{i}"]
        assert f["payload"] is None and needle in f["error"] and f"broken/row{i}" in f["error"], (i, f)
        assert "\n" not in f["error"]
    assert len(store.skipped) == 1 and "'../evil'" in store.skipped[0]
    monkeypatch.setattr(store_mod, "FINDING_MAX_BYTES", 100)
    big = store.get_finding("regimes", "cells")
    assert big["payload"] is None and "bytes, over the 0 MiB limit" in big["error"]


def test_hostile_text_is_kept_as_text(store):
    payload = cells_payload()
    payload["title"] = "<script>alert(1)</script> <img src=x onerror=alert(2)>"
    payload["rows"][0]["variant"] = "<b>fmm08</b>"
    store.save_finding("'; DROP TABLE findings; --", "<script>", payload)
    got = store.list_findings()[0]
    assert got["experiment"] == "'; DROP TABLE findings; --" and got["name"] == "<script>"
    assert got["payload"]["title"] == payload["title"]
    fig = cells_figure(got["payload"])
    assert "<script>" not in fig.layout.title.text and "&lt;script&gt;" in fig.layout.title.text
    assert "&lt;b&gt;fmm08&lt;/b&gt;" in list(fig.data[0].x)


def test_findings_survive_a_catalog_rebuild(store):
    fid = store.save_finding("regimes", "cells", cells_payload())
    old = store.save_finding("regimes", "verdict", verdict_payload())
    new = store.save_finding("regimes", "verdict", {**verdict_payload(), "title": "newer"})
    (store.root / "findings" / "20000101-000000-a-b-00000000.json").write_text("{broken")
    (store.root / "findings" / "20000101-000000-a-c-00000000.json").write_text(
        json.dumps({"finding_id": "someone-else", "experiment": "a", "name": "c", "created_at": "x", "payload": {}}))
    store.close()
    (store.root / "catalog.sqlite").write_bytes(b"garbage " * 100)
    report = RunStore.rebuild_catalog(store.root)
    assert report["findings"] == 3 and len(report["skipped"]) == 2
    assert "a-b-00000000.json" in report["skipped"][0] and "a-c-00000000.json: finding_id" in report["skipped"][1]
    s = RunStore(store.root)
    assert [f["finding_id"] for f in s.list_findings()] == [fid, new]
    assert s.get_finding("regimes", "cells")["payload"] == cells_payload()
    assert old not in {f["finding_id"] for f in s.list_findings()}
    s.close()


# ---- validation ------------------------------------------------------------------------------


def _broken(kind: str, change) -> dict:
    payload = PAYLOADS[kind]()
    change(payload)
    return payload


@pytest.mark.parametrize("payload, needle", [
    ([1], "must be a JSON object, got list"),
    ({"title": "t"}, "no kind"),
    ({"kind": "sonar"}, "unknown kind 'sonar'"),
    (_broken("cells", lambda p: p.update(rows="abc")), "cells finding: rows must be a list, got 'abc'"),
    (_broken("cells", lambda p: p.pop("rows")), "rows must be a list, got nothing"),
    (_broken("cells", lambda p: p["rows"].append([1])), r"rows[6] must be an object, got [1]"),
    (_broken("cells", lambda p: p["rows"][1].update(test_err="12")),
     "rows[1].test_err must be a number or null, got '12'"),
    (_broken("cells", lambda p: p["rows"][0].update(train_err=True)), "rows[0].train_err must be a number"),
    (_broken("cells", lambda p: p["rows"][0].update(depth=8.5)), "rows[0].depth must be an integer or null"),
    (_broken("cells", lambda p: p["rows"][0].pop("variant")), "rows[0].variant is missing"),
    (_broken("cells", lambda p: p.update(title=None)), "cells finding: title must be text, got None"),
    (_broken("verdict", lambda p: p["rows"][0].update(test_gap="15")), "rows[0].test_gap must be a number"),
    (_broken("verdict", lambda p: p["rows"][0].update(predictor=3)), "rows[0].predictor must be text or null"),
    (_broken("verdict", lambda p: p.pop("paragraph")), "verdict finding: paragraph is missing"),
    (_broken("trainability", lambda p: p["rows"][0].update(measures={"a": "x"})), "rows[0].measures must be an object"),
    (_broken("trainability", lambda p: p["rows"][0].update(trained="yes")), "rows[0].trained must be true, false"),
    (_broken("trainability", lambda p: p["tests"][0].update(depth="deep")), "tests[0].depth must be an integer, 'all'"),
    (_broken("trainability", lambda p: p.update(tests={})), "tests must be a list"),
    (_broken("seed_table", lambda p: p.update(rho="0.6")), "seed_table finding: rho must be a number or null"),
    (_broken("correlations", lambda p: p.update(when="later")), "when must be 'init' or 'trained', got 'later'"),
])
def test_validate_finding_names_the_field(payload, needle):
    problem = validate_finding(payload)
    assert problem is not None and needle in problem and "\n" not in problem, problem
    with pytest.raises(ValueError, match=None):
        finding_figures(payload)


# ---- the builders ----------------------------------------------------------------------------


def test_cells_figure_bars_are_means_with_sd_and_the_baseline_first():
    fig = cells_figure(cells_payload())
    small = [t for t in fig.data if t.xaxis == "x"]
    train, test = small
    assert list(train.x) == ["fmm01", "fmm08"] and list(test.x) == ["fmm01", "fmm08"]
    assert list(train.y) == [2.0, 12.0] and list(test.y) == [6.0, 22.0]
    assert list(train.error_y.array) == pytest.approx([2 ** 0.5, 8 ** 0.5])
    assert list(test.text) == ["6.0 (gap +4.0)", "22.0 (gap +10.0)"]
    large = [t for t in fig.data if t.xaxis == "x2"]
    assert list(large[0].x) == ["fmm01", "fmm08"] and _values(large[1].y) == [6.0, None]  # a missing cell: a gap
    assert large[1].text[1] == "n/a (gap n/a)" and not large[0].showlegend
    assert [a.text for a in fig.layout.annotations] == ["small", "large"]
    assert fig.layout.barmode == "group"


def test_verdict_figure_stacks_the_training_and_generalisation_parts():
    fig = verdict_figure(verdict_payload())
    train, gen, unsplit, total = fig.data
    assert _values(train.y) == [6.0, None] and _values(gen.y) == [9.0, None] and _values(unsplit.y) == [None, 8.0]
    assert _values(total.y) == [15.0, 8.0]
    assert _values(total.error_y.array) == [3.0, None] and _values(total.error_y.arrayminus) == [3.0, None]
    assert list(total.text) == ["+15.0 [+12.0, +18.0]", "+8.0 [n/a, n/a]"]
    assert [list(level) for level in train.x] == [["small", "large"], ["fmm08", "fmm09"]]
    assert fig.layout.barmode == "relative" and "fmm01" in fig.layout.title.text


def test_trainability_figures_mark_trained_seeds_and_tabulate_rho():
    loss = trainability_loss_figure(trainability_payload())
    by_name = {t.name: t for t in loss.data}
    assert list(by_name["fmm01 (mean)"].x) == [8, 32] and list(by_name["fmm01 (mean)"].y) == pytest.approx([0.02, 0.05])
    assert _values(by_name["fmm08 (mean)"].y) == [0.2, 2.3]
    assert list(by_name["fmm08 trained"].y) == [0.2] and by_name["fmm08 trained"].marker.symbol == "circle"
    not_trained = by_name["fmm08 not trained"]
    assert list(not_trained.x) == [32, 32] and _values(not_trained.y) == [2.3, None]
    assert not_trained.marker.symbol == "x"
    assert loss.layout.yaxis.type == "log"
    heat = trainability_tests_figure(trainability_payload())
    (h,) = heat.data
    assert list(h.y) == ["depth 8", "depth 32", "depth all"] and list(h.x) == ["signal_slope", "ntk_cond"]
    assert [list(r) for r in h.z] == [[0.5, None], [None, None], [None, -0.25]]
    assert h.text[0][0] == "+0.50<br>p_holm=0.03<br>n=12" and h.text[0][1] == "n/a"
    assert h.text[1][0] == "n/a<br>p_holm=n/a<br>n=3" and "p_holm=0.6" in h.text[2][1]


def test_seed_table_figure_plots_reproduced_against_published():
    fig = seed_table_figure(seed_table_payload())
    add, mul = fig.data
    assert (add.name, mul.name) == ("add", "mul")
    assert list(add.x) == [70.5] and list(add.y) == [95.0] and list(add.error_y.array) == [0.5]
    assert _values(mul.x) == [60.0, None] and list(mul.y) == [90.0, 91.0] and _values(mul.error_y.array) == [None, 1.0]
    assert [list(c[:2]) for c in mul.customdata] == [["fmm08", "r * s"], ["fmm09", "sig(r) * s"]]
    assert "rho 0.62 [0.31, 0.83], n=3" in fig.layout.title.text and "digits-2ep" in fig.layout.title.text


def test_correlations_figure_is_a_heatmap_of_rho_with_intervals():
    (h,) = correlations_figure(correlations_payload()).data
    assert list(h.x) == ["all", "mul"] and list(h.y) == ["opt. saturation", "gen. NTK cond"]
    assert [list(r) for r in h.z] == [[0.4, None], [-0.2, None]]
    assert h.text[0][0] == "+0.40 [+0.10, +0.70]<br>p_holm=0.05"
    assert h.text[0][1] == "n/a [n/a, n/a]<br>p_holm=n/a" and h.text[1][1] == "n/a"


def test_all_null_and_empty_findings_draw_without_error():
    for kind, make in PAYLOADS.items():
        payload = make()
        for key in ("rows", "tests"):
            for row in payload.get(key, []):
                for field, value in row.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        row[field] = None
                if "measures" in row:
                    row["measures"] = {k: None for k in row["measures"]}
        for field in ("rho", "lo", "hi", "n"):
            if field in payload:
                payload[field] = None
        assert validate_finding(payload) is None, kind
        assert all(fig.data is not None for fig in finding_figures(payload))
        empty = {**make(), "rows": [], **({"tests": []} if kind == "trainability" else {})}
        assert len(finding_figures(empty)) == (2 if kind == "trainability" else 1)
        tables = finding_tables(make())
        assert tables and all(isinstance(rows, list) for _, rows in tables)
    flat = dict(finding_tables(trainability_payload()))
    assert flat["rows"][0]["measures.signal_slope"] == pytest.approx(0.8) and flat["tests"][1]["depth"] == "all"


# ---- the explorer's Findings page ------------------------------------------------------------


def _app(root, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PROBE_RUNS", str(root))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.sidebar.radio(key="page").set_value("Findings").run()
    return at


def _unescape(text: str) -> str:
    return text.replace("\\", "")


def test_findings_page_draws_every_kind_and_reports_the_malformed(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    s = RunStore(root)
    for kind, make in PAYLOADS.items():
        s.save_finding("fusion_table" if kind in ("seed_table", "correlations") else "regimes", kind, make())
    s.save_finding("regimes", "sonar", {"kind": "sonar", "title": "Echoes"})
    s.save_finding("regimes", "hostile", {**cells_payload(), "title": "<script>alert(1)</script>"})
    _tamper(s, "INSERT INTO findings VALUES ('broken-1', 'regimes', 'broken', '2099', '{not json')")
    bad = cells_payload()
    bad["rows"][0]["test_err"] = "lots"
    _tamper(s, "INSERT INTO findings VALUES ('bad-shape', 'regimes', 'shape', '2099', ?)", (json.dumps(bad),))
    s.close()
    at = _app(root, monkeypatch)
    assert not at.exception, at.exception
    titles = {_unescape(h.value) for h in at.subheader}
    assert {make()["title"] for make in PAYLOADS.values()} <= titles
    assert "<script>alert(1)</script>" in titles  # shown as text: escaped markdown, no markup
    errors = [_unescape(e.value) for e in at.error]
    assert len(errors) == 2, errors
    assert any("regimes/broken (broken-1)" in e and "not valid JSON" in e for e in errors)
    assert any("regimes/shape (bad-shape) is malformed" in e and "rows[0].test_err must be a number" in e
               for e in errors)
    assert any("unknown kind 'sonar'" in _unescape(w.value) for w in at.warning)
    assert len(at.get("plotly_chart")) == 2 + 1 + 2 + 1 + 1  # cells (and the hostile cells), verdict, 2, 1, 1
    assert len(at.dataframe) == 2 + 1 + 2 + 1 + 1
    assert "Multiplication loses 15 points" in _unescape(" ".join(m.value for m in at.markdown))


def test_an_empty_store_says_how_to_produce_findings(tmp_path, monkeypatch):
    at = _app(tmp_path / "nothing", monkeypatch)
    assert not at.exception
    info = " ".join(i.value for i in at.info)
    assert "python -m experiments regimes --quick" in info and "python -m experiments fusion_table --quick" in info
    assert not (tmp_path / "nothing").exists()
