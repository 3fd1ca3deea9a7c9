"""Training under torchrun (gloo on CPU, world size 2, processes started by the test): equal to a
single process on the same global batch, a SIGKILLed distributed run resumes exactly, a rank that
dies makes the survivor raise a clear error within the timeout, and bad distributed input is a
one-line error."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from probe.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PROBE_DIST_TIMEOUT="60")
    env.update(extra)
    return env


def _probe(*argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "probe", *argv], env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _metrics_close(got: list[dict], want: list[dict], tol: float) -> None:
    assert [m["epoch"] for m in got] == [m["epoch"] for m in want]
    for a, b in zip(got, want):
        for key in ("train_loss", "train_top1", "test_loss", "test_top1", "lr"):
            assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), (a["epoch"], key)


def _weights(store: RunStore, rid: str, epoch: int) -> dict:
    return store.load_checkpoint(rid, epoch)["model"]


def test_two_ranks_equal_one_process_on_the_same_global_batch(tmp_path):
    """No BatchNorm (each rank would normalise its own half): the per-epoch metrics and the weights
    of `--nproc 2` equal a single process within float32 rounding, the last batch (200 = 3 x 64 +
    8) split 4 / 4; mixup draws the same global batch on every rank."""
    common = ["train", "--model", "tiny_mlp", "--epochs", "3", "--batch-size", "64", "--limit-train", "200",
              "--limit-test", "100", "--mixup", "0.2", "--lr", "0.1", "--seed", "3", "--runs", str(tmp_path),
              "--json", "--quiet"]
    one = _probe(*common)
    assert one.returncode == 0, one.stderr[-500:]
    two = _probe(*common, "--nproc", "2")
    assert two.returncode == 0, two.stderr[-500:]
    out = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(out) == 1                                   # rank 0 alone reports
    r1, r2 = json.loads(one.stdout)["run_id"], json.loads(out[0])["run_id"]
    store = RunStore(tmp_path)
    assert len(store.list_runs()) == 2                     # rank 0 alone writes the catalog
    assert store.get_run(r2)["config"]["resolved"]["world_size"] == 2
    _metrics_close(store.get_metrics(r2), store.get_metrics(r1), 1e-5)
    w1, w2 = _weights(store, r1, 3), _weights(store, r2, 3)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    assert len(store.load_checkpoint(r2, 3)["rng"]["ranks"]) == 2   # every rank's generator state


KILLER = r"""
import os, signal, sys
at = int(sys.argv[1])
import probe.store as st
original = st.atomic_write_bytes
def patched(path, data):
    original(path, data)
    if str(path).endswith(f"epoch_{at:04d}.pt"):
        os.kill(os.getpid(), signal.SIGKILL)   # rank 0 dies right after writing this checkpoint file
st.atomic_write_bytes = patched
from probe.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_sigkilled_distributed_run_resumes_exactly(tmp_path):
    """Dropout, mixup and flips draw from every rank's generators: the checkpoint holds all of
    them, so the resumed 2-rank run equals an uninterrupted 2-rank run (same code, same world)."""
    argv = ["train", "--model", "tiny_wrn", "--model-arg", "dropout=0.3", "--epochs", "4", "--lr", "0.05",
            "--batch-size", "32", "--limit-train", "160", "--limit-test", "64", "--mixup", "0.2", "--hflip",
            "--seed", "5", "--json", "--quiet"]
    whole = _probe(*argv, "--runs", str(tmp_path / "a"), "--nproc", "2")
    assert whole.returncode == 0, whole.stderr[-500:]
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(script), "2", *argv, "--runs", str(tmp_path / "b")], env=_env(),
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert killed.returncode != 0
    b = RunStore(tmp_path / "b")
    rid = b.list_runs()[0]["run_id"]
    assert b.latest_checkpoint(rid) in (1, 2) and b.get_run(rid)["status"] in ("running", "interrupted", "failed")
    wrong = _probe("train", "--resume", rid, "--runs", str(tmp_path / "b"), "--quiet")
    assert wrong.returncode == 2 and "same number" in wrong.stderr and "Traceback" not in wrong.stderr
    resumed = _probe("train", "--resume", rid, "--runs", str(tmp_path / "b"), "--nproc", "2", "--json", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-500:]
    a = RunStore(tmp_path / "a")
    ra = a.list_runs()[0]["run_id"]
    got, want = b.get_metrics(rid), a.get_metrics(ra)
    assert [m["epoch"] for m in got] == [1, 2, 3, 4]
    for x, y in zip(got, want):
        for key in ("train_loss", "train_top1", "test_loss", "test_top1"):
            assert x[key] == y[key], (x["epoch"], key)
    wa, wb = _weights(a, ra, 4), _weights(b, rid, 4)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert b.get_run(rid)["status"] == "finished"


SURVIVOR = r"""
import os, signal, sys, time
from probe.dist import DistError, setup
import torch
d = setup("cpu")
t = torch.ones(1)
for i in range(10 ** 6):
    if d.rank == 1 and i == 20:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        d.all_reduce_(t)
    except DistError as e:
        print("DISTERROR", e, flush=True)
        sys.exit(3)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_rank_is_a_clear_error_on_the_survivor_within_the_timeout(tmp_path):
    port = str(_free_port())
    procs = []
    t0 = time.monotonic()
    for rank in (0, 1):
        env = _env(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   PROBE_DIST_TIMEOUT="30")
        procs.append(subprocess.Popen([sys.executable, "-c", SURVIVOR], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT))
    outs = [p.communicate(timeout=120) for p in procs]
    assert procs[1].returncode == -9
    assert procs[0].returncode == 3, outs[0]
    assert "DISTERROR rank 0 of 2: all-reduce failed, a peer rank stopped" in outs[0][0]
    assert "--resume" in outs[0][0]
    assert time.monotonic() - t0 < 60


def test_bad_distributed_input_is_one_line(tmp_path):
    bad = _probe("train", "--model", "tiny_mlp", "--nproc", "0", "--runs", str(tmp_path))
    assert bad.returncode == 2 and "--nproc 0" in bad.stderr and "Traceback" not in bad.stderr
    sync = _probe("train", "--model", "tiny_add", "--nproc", "2", "--sync-bn", "--epochs", "1", "--limit-train", "64",
                  "--runs", str(tmp_path), "--device", "cpu")
    assert sync.returncode != 0 and "--sync-bn needs CUDA" in sync.stderr and "Traceback" not in sync.stderr
