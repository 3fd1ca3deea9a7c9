"""The regimes experiment: Holm's correction against a hand-computed case, the gap split and the
matched-loss reading on constructed runs whose answer is known (a variant that underfits, one
that overfits, one with no gap), and the experiment end to end on a tiny grid."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from experiments import _regimes
from experiments._regimes import (answer_for, gap_split, holm, is_trained, matched_reading, Regime, Settings,
                                  spearman_p)


def test_holm_against_a_hand_computed_case():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> max with 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    # a missing p-value is outside the family (m = 2) and stays missing; adjusted values cap at 1
    out = holm([0.01, None, 0.02, float("nan")])
    assert out[1] is None and out[3] is None and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_spearman_p_matches_scipy_and_refuses_too_few_pairs():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    t = spearman_p(x, y)
    ref = spearmanr(x, y)
    assert t["rho"] == pytest.approx(ref.statistic, abs=1e-12) and t["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert spearman_p([1, 2, 3], [1, 2, 3])["rho"] is None                       # fewer than 4 pairs
    assert spearman_p([1, 2, np.nan, 4, 5], [2, 1, 3, 4, 5])["n"] == 4            # a missing value left out
    assert spearman_p([1, 1, 1, 1], [1, 2, 3, 4])["rho"] is None                 # a constant side


BASE_TEST, BASE_TRAIN = [10.0, 11.0, 9.0], [2.0, 2.5, 1.5]


def test_an_underfitting_variant_is_optimisation():
    # the variant's training error is 8 points higher and its test error 8 points higher
    split = gap_split(BASE_TEST, BASE_TRAIN, [18.0, 19.5, 16.5], [10.0, 11.0, 9.0], n_boot=500)
    assert split["test_gap"] == pytest.approx(8.0) and split["train_gap"] == pytest.approx(8.0)
    assert split["opt_share"] == pytest.approx(1.0) and split["gen_gap"] == pytest.approx(0.0)
    assert split["gap_excludes_zero"] and split["test_gap_lo"] <= 8.0 <= split["test_gap_hi"]
    assert split["opt_share_lo"] <= 1.0 <= split["opt_share_hi"]
    # longer training reaches the baseline's loss and the gap closes
    reading = matched_reading(0.05, [(2, 0.052, 10.5)], original_gap=8.0, base_test=10.0)
    assert reading["status"] == "matched" and reading["remaining"] == pytest.approx(0.5 / 8.0)
    assert answer_for(split, reading) == "optimisation"
    # without a matched comparison the split alone says the same
    assert answer_for(split, None) == "optimisation"


def test_an_overfitting_variant_is_generalisation():
    # the variant fits its training samples as well as the baseline and tests 6 points worse
    split = gap_split(BASE_TEST, BASE_TRAIN, [16.0, 17.0, 15.0], [2.0, 2.5, 1.5], n_boot=500)
    assert split["test_gap"] == pytest.approx(6.0) and split["train_gap"] == pytest.approx(0.0)
    assert split["opt_share"] == pytest.approx(0.0) and split["gen_gap"] == pytest.approx(6.0)
    # at matched training loss the gap persists
    reading = matched_reading(0.05, [(2, 0.2, 16.5), (4, 0.05, 15.9)], original_gap=6.0, base_test=10.0)
    assert reading["status"] == "matched" and reading["factor"] == 4
    assert reading["matched_gap"] == pytest.approx(5.9) and reading["remaining"] == pytest.approx(5.9 / 6.0)
    assert answer_for(split, reading) == "generalisation"
    assert answer_for(split, None) == "generalisation"


def test_no_gap_and_a_target_never_reached():
    split = gap_split(BASE_TEST, BASE_TRAIN, [11.0, 9.0, 10.0], [2.5, 1.5, 2.0], n_boot=500)
    assert not split["gap_excludes_zero"] and math.isnan(split["opt_share_lo"])
    assert answer_for(split, None) == "no gap"
    reading = matched_reading(0.05, [(2, 0.9, 40.0), (4, 0.6, 35.0)], original_gap=30.0, base_test=10.0)
    assert reading["status"] == "not reached" and reading["factor"] == 4 and reading["matched_gap"] == pytest.approx(25.0)
    assert matched_reading(0.05, [], 1.0, 1.0)["status"] == "not run"
    # a variant that cannot reach the baseline's loss and whose training error carries the gap
    under = gap_split(BASE_TEST, BASE_TRAIN, [40.0, 41.0, 39.0], [35.0, 36.0, 34.0], n_boot=200)
    assert answer_for(under, reading) == "optimisation"


def test_gap_split_bootstrap_resamples_seeds_jointly_and_skips_missing():
    # seed-wise the variant is always exactly 3 points worse: every joint resample says 3
    bt = np.array([5.0, 20.0, 35.0])
    split = gap_split(bt, bt / 2, bt + 3.0, bt / 2, n_boot=300)
    assert split["test_gap_lo"] == pytest.approx(3.0) and split["test_gap_hi"] == pytest.approx(3.0)
    # a missing (diverged) seed is left out of its side's mean
    holes = gap_split([10.0, 12.0, 14.0], [1.0, 1.0, 1.0], [20.0, np.nan, 22.0], [1.0, np.nan, 1.0], n_boot=50)
    assert holes["test_gap"] == pytest.approx(21.0 - 12.0)
    with pytest.raises(ValueError):
        gap_split([1.0], [1.0, 2.0], [1.0], [1.0])


def test_trained_means_well_below_a_uniform_guess():
    assert is_trained(0.3) and is_trained(1.5) and not is_trained(2.25) and not is_trained(None)
    assert not is_trained(float("nan")) and not is_trained(0.9 * math.log(10))


def test_regime_names_and_the_settings_grid():
    assert Regime("fashion-mnist", 1000, 16, epochs=3).name == "fmnist-1k-d16"
    assert Regime("digits", None, 10, epochs=3).name == "digits-all-d10"
    assert Regime("digits", 128, 22, epochs=3).name == "digits-128-d22"
    quick = _regimes.settings(True)
    assert {r.depth for r in quick.regimes} == {10, 16, 22} and len(quick.seeds) >= 3
    assert {"fmm01", "fmm18", "fmm08", "fmm14", "fmm30", "fmm38"} <= set(quick.variants)
    assert {r.data for r in quick.regimes} == {"digits", "fashion-mnist"}
    full = _regimes.settings(False)
    assert {r.n_train for r in full.regimes if r.data == "fashion-mnist"} == {1000, 10000, None}
    cfg = _regimes.regime_config(quick.regimes[-1], "fmm18", 2)
    assert cfg.fusion == "fmm18" and cfg.seed == 2 and cfg.model_kwargs["depth"] == quick.regimes[-1].depth
    assert _regimes.extended_config(quick.regimes[0], "fmm18", 0, 2).epochs == 2 * quick.regimes[0].epochs


# --- end to end ---------------------------------------------------------------------------------

TINY = Settings(regimes=(Regime("digits", 40, 10, epochs=1, batch_size=20),
                         Regime("fashion-mnist", 40, 10, epochs=1, batch_size=20, image_size=8)),
                variants=("fmm01", "fmm18"), seeds=(0, 1, 2), extend=(2,), matched=("fmm18",),
                init_probes=("gradvar", "saturation"), n_boot=100)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_regimes_end_to_end_on_a_tiny_grid(tmp_path, monkeypatch):
    from experiments import regimes, run_experiment
    from experiments._common import Context
    from probe.store import RunStore

    monkeypatch.setattr(regimes, "settings", lambda quick: TINY)
    monkeypatch.setenv("PROBE_DATA", str(tmp_path / "nothing"))
    monkeypatch.setenv("PROBE_SYSTEM_DATA", str(tmp_path / "nothing"))
    monkeypatch.chdir(tmp_path)
    store = RunStore(tmp_path / "runs")
    ctx = Context(store=store, out=tmp_path / "out", quick=True)
    out = run_experiment(ctx, "regimes")
    # the Fashion-MNIST regime is skipped with one line naming the package
    assert any("dataset-fashion-mnist" in line for line in out["found"])
    cells = _rows(tmp_path / "out" / "regimes" / "numbers.csv")
    assert len(cells) == 2 * 3 and {c["regime"] for c in cells} == {"digits-40-d10"}
    # every cell's numbers are its run's: the test error is the last epoch's logged test top-1
    for c in cells:
        metrics = store.get_metrics(c["run_id"])
        assert float(c["test_err"]) == pytest.approx(100.0 - metrics[-1]["test_top1"], abs=1e-9)
        assert 0.0 <= float(c["train_err"]) <= 100.0 and float(c["train_loss"]) > 0
    verdict = _rows(tmp_path / "out" / "regimes" / "verdict.csv")
    assert [v["variant"] for v in verdict] == ["fmm18"]
    v = verdict[0]
    by = {(c["variant"], int(c["seed"])): c for c in cells}
    want = np.mean([float(by[("fmm18", s)]["test_err"]) for s in (0, 1, 2)]) - \
        np.mean([float(by[("fmm01", s)]["test_err"]) for s in (0, 1, 2)])
    assert float(v["test_gap"]) == pytest.approx(want, abs=1e-9)
    assert v["matched_status"] in {"matched", "not reached", "already matched"}
    assert v["answer"] in {"optimisation", "generalisation", "mixed", "no gap"}
    # the findings are in the catalog and equal to the csv
    found = {f["name"]: f for f in store.list_findings("regimes")}
    assert {"cells", "verdict", "trainability", "init_predictors"} <= set(found)
    assert found["verdict"]["payload"]["rows"][0]["test_gap"] == pytest.approx(float(v["test_gap"]), abs=1e-9)
    assert found["verdict"]["payload"]["paragraph"]
    tests = found["trainability"]["payload"]["tests"]
    assert {t["depth"] for t in tests} == {10, "all"}
    assert {t["measure"] for t in tests} == set(regimes.INIT_MEASURES)
    # a second call re-trains nothing and reuses the stored numbers
    n_runs = len(store.list_runs())
    run_experiment(ctx, "regimes", force=True)
    assert len(store.list_runs()) == n_runs


def test_a_side_that_does_not_train_is_optimisation():
    split = gap_split(BASE_TEST, BASE_TRAIN, [88.0, 90.0, 89.0], [88.0, 90.0, 89.0], n_boot=100)
    assert answer_for(split, {"status": "does not train"}) == "optimisation"
