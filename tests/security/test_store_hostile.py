"""The run store against hostile, damaged, read-only and full runs roots (probe/store/).

A runs root may come from someone else: its catalog and files are data. Nothing in them may make
the store read or write outside the root, alter a foreign file, print a traceback or give a wrong
answer; a lost catalog can be rebuilt from the run folders; a full disk loses nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import probe.store as store_mod
from probe.store.atomic import atomic_file as _atomic_file
from probe.errors import StoreError, UserError
from probe.store import RunStore


@pytest.fixture
def store(tmp_path):
    s = RunStore(tmp_path / "root")
    yield s
    s.close()


def _tamper(path: Path, sql: str, *params) -> None:
    """Change the catalog behind the store's back (CHECK constraints off, as a hostile writer)."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA ignore_check_constraints = 1")
    con.execute(sql, params)
    con.close()


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def _torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _register(store: RunStore, table: str, key: str, value: str, file: Path, **extra) -> None:
    """Point a row's sha256 / size at the bytes now in ``file`` (an attacker who fixes the hash)."""
    data = file.read_bytes()
    cols = {"checkpoints": ("sha256", "size"), "probes": ("artifact_sha256", "artifact_size")}[table]
    sets = ", ".join(f"{c} = ?" for c in (*cols, *extra))
    _tamper(store.catalog_path, f"UPDATE {table} SET {sets} WHERE {key} = ?",
            hashlib.sha256(data).hexdigest(), len(data), *extra.values(), value)


# ---- 1. the runs root is a boundary ------------------------------------------------------------

BAD_IDS = ["../x", "a/b", "..", "a..b", ".hidden", "-x", "", "x" * 129, "a\nb", "\udcff", "r\udcffn"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_run_ids_refused_everywhere(store, bad):
    import torch

    rid = store.new_run("m", "d", {})
    calls = [lambda: store.run_dir(bad), lambda: store.log_epoch(bad, 0, lr=0.1),
             lambda: store.save_checkpoint(bad, 0, {"w": torch.ones(1)}),
             lambda: store.update_run(bad, status="failed"),
             lambda: store.add_probe("ntk", run_id=bad, params={}, summary={}),
             lambda: store.get_run(bad), lambda: store.resolve_run(bad),
             lambda: store.list_probes(run_id=bad), lambda: store.get_metrics(bad),
             lambda: store.get_probe(bad), lambda: store.load_probe_arrays(bad)]
    for call in calls:
        with pytest.raises(UserError) as err:  # never UnicodeEncodeError or a path outside
            call()
        _one_line(err)
    assert store.resolve_run("last") == rid == store.resolve_run(" latest ")
    with pytest.raises(UserError, match="not valid text"):  # other text from a non-UTF-8 argv
        store.list_runs(model="\udcff")
    assert _tree(store.root / "runs") == [rid, f"{rid}/config.json"]


def test_generated_ids_are_valid(store):
    rid = store.new_run("a..b/../c", None, {})
    pid = store.add_probe("..", model="...", params={}, summary={})
    assert ".." not in rid and ".." not in pid
    assert store.get_run(rid)["model"] == "a..b/../c" and store.get_probe(pid)["kind"] == ".."


def test_hostile_run_id_in_catalog_never_escapes(tmp_path):
    import torch

    store = RunStore(tmp_path / "root")
    good = store.new_run("m", "d", {})
    _tamper(store.catalog_path, "INSERT INTO runs (run_id, model, created_at, updated_at, status)"
            " VALUES ('../../escape', 'm', '9999', '9999', 'running')")
    before = _tree(tmp_path)
    assert [r["run_id"] for r in store.list_runs()] == [good]
    assert len(store.skipped) == 1 and "'../../escape'" in store.skipped[0]
    assert str(store.catalog_path) in store.skipped[0]
    assert store.resolve_run("last") == good  # the newest row is hostile: skipped
    for call in (lambda: store.get_run("../../escape"), lambda: store.resolve_run(".."),
                 lambda: store.save_checkpoint("../../escape", 1, {"w": torch.ones(1)}),
                 lambda: store.log_epoch("../../escape", 1, lr=1.0)):
        with pytest.raises(UserError):
            call()
    # `probe train --resume` of that run: resolve, then save; nothing may land outside the root
    with pytest.raises(UserError):
        store.save_checkpoint(store.get_run("..")["run_id"], 1, {"w": torch.ones(1)})
    assert _tree(tmp_path) == before
    assert not (tmp_path / "escape").exists()


def test_catalog_paths_are_derived_not_trusted(store, tmp_path):
    import torch

    rid = store.new_run("m", "d", {})
    store.save_checkpoint(rid, 0, {"w": torch.zeros(2)})
    secret = tmp_path / "secret.pt"  # loads fine: reading it would be a wrong answer
    secret.write_bytes(_torch_bytes({"w": torch.full((2,), 7.0)}))
    for stored in (str(secret), "../secret.pt", f"runs/{rid}/checkpoints/../../../../secret.pt"):
        _register(store, "checkpoints", "run_id", rid, secret, path=stored)
        with pytest.raises(StoreError, match=r"checkpoint .* in catalog .*catalog\.sqlite is damaged "
                                             r"\(path") as err:
            store.load_checkpoint(rid, 0)
        assert rid in _one_line(err)
        assert store.list_checkpoints(rid) == [] and "secret.pt" in store.skipped[0]

    pid = store.add_probe("ntk", model="m", params={}, summary={}, arrays={"k": np.zeros(3)})
    outside = tmp_path / "outside.npz"
    store_mod.atomic_savez(outside, k=np.full(3, 7.0))
    for stored in (str(outside), "../outside.npz", "probes/../../outside.npz"):
        _register(store, "probes", "probe_id", pid, outside, artifact=stored)
        for call in (store.load_probe_arrays, store.get_probe):
            with pytest.raises(StoreError, match=r"probe .* in catalog .* is damaged \(artifact"):
                call(pid)
        assert store.list_probes() == [] and pid in store.skipped[0]
    _tamper(store.catalog_path, "UPDATE probes SET probe_id = '../../x' WHERE probe_id = ?", pid)
    assert store.list_probes() == [] and "'../../x'" in store.skipped[0]


@pytest.mark.parametrize("link", ["runs", "run_folder", "checkpoints", "checkpoint_file", "probes",
                                  "probe_file", "catalog"])
def test_symlinks_leading_out_are_refused(tmp_path, link):
    import torch

    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    store = RunStore(root)
    rid = store.new_run("m", "d", {})
    ck = store.save_checkpoint(rid, 0, {"w": torch.zeros(2)})
    pid = store.add_probe("ntk", model="m", params={}, summary={}, arrays={"k": np.zeros(3)})

    def move_out(path: Path) -> Path:  # the real thing goes outside, a link stays
        target = outside / path.name
        shutil.move(path, target)
        path.symlink_to(target)
        return target

    if link == "runs":
        move_out(root / "runs")
        call = lambda: store.new_run("m", "d", {})  # noqa: E731
    elif link == "run_folder":
        move_out(store.root / "runs" / rid)
        call = lambda: store.save_checkpoint(rid, 1, {"w": torch.ones(2)})  # noqa: E731
        with pytest.raises(StoreError, match="outside the runs root"):
            store.run_dir(rid)
    elif link == "checkpoints":
        move_out(ck.parent)
        call = lambda: store.save_checkpoint(rid, 1, {"w": torch.ones(2)})  # noqa: E731
        with pytest.raises(StoreError, match="outside the runs root"):
            store.load_checkpoint(rid, 0)
    elif link == "checkpoint_file":
        move_out(ck).write_bytes(_torch_bytes({"w": torch.full((2,), 7.0)}))
        _register(store, "checkpoints", "run_id", rid, ck)
        call = lambda: store.load_checkpoint(rid, 0)  # noqa: E731
    elif link == "probes":
        move_out(root / "probes")
        call = lambda: store.add_probe("ntk", model="m", arrays={"k": np.ones(1)})  # noqa: E731
    elif link == "probe_file":
        move_out(root / "probes" / f"{pid}.npz")
        call = lambda: store.load_probe_arrays(pid)  # noqa: E731
    else:
        store.close()
        move_out(root / "catalog.sqlite")
        call = lambda: RunStore(root)  # noqa: E731
    before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match="outside the runs root") as err:
        call()
    _one_line(err)
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before


def test_root_itself_may_be_a_symlink(tmp_path):
    import torch

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    store = RunStore(tmp_path / "link")
    rid = store.new_run("m", "d", {})
    store.save_checkpoint(rid, 0, {"w": torch.ones(2)})
    pid = store.add_probe("ntk", run_id=rid, params={}, summary={}, arrays={"k": np.ones(2)})
    assert store.load_checkpoint(rid)["epoch"] == 0 and store.load_probe_arrays(pid)["k"].shape == (2,)
    assert (tmp_path / "real" / "runs" / rid / "checkpoints" / "epoch_0000.pt").is_file()


def _foreign_db(path: Path, kind: str) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    if kind == "users":
        con.execute("CREATE TABLE users (name TEXT, password TEXT)")
        con.execute("INSERT INTO users VALUES ('alice', 'secret')")
    elif kind == "schema_version_without_version":
        con.execute("CREATE TABLE schema_version (v TEXT)")
        con.execute("CREATE TABLE runs (x)")
    else:  # someone else's WAL-mode database
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("CREATE TABLE notes (t TEXT)")
    con.close()


@pytest.mark.parametrize("kind", ["users", "schema_version_without_version", "wal"])
def test_foreign_sqlite_database_is_never_altered(tmp_path, kind):
    root = tmp_path / "root"
    root.mkdir()
    cat = root / "catalog.sqlite"
    _foreign_db(cat, kind)
    before = cat.read_bytes()
    for readonly in (False, True):
        with pytest.raises(StoreError, match="is an SQLite database but not a landscape-probe "
                                             "catalog.*it was not changed") as err:
            RunStore(root, readonly=readonly)
        assert str(cat) in _one_line(err)
    assert cat.read_bytes() == before
    assert sorted(os.listdir(root)) == ["catalog.sqlite"]


# ---- 2. corruption: a clear error naming the file ----------------------------------------------


@pytest.mark.parametrize("value", ["'abc'", "NULL", "-1", "0", "2.5", "two rows", "no row"])
def test_invalid_schema_version(tmp_path, value):
    root = tmp_path / "root"
    RunStore(root).close()
    cat = root / "catalog.sqlite"
    if value == "two rows":
        _tamper(cat, "INSERT INTO schema_version VALUES (1)")
    elif value == "no row":
        _tamper(cat, "DELETE FROM schema_version")
    elif value == "NULL":
        _tamper(cat, "DROP TABLE schema_version")
        _tamper(cat, "CREATE TABLE schema_version (version)")
        _tamper(cat, "INSERT INTO schema_version VALUES (NULL)")
    else:
        _tamper(cat, f"UPDATE schema_version SET version = {value}")
    before = cat.read_bytes()
    with pytest.raises(StoreError, match="invalid schema version.*rebuild") as err:
        RunStore(root)
    assert str(cat) in _one_line(err)
    assert cat.read_bytes() == before


@pytest.mark.parametrize("damage", ["DROP TABLE checkpoints", "DROP TABLE probes",
                                    "ALTER TABLE checkpoints DROP COLUMN sha256",
                                    "ALTER TABLE runs DROP COLUMN notes"])
def test_missing_table_or_column(tmp_path, damage):
    root = tmp_path / "root"
    s = RunStore(root)
    s.new_run("m", "d", {})
    s.close()
    _tamper(root / "catalog.sqlite", damage)
    with pytest.raises(StoreError, match=r"catalog .* is damaged \(table (checkpoints|probes|runs) "
                                         r"(is missing|lacks column).*rebuild") as err:
        RunStore(root)
    _one_line(err)


def _catalog_with_pages(root: Path) -> tuple[Path, int]:
    s = RunStore(root)
    for i in range(150):
        s.new_run(f"m{i}", "d", {"blob": "x" * 200, "i": i})
    s.close()  # the last close checkpoints the WAL into the file
    cat = root / "catalog.sqlite"
    assert not (root / "catalog.sqlite-wal").exists()
    return cat, cat.stat().st_size // 4096


@pytest.mark.parametrize("where", ["middle", "last"])
def test_garbled_page_at_open(tmp_path, where):
    cat, pages = _catalog_with_pages(tmp_path / "root")
    page = pages // 2 if where == "middle" else pages - 1
    with open(cat, "r+b") as f:
        f.seek(page * 4096)
        f.write(b"\xa5" * 4096)
    with pytest.raises(StoreError, match="catalog .* damaged.*rebuild") as err:
        RunStore(tmp_path / "root")
    assert str(cat) in _one_line(err)


def test_garbled_file_under_an_open_store(tmp_path):
    cat, pages = _catalog_with_pages(tmp_path / "root")
    s = RunStore(tmp_path / "root")
    rid = s.list_runs()[0]["run_id"]
    s.close()  # the next call opens a fresh connection, without the checks of RunStore()
    with open(cat, "r+b") as f:
        f.seek(4096 * 2)
        f.write(b"\xa5" * 4096 * (pages - 3))
    for call in (s.list_runs, lambda: s.get_run(rid), lambda: s.log_epoch(rid, 0, lr=1.0)):
        with pytest.raises(StoreError, match="catalog .* damaged.*rebuild") as err:
            call()
        assert str(cat) in _one_line(err)


def test_damaged_rows_are_skipped_in_listings(store):
    import torch

    ids = [store.new_run(f"m{i}", "d", {"i": i}) for i in range(6)]
    cat = store.catalog_path
    damage = {ids[1]: "config_json = '{not json'", ids[2]: "summary_json = '[1, 2]'",
              ids[3]: "status = 'exploded'", ids[4]: "model = x'00ff'"}
    for rid, change in damage.items():
        _tamper(cat, f"UPDATE runs SET {change} WHERE run_id = ?", rid)
    _tamper(cat, "UPDATE runs SET config_json = ? WHERE run_id = ?", "[" * 100_000, ids[5])
    assert [r["run_id"] for r in store.list_runs()] == [ids[0]]
    assert len(store.skipped) == 5
    for line, rid in zip(sorted(store.skipped), sorted(ids[1:])):
        assert rid in line and str(cat) in line and "\n" not in line
    assert store.list_runs(model="m0") and store.skipped == []  # reset on each listing
    for rid in ids[1:]:
        with pytest.raises(StoreError, match=f"run '{rid}' in catalog .* is damaged") as err:
            store.get_run(rid)
        _one_line(err)
    with pytest.raises(StoreError, match="summary"):
        store.update_run(ids[2], summary={"a": 1})

    good = ids[0]
    store.save_checkpoint(good, 1, {"w": torch.ones(1)})
    store.save_checkpoint(good, 2, {"w": torch.ones(1) * 2})
    _tamper(cat, "UPDATE checkpoints SET epoch = 'x' WHERE epoch = 2")
    assert [c["epoch"] for c in store.list_checkpoints(good)] == [1] and "'x'" in store.skipped[0]
    assert store.latest_checkpoint(good) == 1 and store.load_checkpoint(good)["epoch"] == 1
    store.log_epoch(good, 0, lr=1.0)
    store.log_epoch(good, 1, lr=2.0)
    _tamper(cat, "UPDATE metrics SET extra_json = '[]' WHERE epoch = 0")
    _tamper(cat, "UPDATE metrics SET lr = 'fast' WHERE epoch = 1")
    assert store.get_metrics(good) == [] and len(store.skipped) == 2

    probes = [store.add_probe("ntk", model="m", params={"i": i}, summary={}) for i in range(4)]
    _tamper(cat, "UPDATE probes SET params_json = '{not json' WHERE probe_id = ?", probes[1])
    _tamper(cat, "UPDATE probes SET status = 'weird' WHERE probe_id = ?", probes[2])
    _tamper(cat, "UPDATE probes SET checkpoint_epoch = 'x' WHERE probe_id = ?", probes[3])
    assert [p["probe_id"] for p in store.list_probes()] == [probes[0]] and len(store.skipped) == 3
    for pid in probes[1:]:
        for call in (store.get_probe, store.load_probe_arrays):
            with pytest.raises(StoreError, match=f"probe '{pid}' in catalog .* is damaged"):
                call(pid)


def _npz_member(name: str, payload: bytes, compress=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as zf:
        zf.writestr(name, payload)
    return buf.getvalue()


def _npy_header(shape, descr="<f8") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def _zlib_corrupt() -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, k=np.arange(1000.0))
    data = bytearray(buf.getvalue())
    start = 30 + len("k.npy") + struct.unpack("<H", data[28:30])[0]  # after the local header
    data[start:start + 16] = b"\xff" * 16  # an invalid deflate block type
    return bytes(data)


GARBLED_NPZ = {
    "not_a_zip": lambda: b"PK\x03\x04 but not really a zip file",
    "member_not_npy": lambda: _npz_member("k.npy", b"this is not an npy array"),
    "plain_bytes_member": lambda: _npz_member("notes.txt", b"would come back as bytes"),
    "zlib_corrupt": _zlib_corrupt,
    "gigantic_shape": lambda: _npz_member("k.npy", _npy_header((10**7, 10**7)) + b"\0" * 64),
    "gigantic_shape_deflated": lambda: _npz_member("k.npy", _npy_header((10**12,)) + b"\0" * 4096,
                                                   zipfile.ZIP_DEFLATED),
    "truncated_member": lambda: _npz_member("k.npy", _npy_header((100,)) + b"\0" * 80),
}


@pytest.mark.parametrize("kind", sorted(GARBLED_NPZ))
def test_garbled_npz_with_matching_hash(store, kind):
    pid = store.add_probe("ntk", model="m", params={}, summary={}, arrays={"k": np.arange(3.0)})
    path = Path(store.get_probe(pid)["artifact"])
    path.write_bytes(GARBLED_NPZ[kind]())
    _register(store, "probes", "probe_id", pid, path)
    t0 = time.perf_counter()
    with pytest.raises(StoreError, match="probe artifact .* is corrupt.*run the probe again") as err:
        store.load_probe_arrays(pid)
    assert str(path) in _one_line(err)
    assert time.perf_counter() - t0 < 5


def test_garbled_checkpoint_with_matching_hash(store):
    import torch

    rid = store.new_run("m", "d", {})
    path = store.save_checkpoint(rid, 0, {"w": torch.ones(3)})
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    _register(store, "checkpoints", "run_id", rid, path)
    with pytest.raises(StoreError, match="checkpoint .* (corrupt|refused)") as err:
        store.load_checkpoint(rid, 0)
    assert str(path) in _one_line(err)


@pytest.mark.parametrize("how", ["zero_bytes", "missing", "no_tables"])
def test_lost_catalog_with_run_folders_is_not_replaced(tmp_path, how):
    root = tmp_path / "root"
    s = RunStore(root)
    rids = [s.new_run("m", "d", {}) for _ in range(2)]
    s.close()
    cat = root / "catalog.sqlite"
    cat.unlink()
    if how == "zero_bytes":
        cat.write_bytes(b"")
    elif how == "no_tables":
        sqlite3.connect(cat).execute("PRAGMA user_version = 7").connection.close()
    before = cat.read_bytes() if cat.exists() else None
    for readonly in (False, True):
        with pytest.raises(StoreError, match=r"empty or missing but .*runs holds 2 run folders.*"
                                             r"rebuild-catalog.*rebuild_catalog") as err:
            RunStore(root, readonly=readonly)
        _one_line(err)
    assert (cat.read_bytes() if cat.exists() else None) == before
    assert sorted(os.listdir(root / "runs")) == sorted(rids)


def test_fresh_or_empty_catalog_without_runs_is_initialised(tmp_path):
    (tmp_path / "a" / "runs" / "stray").mkdir(parents=True)  # a folder without config.json
    RunStore(tmp_path / "a").new_run("m", "d", {})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "catalog.sqlite").write_bytes(b"")
    assert RunStore(tmp_path / "b").list_runs() == []


# ---- 3. leftover temp files ----------------------------------------------------------------------


def test_temp_file_is_locked_while_written(tmp_path):
    import fcntl

    target = tmp_path / "f.bin"
    with _atomic_file(target) as f:
        f.write(b"x")
        (tmp := next(tmp_path.glob(".f.bin.*.tmp")))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert target.read_bytes() == b"x" and os.listdir(tmp_path) == ["f.bin"]


def test_temp_file_removed_by_a_sweep_before_it_is_locked_is_replaced(tmp_path, monkeypatch):
    """A sweep may lock and remove a temp file in the instant between its creation and its
    writer's flock: the writer notices and takes another name, and the write succeeds."""
    import fcntl

    real_flock, raced = fcntl.flock, []

    def flock(fd, op):
        if not raced:  # a sweeper gets there first
            raced.append(next(tmp_path.glob(".f.bin.*.tmp")))
            store_mod.RunStore._remove_if_dead(str(raced[0]))
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    store_mod.atomic_write_bytes(tmp_path / "f.bin", b"data")
    assert raced and not raced[0].exists()
    assert (tmp_path / "f.bin").read_bytes() == b"data" and os.listdir(tmp_path) == ["f.bin"]


_KILLED_WRITER = """
import sys, time
from probe.store.atomic import atomic_file as _atomic_file
with _atomic_file(sys.argv[1]) as f:
    f.write(b"half of it")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
"""


def test_sweep_removes_only_dead_writers_temp_files(tmp_path):
    root = tmp_path / "root"
    s = RunStore(root)
    rid = s.new_run("m", "d", {})
    (root / "probes").mkdir()
    (root / "runs" / rid / "checkpoints").mkdir()
    stale = [root / ".catalog.sqlite.dead0001.tmp", root / "probes" / ".p.npz.dead0002.tmp",
             root / "runs" / rid / ".config.json.dead0003.tmp",
             root / "runs" / rid / "checkpoints" / ".epoch_0001.pt.dead0004.tmp"]
    outside = tmp_path / "outside.txt"
    outside.write_text("foreign")
    (root / "probes" / ".link.tmp").symlink_to(outside)  # a symlink is never followed nor removed
    kept = [root / "probes" / "named.tmp", root / "probes" / ".keep", root / "probes" / ".link.tmp"]
    for p in stale + kept[:2]:
        p.write_bytes(b"partial")
    # a writer killed while writing: its temp file stays, its lock goes with it
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(root / "probes" / "w.npz")],
                              stdout=subprocess.PIPE, cwd=Path(store_mod.__file__).parents[2])
    try:
        assert writer.stdout.readline() == b"writing\n"
        live = next((root / "probes").glob(".w.npz.*.tmp"))
        RunStore(root, readonly=True)  # read-only: sweeps nothing
        assert all(p.exists() for p in stale)
        RunStore(root)
        assert not any(p.exists() for p in stale)
        assert all(p.exists() or p.is_symlink() for p in kept) and outside.read_text() == "foreign"
        assert live.exists()  # its writer is alive
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert live.exists()
    RunStore(root).close()
    assert not live.exists() and not (root / "probes" / "w.npz").exists()


def test_sweep_never_enters_symlinked_folders(tmp_path):
    outside = tmp_path / "outside"
    (outside / "checkpoints").mkdir(parents=True)
    foreign = [outside / ".a.tmp", outside / "checkpoints" / ".b.tmp"]
    for f in foreign:
        f.write_bytes(b"someone else's")
    root = tmp_path / "root"
    RunStore(root).close()
    (root / "runs").mkdir()
    (root / "runs" / "linked").symlink_to(outside)
    (root / "probes").symlink_to(outside)
    RunStore(root).close()
    shutil.rmtree(root / "runs")
    (root / "runs").symlink_to(tmp_path / "outside")
    RunStore(root).close()
    assert all(f.read_bytes() == b"someone else's" for f in foreign)


# ---- 4. rebuilding the catalog -------------------------------------------------------------------


def _trained_root(root: Path) -> dict:
    """A root with runs in several states, probes, and debris the rebuild must skip."""
    import torch

    s = RunStore(root)
    done = s.new_run("tiny", "digits", {"model": "tiny", "data": "digits", "epochs": 2})
    rows = []
    for epoch in (1, 2):
        s.log_epoch(done, epoch, train_loss=1.0 / epoch, test_top1=50.0 + epoch, lr=0.1, grad=2.0)
        rows = s.get_metrics(done)
        s.save_checkpoint(done, epoch, {"model": {"w": torch.full((2,), float(epoch))}, "epoch": epoch,
                                        "best_acc": 50.0 + epoch, "best_epoch": epoch, "metrics": rows})
    half = s.new_run("tiny", "digits", {"model": "tiny", "data": "digits", "epochs": 3})
    s.save_checkpoint(half, 1, {"model": {"w": torch.ones(2)}, "best_acc": 40.0, "best_epoch": 1})
    bad_ck = s.save_checkpoint(half, 2, {"model": {"w": torch.ones(2)}})
    bad_ck.write_bytes(b"not a checkpoint")
    fresh = s.new_run("other", None, {"model": "other", "epochs": 5})
    gone = s.new_run("tiny", "digits", {"model": "tiny"})
    p_arrays = s.add_probe("ntk", run_id=done, checkpoint_epoch=2, params={"n": 4},
                           summary={"cond": 3.5}, arrays={"eig": np.arange(4.0)})
    p_bare = s.add_probe("hessian", model="bare", params={}, summary={"top": 1.0})
    p_orphan = s.add_probe("ntk", run_id=gone, params={}, summary={})
    p_altered = s.add_probe("ntk", model="bare", params={}, summary={}, arrays={"k": np.ones(3)})
    s.close()
    shutil.rmtree(root / "runs" / gone)
    (root / "probes" / f"{p_altered}.npz").write_bytes(b"altered")
    (root / "probes" / "20000101-old-probe.npz").write_bytes(b"before sidecars")
    (root / "runs" / "_bad id").mkdir()
    (root / "runs" / "broken").mkdir()
    (root / "runs" / "broken" / "config.json").write_text("{not json")
    return {"done": done, "half": half, "fresh": fresh, "rows": rows, "p_arrays": p_arrays,
            "p_bare": p_bare, "p_orphan": p_orphan, "p_altered": p_altered}


def test_add_probe_writes_a_sidecar(store):
    rid = store.new_run("m", "d", {})
    pid = store.add_probe("ntk", run_id=rid, checkpoint_epoch=1, params={"n": np.int64(2)},
                          summary={"x": float("nan")}, arrays={"k": np.ones(2)})
    side = json.loads((store.root / "probes" / f"{pid}.json").read_text())
    data = (store.root / "probes" / f"{pid}.npz").read_bytes()
    assert side == {"probe_id": pid, "run_id": rid, "model": "m", "kind": "ntk", "checkpoint_epoch": 1,
                    "created_at": store.get_probe(pid)["created_at"], "status": "finished",
                    "params": {"n": 2}, "summary": {"x": None},
                    "artifact_sha256": hashlib.sha256(data).hexdigest(), "artifact_size": len(data)}


def test_rebuild_catalog_from_run_folders(tmp_path):
    import torch

    root = tmp_path / "root"
    info = _trained_root(root)
    cat = root / "catalog.sqlite"
    cat.write_bytes(b"garbage " * 1000)
    with pytest.raises(StoreError, match="rebuild"):
        RunStore(root)
    report = store_mod.rebuild_catalog(root)
    assert store_mod.rebuild_catalog == RunStore.rebuild_catalog
    assert {k: report[k] for k in ("runs", "checkpoints", "metrics", "probes")} == \
        {"runs": 3, "checkpoints": 3, "metrics": 2, "probes": 3}
    assert Path(report["old_catalog"]).read_bytes() == b"garbage " * 1000
    assert Path(report["old_catalog"]).name.startswith("catalog.sqlite.broken-")
    assert report["catalog"] == str(cat)
    skipped = "\n".join(report["skipped"])
    for needle in ("epoch_0002.pt: does not load", "_bad id': not a valid run id", "runs/broken",
                   info["p_altered"], "20000101-old-probe.npz: no sidecar"):
        assert needle in skipped, needle
    assert len(report["skipped"]) == 5

    s = RunStore(root)
    done, half, fresh = (s.get_run(info[k]) for k in ("done", "half", "fresh"))
    assert done["status"] == "finished" and half["status"] == "interrupted"
    assert fresh["status"] == "interrupted" and fresh["summary"] == {}
    assert done["summary"] == {"best_acc": 52.0, "best_epoch": 2, "epochs_done": 2, "final_acc": 52.0}
    assert half["summary"] == {"best_acc": 40.0, "best_epoch": 1, "epochs_done": 1}
    assert (done["model"], done["data"], fresh["data"]) == ("tiny", "digits", None)
    assert [r["run_id"] for r in s.list_runs()] == [info["fresh"], info["half"], info["done"]]
    assert s.get_metrics(info["done"]) == info["rows"]
    assert [c["epoch"] for c in s.list_checkpoints(info["half"])] == [1]
    torch.testing.assert_close(s.load_checkpoint(info["done"])["model"]["w"], torch.full((2,), 2.0))
    np.testing.assert_array_equal(s.load_probe_arrays(info["p_arrays"])["eig"], np.arange(4.0))
    p = s.get_probe(info["p_arrays"])
    assert (p["run_id"], p["checkpoint_epoch"], p["params"], p["summary"]) == \
        (info["done"], 2, {"n": 4}, {"cond": 3.5})
    assert s.get_probe(info["p_orphan"])["run_id"] is None
    assert s.load_probe_arrays(info["p_bare"]) == {}
    with pytest.raises(UserError, match="unknown probe"):
        s.get_probe(info["p_altered"])
    s.close()
    again = store_mod.rebuild_catalog(root)  # idempotent, and the previous catalog is kept too
    assert again["runs"] == 3 and again["old_catalog"] != report["old_catalog"]
    assert Path(report["old_catalog"]).exists() and Path(again["old_catalog"]).exists()


def test_rebuild_without_a_catalog(tmp_path):
    root = tmp_path / "root"
    info = _trained_root(root)
    for f in root.glob("catalog.sqlite*"):
        f.unlink()
    report = RunStore.rebuild_catalog(str(root))
    assert report["old_catalog"] is None and report["runs"] == 3
    assert RunStore(root).get_run(info["done"])["status"] == "finished"
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# ---- 5. read-only roots ----------------------------------------------------------------------


def _filled_root(root: Path) -> dict:
    import torch

    s = RunStore(root)
    rid = s.new_run("m", "d", {"k": 1})
    s.log_epoch(rid, 1, lr=0.5)
    s.save_checkpoint(rid, 1, {"w": torch.ones(2)})
    pid = s.add_probe("ntk", run_id=rid, params={}, summary={}, arrays={"k": np.arange(3)})
    s.close()
    return {"rid": rid, "pid": pid}


def _read_everything(s: RunStore, ids: dict) -> None:
    rid, pid = ids["rid"], ids["pid"]
    assert [r["run_id"] for r in s.list_runs()] == [rid] and s.get_run("last")["config"] == {"k": 1}
    assert s.get_metrics(rid)[0]["lr"] == 0.5
    assert [c["epoch"] for c in s.list_checkpoints(rid)] == [1]
    assert s.load_checkpoint(rid)["epoch"] == 1
    assert [p["probe_id"] for p in s.list_probes(run_id=rid)] == [pid]
    np.testing.assert_array_equal(s.load_probe_arrays(pid)["k"], np.arange(3))


def test_readonly_store_changes_nothing(tmp_path):
    import torch

    root = tmp_path / "root"
    ids = _filled_root(root)
    stale = root / ".x.tmp"
    stale.write_bytes(b"")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    s = RunStore(root, readonly=True)
    _read_everything(s, ids)
    again = pickle.loads(pickle.dumps(s))
    assert again.readonly and again.get_run(ids["rid"])["run_id"] == ids["rid"]
    for call in (lambda: s.new_run("m", "d", {}), lambda: s.log_epoch(ids["rid"], 2, lr=1.0),
                 lambda: s.update_run(ids["rid"], status="failed"),
                 lambda: s.save_checkpoint(ids["rid"], 2, {"w": torch.ones(1)}),
                 lambda: s.add_probe("ntk", model="m", params={}, summary={}, arrays={"k": np.ones(1)})):
        with pytest.raises(StoreError, match="opened read-only"):
            call()
    s.close()
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    sqlite_files = {root / "catalog.sqlite-wal", root / "catalog.sqlite-shm"}  # SQLite's own, no data
    assert {p: v for p, v in after.items() if p not in sqlite_files} == before  # nothing else created

    empty = RunStore(tmp_path / "nothing_here", readonly=True)
    assert empty.list_runs() == [] and empty.list_probes() == []
    with pytest.raises(UserError, match="no runs yet"):
        empty.get_run("last")
    assert not (tmp_path / "nothing_here").exists()
    (tmp_path / "bare").mkdir()
    assert RunStore(tmp_path / "bare", readonly=True).list_runs() == []
    assert os.listdir(tmp_path / "bare") == []


def test_read_only_mount(tmp_path, mount):
    src, ro = tmp_path / "src", tmp_path / "ro"
    ids = _filled_root(src)
    ro.mkdir()
    mount("--bind", src, ro)
    mount("-o", "remount,bind,ro", ro)
    with pytest.raises(StoreError, match="runs root .* is not writable.*readonly=True") as err:
        RunStore(ro)
    _one_line(err)
    s = RunStore(ro, readonly=True)
    _read_everything(s, ids)
    with pytest.raises(StoreError, match="opened read-only"):
        s.new_run("m", "d", {})
    s.close()


# ---- 6. a full disk --------------------------------------------------------------------------


def test_full_disk_loses_nothing(tmp_path, mount, fill_disk):
    import torch

    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=3m,nr_inodes=200", "tmpfs", disk)
    s = RunStore(disk / "root")
    rid = s.new_run("m", "d", {"k": 1})
    s.save_checkpoint(rid, 1, {"w": torch.ones(10)})
    pid = s.add_probe("ntk", run_id=rid, params={}, summary={}, arrays={"k": np.ones(10)})
    s.update_run(rid, notes="before")
    state = {"w": torch.arange(50_000.0)}

    def check_intact():
        assert [r["run_id"] for r in s.list_runs()] == [rid] and s.get_run(rid)["notes"] == "before"
        assert [c["epoch"] for c in s.list_checkpoints(rid)] == [1] and s.load_checkpoint(rid)["epoch"] == 1
        assert [p["probe_id"] for p in s.list_probes()] == [pid]
        assert os.listdir(disk / "root" / "runs") == [rid]
        assert not [p for p in (disk / "root").rglob("*") if p.name.endswith(".tmp")]

    for inodes in (False, True):
        filler = fill_disk(disk, inodes)
        calls = [lambda: s.save_checkpoint(rid, 2, state),
                 lambda: s.add_probe("ntk", run_id=rid, params={}, summary={},
                                     arrays={"k": np.random.default_rng(0).random(50_000)}),
                 lambda: s.new_run("m", "d", {"k": 2})]
        if not inodes:  # the catalog grows its WAL: blocks, no inode
            calls.append(lambda: s.update_run(rid, notes="x" * 2_000_000))
        for call in calls:
            with pytest.raises(StoreError, match="no space left on device writing .*nothing stored "
                                                 "was lost") as err:
                call()
            _one_line(err)
            check_intact()
        for f in filler:
            f.unlink()
    s.save_checkpoint(rid, 2, state)
    s.add_probe("ntk", run_id=rid, params={}, summary={}, arrays={"k": np.ones(3)})
    s.new_run("m", "d", {"k": 2})
    s.update_run(rid, notes="after")
    assert s.latest_checkpoint(rid) == 2 and len(s.list_probes()) == 2 and len(s.list_runs()) == 2
    s.close()


def test_a_long_lived_reader_sees_what_a_writer_adds(tmp_path):
    writer = RunStore(tmp_path)
    first = writer.new_run("m", "d", {})
    writer.close()
    reader = RunStore(tmp_path, readonly=True)
    assert [r["run_id"] for r in reader.list_runs()] == [first]
    writer = RunStore(tmp_path)
    second = writer.new_run("m", "d", {})
    writer.save_checkpoint(second, 1, {"w": np.ones(1)})
    assert [r["run_id"] for r in reader.list_runs()] == [second, first]
    assert reader.latest_checkpoint(second) == 1


def test_a_reader_opened_before_the_catalog_sees_it_once_written(tmp_path):
    reader = RunStore(tmp_path / "root", readonly=True)
    assert reader.list_runs() == []
    (tmp_path / "root").mkdir()
    sqlite3.connect(tmp_path / "root" / "catalog.sqlite").close()  # a writer's first instant: no tables
    assert reader.list_runs() == []
    writer = RunStore(tmp_path / "root")
    rid = writer.new_run("m", "d", {})
    assert [r["run_id"] for r in reader.list_runs()] == [rid]
