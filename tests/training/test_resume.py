"""Every resume is exact: a run SIGKILLed before its first checkpoint, or in the middle of writing
one, resumes to the same metrics and weights as an uninterrupted run, at the thread count the
original used, and leaves no temporary file behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probe.store import RunStore

ROOT = Path(__file__).resolve().parents[2]

# Trains through the CLI; with mode "before" / "during" the process SIGKILLs itself just before /
# half-way through writing the checkpoint of epoch AT (after that epoch's metrics were logged).
KILLER = r"""
import os, signal, sys
import torch
mode, at_epoch, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
import probe.store.atomic as _atomic
import probe.store.files as st
original = st.atomic_write_bytes
def patched(path, data):
    if mode != "none" and str(path).endswith(f"epoch_{at_epoch:04d}.pt"):
        if mode == "during":
            with _atomic.atomic_file(path) as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(path, data)
st.atomic_write_bytes = patched
from probe.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _env(threads: int):
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def _train(runs: Path, mode: str, at: int, threads: int) -> subprocess.CompletedProcess:
    argv = ["train", "--model", "tiny_wrn", "--model-arg", "dropout=0.3", "--epochs", "3", "--lr", "0.05",
            "--batch-size", "32", "--limit-train", "192", "--limit-test", "64", "--mixup", "0.2", "--hflip",
            "--seed", "5", "--runs", str(runs), "--quiet", "--json"]
    return subprocess.run([sys.executable, "-c", KILLER, mode, str(at), str(threads), *argv], env=_env(threads),
                          capture_output=True, text=True, timeout=300)


def _same_run(store_a: RunStore, id_a: str, store_b: RunStore, id_b: str) -> None:
    got, want = store_a.get_metrics(id_a), store_b.get_metrics(id_b)
    assert [m["epoch"] for m in got] == [m["epoch"] for m in want] == [1, 2, 3]
    for a, b in zip(got, want):
        for key in ("train_loss", "train_top1", "train_top5", "test_loss", "test_top1", "test_top5", "lr"):
            assert a[key] == b[key], (a["epoch"], key, a[key], b[key])
    wa, wb = store_a.load_checkpoint(id_a, 3)["model"], store_b.load_checkpoint(id_b, 3)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("mode,at,threads", [pytest.param("before", 1, 1, marks=pytest.mark.slow), ("during", 2, 2)],
                         ids=["killed-before-first-checkpoint", "killed-writing-checkpoint-2-threads"])
def test_sigkilled_run_resumes_exactly(tmp_path, mode, at, threads):
    killed = _train(tmp_path / "killed", mode, at, threads)
    assert killed.returncode == -9, killed.stderr[-2000:]
    leftovers = list((tmp_path / "killed" / "runs").glob("*/checkpoints/.*.tmp"))
    if mode == "during":  # the kill left a half-written temporary file (the catalog never saw it)
        assert len(leftovers) == 1
    store = RunStore(tmp_path / "killed")  # opening the root removes files of dead writers
    assert not any(p.exists() for p in leftovers)
    run = store.list_runs()[0]
    assert run["status"] == "running" and (store.latest_checkpoint(run["run_id"]) or 0) == at - 1
    ckpt_dir = Path(run["path"]) / "checkpoints"
    # the resume runs at one thread; the run's own thread count is restored for it
    resumed = subprocess.run([sys.executable, "-m", "probe.cli", "train", "--resume", run["run_id"], "--runs",
                              str(tmp_path / "killed"), "--quiet", "--json"], env=_env(1), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    ref = _train(tmp_path / "ref", "none", 0, threads)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_store = RunStore(tmp_path / "ref")
    _same_run(store, run["run_id"], ref_store, ref_store.list_runs()[0]["run_id"])
    done = json.loads(resumed.stdout)
    metrics = store.get_metrics(run["run_id"])
    assert done["train_time_s"] == pytest.approx(sum(m["epoch_time_s"] for m in metrics), rel=1e-9)
    assert done["best_acc"] == json.loads(ref.stdout)["best_acc"]
    assert store.get_run(run["run_id"])["status"] == "finished"


def test_sigterm_marks_the_run_interrupted_and_it_resumes_exactly(tmp_path):
    import signal
    import time

    argv = [sys.executable, "-m", "probe.cli", "train", "--model", "tiny_wrn", "--model-arg", "dropout=0.3",
            "--epochs", "3", "--limit-train", "512", "--limit-test", "64", "--seed", "2", "--schedule", "constant",
            "--quiet", "--json"]
    proc = subprocess.Popen(argv + ["--runs", str(tmp_path / "term")], env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline, store = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "term" / "catalog.sqlite").exists():
            store = store or RunStore(tmp_path / "term", readonly=True)
            runs = store.list_runs()
            if runs and store.latest_checkpoint(runs[0]["run_id"]):
                break
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines() == ["probe train: interrupted"], err
    store = RunStore(tmp_path / "term")
    run = store.list_runs()[0]
    assert run["status"] == "interrupted" and "resumes from epoch" in run["error"]
    resumed = subprocess.run([sys.executable, "-m", "probe.cli", "train", "--resume", run["run_id"], "--runs",
                              str(tmp_path / "term"), "--quiet", "--json"], env=_env(1), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref = subprocess.run(argv + ["--runs", str(tmp_path / "ref")], env=_env(1), capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_store = RunStore(tmp_path / "ref")
    _same_run(store, run["run_id"], ref_store, ref_store.list_runs()[0]["run_id"])
