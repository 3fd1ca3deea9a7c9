"""benchmarks/bench_experiments.py end to end at a tiny setting: the three sweeps train the same
runs to the same accuracies (within the default --tol of 1 point), and the bound it prints follows from the sweeps it timed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_experiments_reports_sweeps_and_the_bound_they_imply():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "benchmarks/bench_experiments.py", "--runs", "2", "--epochs", "1",
                          "--limit-train", "64", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    sweeps = got["sweeps"]
    assert [s["jobs"] for s in sweeps][-1] == 2 and sweeps[0]["jobs"] == 1
    accs = [s["final_acc"] for s in sweeps]
    assert len(accs[0]) == 2 and got["acc_ok"]      # the same runs: accuracies within --tol (thread sums differ)
    assert all(abs(x - y) <= 1.0 for a in accs for x, y in zip(a, accs[0]))
    serial, parallel = sweeps[0], sweeps[-1]
    one = sweeps[1] if len(sweeps) == 3 else serial
    assert got["speedup"] == pytest.approx(parallel["runs_per_hour"] / serial["runs_per_hour"])
    assert got["threads_speedup"] == pytest.approx(serial["runs_per_hour"] / one["runs_per_hour"])
    assert got["bound"] == pytest.approx(2 / got["threads_speedup"])
    assert got["jobs_scaling"] == pytest.approx(parallel["runs_per_hour"] / (2 * one["runs_per_hour"]))
