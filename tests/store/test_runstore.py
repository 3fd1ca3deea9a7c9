"""Tests of the run store (probe/store/): catalog, files, integrity checks and concurrency."""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import pickle
import shlex
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from probe.errors import StoreError, UserError
from probe.store import (
    SCHEMA_VERSION,
    RunStore,
    atomic_savez,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    resolve_runs_root,
    to_jsonable,
)


@pytest.fixture
def store(tmp_path):
    s = RunStore(tmp_path / "runs")
    yield s
    s.close()


def _catalog(store: RunStore) -> sqlite3.Connection:
    """A separate raw connection, to look at (or tamper with) what the store wrote."""
    return sqlite3.connect(store.catalog_path, isolation_level=None)


# ---- runs root and JSON ----------------------------------------------------------------------


def test_resolve_runs_root_arg_env_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROBE_RUNS", raising=False)
    assert resolve_runs_root(None) == tmp_path / "runs"
    monkeypatch.setenv("PROBE_RUNS", str(tmp_path / "env_runs"))
    assert resolve_runs_root(None) == tmp_path / "env_runs"
    assert resolve_runs_root("explicit") == tmp_path / "explicit"


def test_to_jsonable_numpy_and_non_finite():
    import torch

    out = to_jsonable({"a": np.float32(0.5), "b": np.int64(3), "c": np.arange(3), "d": float("nan"),
                       "e": [np.inf, -1.0], 4: torch.tensor([1.5, 2.5]), "f": np.bool_(True),
                       "g": Path("x/y"), "h": (1, 2)})
    assert out == {"a": 0.5, "b": 3, "c": [0, 1, 2], "d": None, "e": [None, -1.0], "4": [1.5, 2.5],
                   "f": True, "g": "x/y", "h": [1, 2]}
    assert type(out["b"]) is int and type(out["f"]) is bool
    json.dumps(out, allow_nan=False)  # strict JSON
    with pytest.raises(TypeError):
        to_jsonable({"bad": object()})


# ---- runs ------------------------------------------------------------------------------------


def test_run_round_trip(store):
    cfg = {"epochs": 3, "lr": np.float64(0.1), "widths": (16, 32), "nan": float("nan")}
    rid = store.new_run("mul_resnet", "digits", cfg)
    assert "mul_resnet" in rid
    run = store.get_run(rid)
    assert run["status"] == "running" and run["model"] == "mul_resnet" and run["data"] == "digits"
    assert run["config"] == {"epochs": 3, "lr": 0.1, "widths": [16, 32], "nan": None}
    on_disk = json.loads((store.run_dir(rid) / "config.json").read_text())
    assert on_disk == run["config"]
    assert Path(run["path"]) == store.root / "runs" / rid

    store.update_run(rid, summary={"best_acc": 0.9, "best_epoch": 2})
    store.update_run(rid, status="finished", summary={"final_acc": np.float32(0.875)})
    run = store.get_run(rid)
    assert run["status"] == "finished"
    assert run["summary"] == {"best_acc": 0.9, "best_epoch": 2, "final_acc": 0.875}
    assert run["updated_at"] >= run["created_at"]

    other = store.new_run("add_resnet", "digits", {})
    store.update_run(other, status="failed", error="boom")
    assert store.get_run(other)["error"] == "boom"
    assert [r["run_id"] for r in store.list_runs()] == [other, rid]  # newest first
    assert [r["run_id"] for r in store.list_runs(model="mul_resnet")] == [rid]
    assert [r["run_id"] for r in store.list_runs(status="failed")] == [other]
    with pytest.raises(UserError, match="status"):
        store.update_run(rid, status="exploded")


def test_run_lookup_prefix_last_and_close_matches(store):
    with pytest.raises(UserError, match="no runs"):
        store.get_run("last")
    a = store.new_run("mul_resnet", "digits", {})
    b = store.new_run("add_resnet", "digits", {})
    assert store.get_run("last")["run_id"] == b
    assert store.get_run("latest")["run_id"] == b
    assert store.get_run(a[:-2])["run_id"] == a  # unique prefix
    assert len({a, b}) == 2 and a[:4] == b[:4]  # both start with the year
    with pytest.raises(UserError, match="matches 2 runs"):
        store.get_run(a[:4])
    typo = a[:-1] + ("0" if a[-1] != "0" else "1")
    with pytest.raises(UserError) as err:
        store.get_run(typo)
    assert a in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError) as err:
        store.get_run("mul_resnet")
    assert a in str(err.value) and b not in str(err.value)


def test_run_ids_unique(store):
    ids = {store.new_run("tiny mlp/x", None, {}) for _ in range(20)}
    assert len(ids) == 20
    assert all(" " not in i and "/" not in i for i in ids)


# ---- catalog ---------------------------------------------------------------------------------


def test_catalog_wal_schema_and_reopen(tmp_path):
    root = tmp_path / "r"
    s = RunStore(root)
    rid = s.new_run("m", "d", {"k": 1})
    s.log_epoch(rid, 0, train_loss=1.0)
    s.close()
    con = sqlite3.connect(root / "catalog.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"schema_version", "runs", "metrics", "checkpoints", "probes"} <= tables
    con.close()
    again = RunStore(root)
    assert again.get_run(rid)["config"] == {"k": 1}
    assert again.get_metrics(rid)[0]["train_loss"] == 1.0
    again2 = pickle.loads(pickle.dumps(again))  # pickles by root, re-opens
    assert again2.root == again.root and again2.get_run("last")["run_id"] == rid


def test_store_usable_after_fork(store):
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    rid = store.new_run("m", "d", {})
    parent_con = store._connection()
    pid = os.fork()
    if pid == 0:  # child: must open its own connection, then write through it
        code = 1
        try:
            code = 0 if store._connection() is not parent_con else 3
            store.log_epoch(rid, 7, lr=0.5)
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get_metrics(rid) == [dict(store.get_metrics(rid)[0], epoch=7, lr=0.5)]
    assert store._connection() is parent_con


def test_root_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a folder") as err:
        RunStore(f)
    assert "\n" not in str(err.value)
    with pytest.raises(StoreError, match="cannot create"):
        RunStore(f / "sub")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_root_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="not writable"):
            RunStore(ro)
        with pytest.raises(StoreError, match="cannot create"):
            RunStore(ro / "runs")
    finally:
        ro.chmod(0o700)


def test_garbage_catalog(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "catalog.sqlite").write_bytes(b"this is not a database, just text\n" * 200)
    with pytest.raises(StoreError, match="not an SQLite catalog") as err:
        RunStore(root)
    assert "\n" not in str(err.value)


def test_catalog_from_the_future(tmp_path):
    root = tmp_path / "r"
    RunStore(root).close()
    con = sqlite3.connect(root / "catalog.sqlite", isolation_level=None)
    con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    con.close()
    with pytest.raises(StoreError, match="upgrade"):
        RunStore(root)


# ---- metrics ---------------------------------------------------------------------------------


def test_metrics_round_trip_and_idempotent_epochs(store):
    rid = store.new_run("m", "d", {})
    for epoch in (2, 0, 1):
        store.log_epoch(rid, epoch, train_loss=np.float32(1.0 / (epoch + 1)), test_top1=0.5 + epoch,
                        lr=0.1, grad_norm=np.float64(epoch * 2.0))
    store.log_epoch(rid, 1, train_loss=float("nan"), test_top1=9.0, lr=0.01, grad_norm=float("inf"))
    rows = store.get_metrics(rid)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[0]["train_loss"] == 1.0 and rows[0]["grad_norm"] == 0.0
    assert rows[2]["train_loss"] == pytest.approx(1 / 3) and rows[2]["grad_norm"] == 4.0
    assert rows[1]["train_loss"] is None and rows[1]["grad_norm"] is None  # non-finite -> None
    assert rows[1]["test_top1"] == 9.0 and rows[1]["lr"] == 0.01
    assert rows[0]["test_loss"] is None and rows[0]["epoch_time_s"] is None
    with pytest.raises(UserError, match="unknown run"):
        store.log_epoch("20000101-000000-nope-000000", 0, train_loss=1.0)
    with pytest.raises(TypeError):
        store.log_epoch(rid, 3, train_loss="low")


# ---- atomic writes ---------------------------------------------------------------------------


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "d" / "f.json"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new" * 1000)
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert os.listdir(target.parent) == ["f.json"]
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["f.json"]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_torch_save_failure_mid_write(tmp_path):
    import torch

    target = tmp_path / "ck.pt"
    atomic_torch_save({"w": torch.ones(3)}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"w": torch.zeros(10_000), "z": _Unpicklable()}, target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["ck.pt"]
    atomic_savez(tmp_path / "a.npz", x=np.arange(4))
    with np.load(tmp_path / "a.npz") as z:
        np.testing.assert_array_equal(z["x"], np.arange(4))
    with pytest.raises(TypeError, match="object"):
        atomic_savez(tmp_path / "b.npz", x=np.array([{}, None], dtype=object))
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "ck.pt"]


# ---- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip(store):
    import torch

    rid = store.new_run("tiny", "digits", {"width": 4})
    assert store.latest_checkpoint(rid) is None
    with pytest.raises(UserError, match="no checkpoints"):
        store.load_checkpoint(rid)
    w1, w3 = torch.randn(4, 3), torch.randn(4, 3)
    p1 = store.save_checkpoint(rid, 1, {"model": {"w": w1}, "opt_step": 10})
    store.save_checkpoint(rid, 3, {"model": {"w": w3}, "opt_step": 30})
    assert p1 == store.root / "runs" / rid / "checkpoints" / "epoch_0001.pt" and p1.is_file()
    assert store.latest_checkpoint(rid) == 3
    last = store.load_checkpoint(rid)
    torch.testing.assert_close(last["model"]["w"], w3, rtol=0, atol=0)
    assert last["epoch"] == 3 and last["run_id"] == rid and last["config"] == {"width": 4}
    first = store.load_checkpoint(rid[:-1], 1)
    torch.testing.assert_close(first["model"]["w"], w1, rtol=0, atol=0)
    assert store.load_checkpoint("last", "last")["opt_step"] == 30
    cks = store.list_checkpoints(rid)
    assert [c["epoch"] for c in cks] == [1, 3]
    assert cks[0]["size"] == p1.stat().st_size and len(cks[0]["sha256"]) == 64
    with _catalog(store) as con:  # stored relative to the root
        assert con.execute("SELECT path FROM checkpoints WHERE epoch = 1").fetchone()[0] == \
            f"runs/{rid}/checkpoints/epoch_0001.pt"
    with pytest.raises(UserError, match=r"saved epochs: \[1, 3\]"):
        store.load_checkpoint(rid, 2)
    with pytest.raises(UserError, match="unknown run"):
        store.save_checkpoint("nope", 0, {})


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_checkpoint_damage_detected(store, damage):
    import torch

    rid = store.new_run("tiny", "digits", {})
    path = store.save_checkpoint(rid, 0, {"model": {"w": torch.arange(1000.0)}})
    data = path.read_bytes()
    store.load_checkpoint(rid, 0)  # intact: loads
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 8]) + data[mid + 8:])
    else:
        path.unlink()
    with pytest.raises(StoreError, match="corrupt or truncated|missing") as err:
        store.load_checkpoint(rid, 0)
    assert "\n" not in str(err.value)


class _ShellPayload:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_checkpoint_with_code_is_refused(store, tmp_path, container):
    import torch

    pwned, control = tmp_path / "pwned", tmp_path / "control"

    def payload(target: Path) -> bytes:
        obj = {"model": {"w": torch.ones(2)}, "x": _ShellPayload(f"touch {shlex.quote(str(target))}")}
        if container == "raw_pickle":
            return pickle.dumps(obj, protocol=2)
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    # control: the payload really runs when loaded the unsafe way, so the check below can fail
    if container == "raw_pickle":
        pickle.loads(payload(control))
    else:
        torch.load(io.BytesIO(payload(control)), weights_only=False)
    assert control.exists()

    rid = store.new_run("tiny", "digits", {})
    path = store.save_checkpoint(rid, 0, {"model": {"w": torch.ones(2)}})
    evil = payload(pwned)
    path.write_bytes(evil)

    with _catalog(store) as con:  # registered with its correct size and hash
        con.execute("UPDATE checkpoints SET sha256 = ?, size = ? WHERE run_id = ?",
                    (hashlib.sha256(evil).hexdigest(), len(evil), rid))
    with pytest.raises(StoreError, match="refused.*not a plain tensor checkpoint"):
        store.load_checkpoint(rid, 0)
    assert not pwned.exists()


# ---- probes ----------------------------------------------------------------------------------


def test_probe_round_trip(store):
    rid = store.new_run("mul_resnet", "digits", {})
    eig = np.linspace(1.0, 0.0, 7)
    kernel = np.random.default_rng(0).standard_normal((5, 5))
    p1 = store.add_probe("ntk", run_id=rid, checkpoint_epoch=3, params={"n": np.int64(64)},
                         summary={"cond": np.float64(12.5), "rank": float("inf")},
                         arrays={"eigenvalues": eig, "kernel": kernel, "labels": np.array(["a", "b"])})
    p2 = store.add_probe("hessian", model="add_resnet", params={}, summary={"top": 1.0})
    p3 = store.add_probe("ntk", model="add_resnet", params={}, summary={}, arrays={"e": np.ones(2)})
    got = store.load_probe_arrays(p1)
    assert set(got) == {"eigenvalues", "kernel", "labels"}
    np.testing.assert_array_equal(got["eigenvalues"], eig)
    np.testing.assert_array_equal(got["kernel"], kernel)
    assert got["labels"].tolist() == ["a", "b"]
    assert store.load_probe_arrays(p2) == {}
    row = store.get_probe(p1)
    assert row["run_id"] == rid and row["model"] == "mul_resnet" and row["checkpoint_epoch"] == 3
    assert row["params"] == {"n": 64} and row["summary"] == {"cond": 12.5, "rank": None}
    assert row["artifact"] == str(store.root / "probes" / f"{p1}.npz") and row["status"] == "finished"
    assert store.get_probe(p2)["run_id"] is None and store.get_probe(p2)["artifact"] is None
    assert [p["probe_id"] for p in store.list_probes()] == [p1, p2, p3]
    assert [p["probe_id"] for p in store.list_probes(run_id=rid)] == [p1]
    assert [p["probe_id"] for p in store.list_probes(kind="ntk")] == [p1, p3]
    assert [p["probe_id"] for p in store.list_probes(kind="ntk", model="add_resnet")] == [p3]
    with pytest.raises(UserError, match="unknown probe"):
        store.get_probe("nope")
    with pytest.raises(UserError, match="unknown run"):
        store.add_probe("ntk", run_id="nope", params={}, summary={})
    with pytest.raises(UserError, match="model name or a run"):
        store.add_probe("ntk", params={}, summary={})


def test_probe_artifact_damage_detected(store):
    pid = store.add_probe("ntk", model="m", params={}, summary={},
                          arrays={"k": np.arange(10_000.0)})
    path = Path(store.get_probe(pid)["artifact"])
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(StoreError, match="corrupt or truncated"):
        store.load_probe_arrays(pid)
    path.write_bytes(data)
    np.testing.assert_array_equal(store.load_probe_arrays(pid)["k"], np.arange(10_000.0))


# ---- two processes writing into one catalog at once ------------------------------------------

N_EPOCHS = 30
N_PROBES = 3


def _concurrent_worker(root: str, tag: str, barrier) -> None:
    barrier.wait(timeout=120)  # both open the (new) catalog and write at the same time
    store = RunStore(root)
    rid = store.new_run(f"tiny_{tag}", "synthetic", {"tag": tag})
    for epoch in range(N_EPOCHS):
        store.log_epoch(rid, epoch, train_loss=1.0 / (epoch + 1), lr=0.1, worker=tag)
        if epoch % (N_EPOCHS // N_PROBES) == 0:
            store.add_probe("ntk", run_id=rid, checkpoint_epoch=epoch, params={"epoch": epoch},
                            summary={"tag": tag}, arrays={"eig": np.arange(4.0) + epoch})
    store.update_run(rid, status="finished", summary={"epochs": N_EPOCHS})


def test_two_processes_write_concurrently(tmp_path):
    root = str(tmp_path / "shared_runs")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_concurrent_worker, args=(root, tag, barrier)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    store = RunStore(root)
    runs = store.list_runs()
    assert sorted(r["model"] for r in runs) == ["tiny_a", "tiny_b"]
    for run in runs:
        assert run["status"] == "finished" and run["summary"] == {"epochs": N_EPOCHS}
        rows = store.get_metrics(run["run_id"])
        tag = run["config"]["tag"]
        assert [r["epoch"] for r in rows] == list(range(N_EPOCHS))
        assert all(r["worker"] == tag and math.isclose(r["lr"], 0.1) for r in rows)
        probes = store.list_probes(run_id=run["run_id"])
        assert len(probes) == N_PROBES
        for p in probes:
            np.testing.assert_array_equal(store.load_probe_arrays(p["probe_id"])["eig"],
                                          np.arange(4.0) + p["checkpoint_epoch"])
    leftovers = [p for p in Path(root).rglob("*") if p.name.endswith(".tmp") or "write-test" in p.name]
    assert leftovers == []


def test_a_root_opened_while_another_process_sweeps_it_is_writable(tmp_path, monkeypatch):
    """Two processes open one root at once (parallel sweep workers): each one's sweep of stale
    temporary files may remove the other's write-test file once it is no longer locked. The
    write test removes its file while it still holds the lock, so the root is not taken for a
    read-only one. Simulated: every os.close removes the root's write-test files right after."""
    import probe.store.files as files

    real_close = os.close

    def close_then_sweep(fd):
        real_close(fd)
        for stale in tmp_path.glob(".write-test.*.tmp"):
            stale.unlink()

    monkeypatch.setattr(files.os, "close", close_then_sweep)
    store = RunStore(tmp_path)
    store.close()
    assert not list(tmp_path.glob(".write-test.*"))
