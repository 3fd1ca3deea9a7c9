"""The prepared GPU check (benchmarks/gpu_check.py) dry-run on the CPU: every step runs or skips."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_cpu_dry_run(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path),
           "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["step"]: s["status"] for s in summary["steps"]}
    assert not [s for s, v in steps.items() if v not in ("PASS", "SKIP")], out.stdout
    expected = {"pytest-gpu", "train-pair", "kill-resume", "nccl-world1 (gloo)", "headline/matmul-peak",
                "headline/ntk-trace", "headline/ntk-lanczos", "headline/hessian", "headline/surface",
                "headline/pyhessian"}
    import probe

    expected |= {f"probe/{name}" for name in probe.list_probes()}
    assert expected <= set(steps), sorted(expected - set(steps))
    assert steps["pytest-gpu"] == "SKIP" and steps["headline/pyhessian"] == "SKIP"
    assert out.returncode == 0, out.stdout
    lines = [ln for ln in out.stdout.splitlines() if ln.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert len(lines) == len(summary["steps"])
