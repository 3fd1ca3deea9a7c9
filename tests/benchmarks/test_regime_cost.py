"""benchmarks/regime_cost.py: one timed epoch per depth of the full ``regimes`` setting, projected
to every full-setting run; checked on tiny Fashion-MNIST idx files the test writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.data.test_loaders import write_idx

ROOT = Path(__file__).resolve().parents[2]


def test_regime_cost_projects_every_full_run_from_its_timed_epochs(tmp_path):
    from experiments._regimes import settings

    write_idx(tmp_path / "data" / "fashion-mnist", np.random.default_rng(5), n_train=20, n_test=10)
    env = {**os.environ, "PROBE_DATA": str(tmp_path / "data"), "PROBE_SYSTEM_DATA": str(tmp_path / "none"),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "benchmarks/regime_cost.py", "--samples", "20", "--test", "10", "--json",
                          "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    full = [r for r in settings(False).regimes if r.data == "fashion-mnist"]
    assert sorted(int(d) for d in got["per_depth"]) == sorted({r.depth for r in full})
    for c in got["per_depth"].values():                       # a measured epoch, not a placeholder
        assert c["train_s_per_sample_epoch"] > 0 and c["eval_s_per_sample"] >= 0 and c["wall_s"] > 0
    assert [x["regime"] for x in got["runs"]] == [r.name for r in full]
    for x, r in zip(got["runs"], full):                       # the projection is linear in samples x epochs
        c = got["per_depth"][str(r.depth)]
        want = r.epochs * ((r.n_train or 60000) * c["train_s_per_sample_epoch"]
                           + (r.limit_test or 10000) * c["eval_s_per_sample"])
        assert x["projected_run_s"] == pytest.approx(want, rel=1e-12)
    assert got["base_grid_s"] == pytest.approx(sum(x["projected_run_s"] for x in got["runs"]) * got["seeds"]
                                               * got["variants"], rel=1e-12)
    assert got["seeds"] == len(settings(False).seeds) and got["variants"] == len(settings(False).variants)


def test_regime_cost_without_the_data_set_says_which_package(tmp_path):
    env = {**os.environ, "PROBE_DATA": str(tmp_path / "empty"), "PROBE_SYSTEM_DATA": str(tmp_path / "none"),
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "regime_cost.py"), "--samples", "20", "--test", "10"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "dataset-fashion-mnist" in out.stderr and "Traceback" not in out.stderr
