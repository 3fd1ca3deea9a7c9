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

import numpy as np
import pytest
import torch

from probe.store import RunStore

ROOT = Path(__file__).resolve().parents[2]
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
import probe.store.files as st
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
import os, signal, sys
import torch
from probe.runtime.dist import DistError, setup
import probe.probes.surface.api as api
from probe.probes.surface import loss_surface, random_directions
d = setup("cpu")
calls = [0]
evaluate = api.evaluate_points
def dying(*args, **kwargs):
    calls[0] += 1
    if d.rank == 1 and calls[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)        # rank 1 dies in the middle of the probe
    return evaluate(*args, **kwargs)
api.evaluate_points = dying
from models import create_model
torch.manual_seed(0)
model = create_model("tiny_mlp").eval()
x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
try:
    loss_surface(model, x, y, random_directions(model, 2), "-1:1:9", chunk=4)
except DistError as e:
    print("DISTERROR", e, flush=True)
    # leave without running torch's destructors: gloo's process group with a dead peer may call
    # std::terminate while it is torn down at interpreter exit (SIGABRT), which is not under test
    os._exit(3)
print("FINISHED", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_killed_mid_probe_is_a_clear_error_on_the_survivor_within_the_timeout(tmp_path):
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
    assert "DISTERROR rank 0 of 2: all-gather failed, a peer rank stopped" in outs[0][0], outs[0]
    assert "--resume" in outs[0][0]
    assert time.monotonic() - t0 < 60


def test_bad_distributed_input_is_one_line(tmp_path):
    bad = _probe("train", "--model", "tiny_mlp", "--nproc", "0", "--runs", str(tmp_path))
    assert bad.returncode == 2 and "--nproc 0" in bad.stderr and "Traceback" not in bad.stderr
    sync = _probe("train", "--model", "tiny_add", "--nproc", "2", "--sync-bn", "--epochs", "1", "--limit-train", "64",
                  "--runs", str(tmp_path), "--device", "cpu")
    assert sync.returncode != 0 and "--sync-bn needs CUDA" in sync.stderr and "Traceback" not in sync.stderr


def _torchrun(*argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "probe", "--", *argv], env=_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _why(proc: subprocess.CompletedProcess) -> str:
    """What a failed torchrun printed: every rank's own error lines first (torchrun's summary
    alone names only the signal), then the tail."""
    own = [line for line in proc.stderr.splitlines()
           if any(w in line for w in ("terminate", "what()", "Error", "error:", "Traceback"))]
    return "\n".join(own[:20]) + "\n...\n" + proc.stderr[-600:]


def _one_and_two(argv: list[str]) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The same probe command as one process, then under torchrun with two ranks; both succeed
    and the second prints one JSON object (rank 0's)."""
    one = _probe(*argv)
    assert one.returncode == 0, one.stderr[-500:]
    two = _torchrun(*argv)
    assert two.returncode == 0, _why(two)
    assert len([line for line in two.stdout.splitlines() if line.startswith("{")]) == 1
    return one, two


def _stored_pair(root, kind: str):
    """The two stored rows of ``kind`` (one process first, then two ranks) and their arrays."""
    store = RunStore(root)
    rows = store.list_probes(kind=kind)
    assert len(rows) == 2                                  # one per command: rank 0 alone stored
    return rows, store.load_probe_arrays(rows[0]["probe_id"]), store.load_probe_arrays(rows[1]["probe_id"])


@pytest.mark.slow          # the chunk sharing is also exercised, in the default suite, by the Hessian and NTK tests
def test_a_surface_grid_shared_out_by_chunks_equals_one_process(tmp_path):
    """float64, 7 x 7 points in chunks of 5: the two ranks take alternate chunks, rank 0 stores one
    row, equal to the single-process surface within 1e-10."""
    argv = ["surface", "--model", "tiny_add", "--n", "24", "--grid", "-1:1:7", "--chunk", "5", "--dtype", "float64",
            "--runs", str(tmp_path), "--json", "--quiet"]
    _one_and_two(argv)
    rows, a, b = _stored_pair(tmp_path, "surface")
    assert a["loss"].shape == (7, 7) and np.abs(a["loss"] - b["loss"]).max() < 1e-10
    assert np.array_equal(a["accuracy"], b["accuracy"])
    assert rows[0]["summary"]["n_chunks"] == rows[1]["summary"]["n_chunks"] == 10


def test_a_checkpoint_sweep_shared_out_by_target_equals_one_process(tmp_path):
    train = _probe("train", "--model", "tiny_add", "--epochs", "2", "--limit-train", "64", "--limit-test", "32",
                   "--runs", str(tmp_path), "--json", "--quiet")
    assert train.returncode == 0, train.stderr[-500:]
    rid = json.loads(train.stdout)["run_id"]
    argv = ["gradvar", "--run", rid, "--checkpoint", "all", "--n", "64", "--batches", "2", "--batch-size", "16",
            "--seeds", "1", "--runs", str(tmp_path), "--json", "--quiet"]
    _, two = _one_and_two(argv)
    doc = json.loads([line for line in two.stdout.splitlines() if line.startswith("{")][0])
    assert [r["epoch"] for r in doc["results"]] == [0, 1, 2]       # in checkpoint order
    rows = RunStore(tmp_path).list_probes(kind="gradvar")
    assert len(rows) == 6
    first, second = rows[:3], rows[3:]
    for a, b in zip(first, second):
        assert a["checkpoint_epoch"] == b["checkpoint_epoch"]
        sa, sb = a["summary"]["aggregates"], b["summary"]["aggregates"]
        for key in ("snr", "grad_norm", "trace_cov"):
            assert sa[key] == pytest.approx(sb[key], rel=1e-9), (a["checkpoint_epoch"], key)


def test_hessian_products_by_data_shards_equal_one_process(tmp_path):
    """float64: each rank holds half of the subset, every product is all-reduced; top-3, the
    Hutchinson trace over a fixed probe set and the density equal the single-process ones."""
    argv = ["hessian", "--model", "tiny_add", "--n", "30", "--k", "3", "--trace-matvecs", "12", "--density-probes", "1",
            "--density-steps", "8", "--dtype", "float64", "--runs", str(tmp_path), "--json", "--quiet"]
    _one_and_two(argv)
    rows = RunStore(tmp_path).list_probes(kind="hessian")
    assert len(rows) == 2
    a, b = rows[0]["summary"], rows[1]["summary"]
    assert any("data shards over 2 ranks" in note for note in b["notes"])
    assert np.allclose(a["largest"]["eigenvalues"], b["largest"]["eigenvalues"], rtol=1e-10, atol=0)
    assert len(a["largest"]["eigenvalues"]) == 3
    assert b["trace"]["estimate"] == pytest.approx(a["trace"]["estimate"], rel=1e-10)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-12)


@pytest.mark.slow          # the kernel over ranks is checked in the default suite by tests/probes/test_ntk_dist.py
@pytest.mark.parametrize("kind", ["trace", "full"])
def test_the_ntk_kernel_over_ranks_equals_one_process(tmp_path, kind):
    """trace: the layer factors of each rank's samples, exchanged; full: the upper triangle's
    tiles shared out over two ranks, assembled. The kernel (float64) and its spectrum equal the
    single-process ones within 1e-10."""
    argv = ["ntk", "--model", "tiny_add", "--n", "18", "--kind", kind, "--dtype", "float64", "--trials", "2",
            "--runs", str(tmp_path), "--json", "--quiet"]
    _one_and_two(argv)
    rows, a, b = _stored_pair(tmp_path, "ntk")
    assert a["kernel"].shape == b["kernel"].shape
    assert np.abs(a["kernel"] - b["kernel"]).max() <= 1e-10 * np.abs(a["kernel"]).max()
    assert np.array_equal(b["kernel"], b["kernel"].T)
    how = "from layer factors" if kind == "trace" else "tiles over 2 ranks"
    assert any(how in n for n in rows[1]["summary"]["notes"])


@pytest.mark.parametrize("operator", [pytest.param("gram", marks=pytest.mark.slow),   # data-shard products: the
                                      pytest.param("ntvp", marks=pytest.mark.slow)])  # Hessian test, by default
def test_ntk_lanczos_products_by_data_shards_equal_one_process(tmp_path, operator):
    """J^T J (gram) or K v = J (J^T v) (ntvp) over two ranks' halves of the samples, all-reduced
    (and the ntvp rows gathered): the top eigenvalues equal the single-process ones."""
    argv = ["ntk", "--model", "tiny_add", "--n", "40", "--method", "lanczos", "--lanczos-operator", operator,
            "--topk", "4", "--dtype", "float64", "--runs", str(tmp_path), "--json", "--quiet"]
    one, two = _one_and_two(argv)
    a = json.loads(one.stdout)["results"][0]
    b = json.loads([line for line in two.stdout.splitlines() if line.startswith("{")][0])["results"][0]
    assert b["lanczos"]["method"] == operator
    assert any("data shards over 2 ranks" in n for n in b["lanczos"]["notes"])
    assert np.allclose(a["top_eigenvalues"], b["top_eigenvalues"], rtol=1e-10, atol=0)


@pytest.mark.slow
def test_interpolation_paths_shared_out_by_batches_equal_one_process(tmp_path):
    argv = ["interp", "--model", "tiny_add", "--n", "40", "--pairs", "12", "--steps", "9", "--max-degree", "6",
            "--triples", "1", "--plane-resolution", "7", "--batch-size", "16", "--dtype", "float64",
            "--runs", str(tmp_path), "--json", "--quiet"]
    _one_and_two(argv)
    _, a, b = _stored_pair(tmp_path, "interp")
    assert set(a) == set(b)
    for key in a:
        if np.issubdtype(a[key].dtype, np.floating):
            assert np.allclose(a[key], b[key], rtol=1e-10, atol=1e-12, equal_nan=True), key
        else:
            assert np.array_equal(a[key], b[key]), key
