"""A process group forced at world size 1 (PROBE_DIST_FORCE=1 / setup(force=True)): training runs
through DDP and the collectives, the probes take their distributed paths, and the run and the probe
results equal a plain single process -- gloo on the CPU here, NCCL on CUDA (``gpu``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probe.errors import UserError
from probe.runtime import dist as rdist
from probe.store import RunStore

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

# Trains tiny_triplet (BatchNorm and gates) and probes it (saturation, gradvar in float64) as a
# plain process, then again after joining a forced group of one: the weights equal (CPU: bitwise;
# CUDA, deterministic algorithms: within 1e-6), the probe numbers within float64 rounding (rtol
# 1e-10); the forced run went through the distributed path (every rank's generator state in the
# checkpoint, the gradients' moments merged over the group).
SCRIPT = r"""
import json, sys, tempfile
import numpy as np
import torch
import probe
from probe.runtime.dist import current, setup, teardown

device = sys.argv[1]
cuda = device.startswith("cuda")
PROBES = {"saturation": {"batch_size": 8},
          "gradvar": {"batches": 2, "batch_size": 8, "seeds": 1, "chunk": 8, "dtype": "float64"}}

def run(root):
    store = probe.RunStore(root)
    cfg = probe.TrainConfig(model="tiny_triplet", epochs=2, batch_size=32, limit_train=96, limit_test=48, seed=4,
                            device=device, deterministic=cuda, sync_bn=cuda)
    r = probe.train(cfg, store)
    ckpt = store.load_checkpoint(r.run_id, 2)
    outs = {}
    for name, params in PROBES.items():
        o = probe.run_probe(store, name, params, run=r.run_id, n=24, device=device, save=False)[0]
        assert o.error is None, (name, o.error)
        outs[name] = o.result
    return r, ckpt, outs

with tempfile.TemporaryDirectory() as tmp:
    assert not current().active
    r1, c1, p1 = run(tmp + "/plain")
    d = setup(device, force=True)
    assert d.active and d.world == 1 and d.backend == ("nccl" if cuda else "gloo"), d
    r2, c2, p2 = run(tmp + "/forced")
    diff = max(float((c1["model"][k].double() - c2["model"][k].double()).abs().max()) for k in c1["model"])
    assert diff <= (1e-6 if cuda else 0.0), diff
    assert "ranks" not in c1["rng"] and len(c2["rng"]["ranks"]) == 1
    np.testing.assert_allclose([m["train_loss"] for m in r2.metrics], [m["train_loss"] for m in r1.metrics],
                               rtol=1e-6 if cuda else 0.0)
    s1, s2 = p1["saturation"], p2["saturation"]
    assert s1.n_gates > 0 and np.array_equal(s1.count, s2.count) and np.array_equal(s1.hist, s2.hist)
    for k in ("mean", "std", "gain"):
        np.testing.assert_allclose(getattr(s2, k), getattr(s1, k), rtol=1e-10, atol=1e-12, err_msg=k)
    g1, g2 = p1["gradvar"], p2["gradvar"]
    for k in ("grad_norm", "trace_cov", "per_sample_var", "per_sample_grad_norm"):
        np.testing.assert_allclose(getattr(g2, k), getattr(g1, k), rtol=1e-10, atol=1e-14, err_msg=k)
    assert not any("shared out" in n for n in g1.notes)
    assert "mini-batch, per-sample and signal-propagation gradients shared out over 1 rank(s), their moments merged" in g2.notes
    print("FORCED " + json.dumps({"backend": d.backend, "world": d.world, "weights_diff": diff,
                                  "acc": [r1.final_acc, r2.final_acc]}), flush=True)
    teardown()
"""


def _run(device: str, tmp_path: Path, **env_extra) -> dict:
    script = tmp_path / "forced.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PROBE_DIST_TIMEOUT="60", **env_extra)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", rdist.FORCE_ENV):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), device], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("FORCED ")]
    assert line, proc.stdout[-2000:]
    return json.loads(line[0][len("FORCED "):])


def test_a_forced_group_of_one_trains_and_probes_as_one_process_gloo(tmp_path):
    out = _run("cpu", tmp_path)
    assert out["backend"] == "gloo" and out["world"] == 1 and out["weights_diff"] == 0.0
    assert out["acc"][0] == out["acc"][1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_forced_group_of_one_trains_and_probes_as_one_process_nccl(tmp_path):
    """NCCL init, DDP(device_ids), SyncBatchNorm and NCCL object collectives on one GPU."""
    out = _run("cuda", tmp_path, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    assert out["backend"] == "nccl" and out["world"] == 1 and out["weights_diff"] <= 1e-6


def test_the_force_switch_is_read_and_checked(monkeypatch):
    monkeypatch.delenv(rdist.FORCE_ENV, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not rdist.forced() and not rdist.joins()
    assert rdist.setup("cpu") == rdist.Dist() and not rdist.Dist().active
    monkeypatch.setenv(rdist.FORCE_ENV, "0")
    assert not rdist.joins()
    monkeypatch.setenv(rdist.FORCE_ENV, "1")
    assert rdist.forced() and rdist.joins() and not rdist.launched()
    monkeypatch.setenv(rdist.FORCE_ENV, "yes")
    with pytest.raises(UserError, match="PROBE_DIST_FORCE='yes'"):
        rdist.joins()
    # a group is active with one rank only when forced
    assert rdist.Dist(backend="gloo", forced=True).active and not rdist.Dist(backend="gloo").active
    assert not rdist.Dist(forced=True).active                       # no group joined


@pytest.mark.slow
def test_the_cli_trains_in_a_forced_group_as_one_process(tmp_path):
    """``PROBE_DIST_FORCE=1 probe train``: the same run as without it, through DDP."""
    argv = [sys.executable, "-m", "probe", "train", "--model", "tiny_mlp", "--epochs", "2", "--batch-size", "64",
            "--limit-train", "200", "--limit-test", "100", "--mixup", "0.2", "--seed", "3", "--json", "--quiet"]
    base = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", rdist.FORCE_ENV):
        base.pop(key, None)
    plain = subprocess.run(argv + ["--runs", str(tmp_path / "a")], env=base, capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
    forced = subprocess.run(argv + ["--runs", str(tmp_path / "b")], env={**base, rdist.FORCE_ENV: "1"},
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert plain.returncode == 0 and forced.returncode == 0, (plain.stderr[-500:], forced.stderr[-500:])
    a, b = RunStore(tmp_path / "a"), RunStore(tmp_path / "b")
    ra, rb = json.loads(plain.stdout)["run_id"], json.loads(forced.stdout)["run_id"]
    ca, cb = a.load_checkpoint(ra, 2), b.load_checkpoint(rb, 2)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert [m["train_loss"] for m in a.get_metrics(ra)] == [m["train_loss"] for m in b.get_metrics(rb)]
    assert "ranks" not in ca["rng"] and len(cb["rng"]["ranks"]) == 1
    bad = subprocess.run(argv + ["--runs", str(tmp_path / "c")], env={**base, rdist.FORCE_ENV: "on"},
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode == 2 and "PROBE_DIST_FORCE='on'" in bad.stderr and "Traceback" not in bad.stderr
