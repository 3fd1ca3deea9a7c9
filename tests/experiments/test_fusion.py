"""The fusion-table experiments: their statistics against scipy and closed forms, the seed
conclusions' row pairs, and the three experiments end to end on a few rows (their csv numbers
equal to what the store holds)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from experiments import fusion_table, seed_conclusions, verdict
from experiments._common import Context
from experiments._fusion import Protocol, paired_ci, spearman_ci


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_spearman_ci_matches_scipy_and_brackets_the_estimate():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    x = rng.normal(size=40)
    y = x + rng.normal(scale=1.0, size=40)
    ci = spearman_ci(x, y, n_boot=500)
    assert ci["rho"] == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert ci["lo"] < ci["rho"] < ci["hi"] and ci["n"] == 40
    # a monotone relation: rho = 1 in every resample
    mono = spearman_ci(np.arange(10.0), np.exp(np.arange(10.0)), n_boot=200)
    assert mono["rho"] == pytest.approx(1.0) and mono["lo"] == pytest.approx(1.0) and mono["hi"] == pytest.approx(1.0)
    # missing values are left out, not ranked
    holes = spearman_ci([1.0, 2.0, np.nan, 4.0, 5.0], [1.0, 3.0, 2.0, 4.0, 6.0], n_boot=100)
    assert holes["n"] == 4 and holes["rho"] == pytest.approx(1.0)
    # a constant side has no rank correlation: NaN, not 0
    assert np.isnan(spearman_ci([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])["rho"])


def test_paired_ci_closed_forms():
    const = paired_ci(np.full((6, 3), 2.5), n_boot=200)
    assert const["mean"] == pytest.approx(2.5) and const["lo"] == pytest.approx(2.5) and const["hi"] == pytest.approx(2.5)
    d = np.array([[1.0, 3.0], [2.0, np.nan], [-1.0, 1.0]])       # pair means 2, 2, 0
    ci = paired_ci(d, n_boot=2000)
    assert ci["mean"] == pytest.approx(4.0 / 3.0) and ci["n_pairs"] == 3
    assert -1.0 <= ci["lo"] <= ci["mean"] <= ci["hi"] <= 3.0
    assert paired_ci(np.empty((0, 2)))["n_pairs"] == 0


def test_conclusion_pairs_differ_by_exactly_their_change():
    from models.fusion import ParamMode
    from models.seed_table import seed_fusion

    pairs = {c.key: seed_conclusions.pairs(c) for c in seed_conclusions.CONCLUSIONS}
    assert ("fmm18", "fmm19") in pairs["shortcut_mean_1"]          # bn(r) * bn(s) -> bn(r) * bn[b fixed 1](s)
    assert ("fmm02", "fmm10") in pairs["sigmoid_on_shortcut"]      # (sig(r) + 1) * bn(s) -> bn(r) * (sig(s) + 1)
    assert ("fmm25", "fmm30") in pairs["bn_before_sigmoid"]        # sig(r) * sig(s) -> sig(bn(r)) * sig(s)
    assert all(len(p) >= 3 for p in pairs.values())
    for a, b in pairs["shortcut_mean_1"]:
        sa, sb = seed_fusion(a).spec, seed_fusion(b).spec
        assert sa.r == sb.r and sb.s.bias == ParamMode("fixed", 1.0) and sa.s.bias.mode == "learn"
    for a, b in pairs["sigmoid_on_shortcut"]:
        sa, sb = seed_fusion(a).spec, seed_fusion(b).spec
        assert (sa.r, sa.s) == (sb.s, sb.r) and sa.r.act == "sigmoid"
    for a, b in pairs["pin_bn_weight"]:
        sa, sb = seed_fusion(a).spec, seed_fusion(b).spec
        changed = [side for side in ("r", "s") if getattr(sa, side) != getattr(sb, side)]
        assert len(changed) == 1 and getattr(sb, changed[0]).weight == ParamMode("fixed", 1.0)
    for a, b in pairs["no_bn_saturates"]:                          # b: a free BN before a sigmoid removed
        sa, sb = seed_fusion(a).spec, seed_fusion(b).spec
        changed = [side for side in ("r", "s") if getattr(sa, side) != getattr(sb, side)]
        assert changed
        for side in changed:
            before, after = getattr(sa, side), getattr(sb, side)
            assert before.act == after.act == "sigmoid" and (before.norm, after.norm) == ("bn", "none")
            assert before.offset == after.offset


ROWS = ["fmm01", "fmm02", "fmm10", "fmm18", "fmm19", "fmm25", "fmm38"]
TINY = (Protocol("tiny", 40, 1, 20, "a test"), Protocol("tinier", 20, 1, 20, "a test"))


@pytest.fixture
def tiny_table(monkeypatch):
    for module in (fusion_table, seed_conclusions, verdict):
        monkeypatch.setattr(module, "row_ids", lambda: list(ROWS))
        monkeypatch.setattr(module, "protocols", lambda quick: TINY)
        monkeypatch.setattr(module, "seeds", lambda quick: (0, 1))


@pytest.mark.slow          # two minutes on two cores (28 runs, 7 variants probed): `make test-slow`
def test_fusion_experiments_end_to_end_on_a_few_rows(tmp_path, tiny_table):
    from experiments import run_experiment
    from probe.store import RunStore

    store = RunStore(tmp_path / "runs")
    ctx = Context(store=store, out=tmp_path / "out", quick=True)
    first = run_experiment(ctx, "fusion_table")
    assert len(store.list_runs()) == len(ROWS) * 2 * 2                 # rows x protocols x seeds
    table = _rows(tmp_path / "out" / "fusion_table" / "numbers.csv")
    assert [r["id"] for r in table] == ROWS
    runs = json.loads((tmp_path / "out" / "fusion_table" / "runs.json").read_text())["run_ids"]
    by_recipe = {}
    for rid in runs:
        run = store.get_run(rid)
        by_recipe[(run["config"]["fusion"], run["config"]["limit_train"], run["config"]["seed"])] = run
    for row in table:                                                  # the csv holds the store's accuracies
        best = [by_recipe[(row["id"], 40, s)]["summary"]["best_acc"] for s in (0, 1)]
        assert float(row["tiny.best_mean"]) == pytest.approx(np.mean(best), rel=1e-12)
        base = [by_recipe[("fmm01", 40, s)]["summary"]["best_acc"] for s in (0, 1)]
        assert float(row["tiny.gap"]) == pytest.approx(np.mean(best) - np.mean(base), rel=1e-12, abs=1e-12)
    corr = _rows(tmp_path / "out" / "fusion_table" / "correlations.csv")
    assert [c["protocol"] for c in corr] == ["tiny", "tinier"] and all(int(c["n"]) == len(ROWS) for c in corr)
    assert any("Spearman rho" in line for line in first["found"])
    assert (tmp_path / "out" / "fusion_table" / "scatter_tiny.html").exists()

    # the conclusions reuse the runs (nothing retrained) and test the pairs among these rows
    n_runs = len(store.list_runs())
    concl = run_experiment(ctx, "seed_conclusions")
    assert len(store.list_runs()) == n_runs
    rows = _rows(tmp_path / "out" / "seed_conclusions" / "numbers.csv")
    mean1 = [r for r in rows if r["conclusion"] == "shortcut_mean_1" and r["protocol"] == "tiny"][0]
    assert mean1["pairs"] == "fmm18->fmm19"
    want = np.mean([by_recipe[("fmm19", 40, s)]["summary"]["best_acc"] - by_recipe[("fmm18", 40, s)]["summary"]["best_acc"]
                    for s in (0, 1)])
    assert float(mean1["mean_diff"]) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert float(mean1["ci_lo"]) <= float(mean1["mean_diff"]) <= float(mean1["ci_hi"])
    sat = _rows(tmp_path / "out" / "seed_conclusions" / "saturation.csv")
    for r in sat:                                                      # saturation rows are stored probe rows
        stored = store.get_probe(r["probe_id"])
        assert stored["kind"] == "saturation" and int(r["n_gates"]) >= 1 and r["frac_logit_sat"] != ""
        assert float(r["frac_logit_sat"]) == pytest.approx(stored["summary"]["model"]["frac_logit_sat"], rel=1e-12,
                                                           abs=1e-15)
    assert {r["id"] for r in sat} >= {"fmm02", "fmm25", "fmm38"}
    assert any("across training" in line for line in concl["found"])

    # the verdict: every variant probed, its numbers the stored ones
    out = run_experiment(ctx, "verdict")
    assert len(store.list_runs()) == n_runs
    variants = _rows(tmp_path / "out" / "verdict" / "numbers.csv")
    assert [v["id"] for v in variants] == ROWS
    from probe.headline import MEASURES, headline

    for v in variants[:2]:                                             # every seed probed, the measure their mean
        per_seed = []
        for s in (0, 1):
            rid = by_recipe[(v["id"], 40, s)]["run_id"]
            ids = {p["kind"]: p["probe_id"] for p in store.list_probes(run_id=rid)
                   if p["kind"] in {m.probe for m in MEASURES}}
            assert set(ids) == {m.probe for m in MEASURES}
            per_seed.append(headline(store, ids))
        assert int(v["n_seeds"]) == 2
        for key in ("grad_snr", "lambda_max", "ntk_cond", "path_deviation"):
            assert float(v[key]) == pytest.approx(np.mean([d[key] for d in per_seed]), rel=1e-12)
    corr = _rows(tmp_path / "out" / "verdict" / "correlations.csv")
    assert {c["measure"] for c in corr} == {m.key for m in MEASURES} and {c["group"] for c in corr} == {"all"}
    assert any(line.startswith("optimisation: mean |rho|") for line in out["found"])


def test_local_data_sets_add_protocols_in_the_full_setting(tmp_path, monkeypatch):
    from experiments._fusion import local_protocols, protocols

    assert local_protocols(tmp_path) == ()
    (tmp_path / "cifar-10-batches-bin").mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (tmp_path / "cifar-10-batches-bin" / name).write_bytes(b"")
    (tmp_path / "101_ObjectCategories" / "accordion").mkdir(parents=True)
    found = local_protocols(tmp_path)
    assert [p.data for p in found] == ["cifar10", "caltech101"]
    monkeypatch.setenv("PROBE_DATA", str(tmp_path))
    assert [p.name for p in protocols(quick=True)] == ["data-limited", "short"]        # quick: digits only
    full = protocols(quick=False)
    assert [p.data for p in full] == ["digits"] * 3 + ["cifar10", "caltech101"]
    from experiments._fusion import fusion_config
    assert fusion_config("fmm08", full[3], 0).data == "cifar10"
