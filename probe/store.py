"""The run store: one SQLite catalog plus files under a runs root.

Layout of a runs root (``--runs DIR``, else ``$PROBE_RUNS``, else ``./runs``)::

    <root>/catalog.sqlite                       the catalog (WAL mode; -wal/-shm files beside it)
    <root>/runs/<run_id>/config.json            resolved training config, exactly get_run()["config"]
    <root>/runs/<run_id>/checkpoints/epoch_0007.pt   torch.save'd dict, loaded with weights_only=True
    <root>/probes/<probe_id>.npz                arrays of one probe result (runs or bare models alike)

Probe artifacts live in one flat ``probes/`` folder whether or not the probe belongs to a run, because
a probe on an untrained model (``--model NAME``) has no run folder; the catalog row links it to its run.

The catalog has five tables: ``schema_version`` (one row), ``runs``, ``metrics`` (one row per run and
epoch), ``checkpoints`` (one row per run and epoch: path relative to the root, sha256, size) and
``probes``. Paths stored in the catalog are relative to the root (POSIX separators), so a root can be
moved or copied as a whole; the dicts this module returns carry absolute paths.

Concurrency: every write is one short ``BEGIN IMMEDIATE`` transaction, the catalog is in WAL mode with
a 30 s busy timeout, so several processes may train and probe into the same root at the same time.
Connections are per process and per thread, opened lazily and re-opened after ``fork``.

Files are written atomically (temp file in the same folder, fsync, ``os.replace``, fsync of the folder):
a reader sees the old file or the new one, never half of one. A checkpoint row is recorded only after
its file is in place, with its sha256 and size, and both are checked on every load.

JSON convention: dicts stored in the catalog (config, summary, params, extra metrics) go through
:func:`to_jsonable`: numpy / torch scalars and arrays become Python numbers and lists, and non-finite
floats (NaN, +-inf) become ``None``; the stored text is strict JSON. Metric columns follow the same
rule (a NaN loss is stored as NULL and read back as ``None``).

Run references: functions that only read accept a reference (the full run id, a unique prefix of it,
or ``"last"`` / ``"latest"`` for the most recently created run); functions that write need the full id.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import hashlib
import io
import json
import math
import operator
import os
import pickle
import re
import secrets
import socket
import sqlite3
import threading
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, Iterator, Mapping

from probe.errors import StoreError, UserError

__all__ = [
    "RunStore",
    "resolve_runs_root",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_torch_save",
    "atomic_savez",
    "to_jsonable",
    "SCHEMA_VERSION",
    "STATUSES",
    "METRIC_COLUMNS",
]

#: Version of the catalog layout this code writes; a newer catalog is refused.
SCHEMA_VERSION = 1
#: Allowed values of a run's (and a probe's) ``status``.
STATUSES = ("running", "finished", "failed", "interrupted")
#: Metrics with their own column; any other keyword of :meth:`RunStore.log_epoch` goes to ``extra_json``.
METRIC_COLUMNS = (
    "train_loss", "train_top1", "train_top5",
    "test_loss", "test_top1", "test_top5",
    "lr", "epoch_time_s",
)
CATALOG_NAME = "catalog.sqlite"
BUSY_TIMEOUT_S = 30.0

# Each entry brings the catalog from version i to i + 1 (list index i).
_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE runs (
            run_id       TEXT PRIMARY KEY,
            model        TEXT NOT NULL,
            data         TEXT,
            created_at   TEXT NOT NULL,
            updated_at   TEXT NOT NULL,
            status       TEXT NOT NULL
                         CHECK (status IN ('running', 'finished', 'failed', 'interrupted')),
            config_json  TEXT NOT NULL DEFAULT '{}',
            summary_json TEXT NOT NULL DEFAULT '{}',
            error        TEXT,
            host         TEXT,
            parent_run   TEXT,
            notes        TEXT
        )""",
        "CREATE INDEX runs_by_created ON runs (created_at)",
        """CREATE TABLE metrics (
            run_id       TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
            epoch        INTEGER NOT NULL,
            train_loss   REAL, train_top1 REAL, train_top5 REAL,
            test_loss    REAL, test_top1  REAL, test_top5  REAL,
            lr           REAL,
            epoch_time_s REAL,
            extra_json   TEXT NOT NULL DEFAULT '{}',
            logged_at    TEXT NOT NULL,
            PRIMARY KEY (run_id, epoch)
        ) WITHOUT ROWID""",
        """CREATE TABLE checkpoints (
            run_id     TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
            epoch      INTEGER NOT NULL,
            path       TEXT NOT NULL,
            sha256     TEXT NOT NULL,
            size       INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (run_id, epoch)
        ) WITHOUT ROWID""",
        """CREATE TABLE probes (
            probe_id         TEXT PRIMARY KEY,
            run_id           TEXT REFERENCES runs (run_id) ON DELETE CASCADE,
            model            TEXT NOT NULL,
            kind             TEXT NOT NULL,
            checkpoint_epoch INTEGER,
            created_at       TEXT NOT NULL,
            status           TEXT NOT NULL,
            params_json      TEXT NOT NULL DEFAULT '{}',
            summary_json     TEXT NOT NULL DEFAULT '{}',
            artifact         TEXT,
            artifact_sha256  TEXT,
            artifact_size    INTEGER
        )""",
        "CREATE INDEX probes_by_run ON probes (run_id, kind)",
        "CREATE INDEX probes_by_kind ON probes (kind, created_at)",
    ],
]
assert len(_MIGRATIONS) == SCHEMA_VERSION

# Connections inherited through fork are kept alive here and never used or closed: closing them in
# the child would drop the parent's POSIX locks on the catalog.
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []


# --------------------------------------------------------------------------------------------------
# small helpers


def resolve_runs_root(path: str | os.PathLike | None = None) -> Path:
    """The runs root: ``path`` if given, else ``$PROBE_RUNS`` if set and non-empty, else ``./runs``.

    Returns an absolute path (``~`` expanded); nothing is created.
    """
    chosen = path if path not in (None, "") else (os.environ.get("PROBE_RUNS") or "runs")
    return Path(chosen).expanduser().absolute()


def to_jsonable(obj: Any) -> Any:
    """Turn ``obj`` into plain JSON types (dict with str keys, list, str, int, float, bool, None).

    numpy / torch scalars and arrays become numbers and (nested) lists, dataclasses become dicts,
    enums their value, paths and torch devices / dtypes strings. Non-finite floats become ``None``.
    Anything else raises ``TypeError``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, PurePath):
        return str(obj)
    module = type(obj).__module__ or ""
    if module.startswith(("numpy", "torch")):
        if hasattr(obj, "detach"):  # torch.Tensor
            obj = obj.detach().cpu()
        if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
            return to_jsonable(obj.tolist())
        if module.startswith("torch"):  # torch.device, torch.dtype
            return str(obj)
    raise TypeError(f"cannot store a {type(obj).__name__} as JSON: {obj!r}")


def _dumps(obj: Any) -> str:
    return json.dumps(to_jsonable(obj if obj is not None else {}), allow_nan=False)


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else {}


def _now() -> str:
    """UTC time stamp, ISO 8601 with microseconds; sorts as text."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _slug(text: str, fallback: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.]+", "_", str(text)).strip("._")[:40]
    return slug or fallback


def _metric_value(name: str, value: Any) -> float | None:
    value = to_jsonable(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} must be a number, got {value!r}")
    return float(value)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# atomic file writes


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[io.BufferedWriter]:
    """Yield a binary file; on clean exit it replaces ``path`` atomically, on error it vanishes."""
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    while True:  # O_EXCL on a random name; mode 0o666 so the umask applies as for a plain open()
        tmp = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    Parent folders are created. On any error the previous file, if any, is left untouched and no
    temporary file remains. Returns ``Path(path)``.
    """
    with _atomic_file(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically; see :func:`atomic_write_bytes`.

    Keep ``obj`` to tensors and plain Python containers / numbers / strings, so that it loads with
    ``torch.load(..., weights_only=True)``.
    """
    import torch

    with _atomic_file(path) as f:
        torch.save(obj, f)
    return Path(path)


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> Path:
    """``numpy.savez_compressed(path, **arrays)`` atomically; ``path`` is used exactly as given.

    Object arrays are refused (they would need pickle to load back).
    """
    import numpy as np

    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in arrays.items():
        if v.dtype.hasobject:
            raise TypeError(f"array {k!r} has dtype object; store numbers or strings only")
    with _atomic_file(path) as f:
        np.savez_compressed(f, **arrays)
    return Path(path)


# --------------------------------------------------------------------------------------------------
# the store


def _run_id_for(model: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stamp}-{_slug(model, 'model')}-{secrets.token_hex(3)}"


def _probe_id_for(kind: str, model: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stamp}-{_slug(kind, 'probe')}-{_slug(model, 'model')}-{secrets.token_hex(4)}"


def _is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class RunStore:
    """Runs, per-epoch metrics, checkpoints and probe results under one runs root.

    ``RunStore(root)`` checks at once that the root is a writable folder (creating it if needed)
    and that ``catalog.sqlite`` is an SQLite catalog this code understands, creating or migrating
    it; otherwise it raises :class:`~probe.errors.StoreError`. ``root=None`` means
    :func:`resolve_runs_root` (``$PROBE_RUNS`` or ``./runs``).

    The object can be pickled (e.g. passed to a spawned process); the copy re-opens the catalog.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = resolve_runs_root(root)
        self.catalog_path = self.root / CATALOG_NAME
        self._local = threading.local()
        self._check_root()
        self._open_catalog()

    def __reduce__(self):
        return (type(self), (str(self.root),))

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- opening -------------------------------------------------------------------------------

    def _check_root(self) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise StoreError(f"runs root {root} exists but is not a folder; pick another --runs DIR")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create runs root {root} ({e.strerror or e}); "
                             "pick a writable --runs DIR") from None
        try:  # a real write: os.access is blind to read-only mounts and ACLs
            probe = root / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"runs root {root} is not writable ({e.strerror or e}); "
                             "pick a writable --runs DIR") from None
        cat = self.catalog_path
        if cat.exists() and not cat.is_file():
            raise StoreError(f"catalog {cat} is not a file; move it away or pick another --runs DIR")
        if cat.exists() and not os.access(cat, os.R_OK | os.W_OK):
            raise StoreError(f"catalog {cat} is not readable and writable; fix its permissions "
                             "or pick another --runs DIR")

    def _open_catalog(self) -> None:
        """Validate, configure and migrate the catalog (retrying while another process holds it)."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                con = self._connection()
                self._check_version(con, self._read_version(con))
                if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    if mode.lower() != "wal":
                        raise StoreError(f"catalog {self.catalog_path} cannot use WAL mode "
                                         f"(got {mode}); put the runs root on a local disk")
                self._migrate(con)
                return
            except sqlite3.OperationalError as e:
                if _is_busy(e) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise self._store_error(e) from None
            except sqlite3.DatabaseError as e:
                self.close()
                raise StoreError(f"catalog {self.catalog_path} is not an SQLite catalog ({e}); "
                                 "move it away or pick another --runs DIR") from None

    def _read_version(self, con: sqlite3.Connection) -> int:
        has_table = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                "AND name = 'schema_version'").fetchone()
        if not has_table:
            return 0
        row = con.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def _check_version(self, con: sqlite3.Connection, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(f"catalog {self.catalog_path} has schema version {version} but this "
                             f"landscape-probe knows up to {SCHEMA_VERSION}; upgrade landscape-probe")

    def _migrate(self, con: sqlite3.Connection) -> None:
        if self._read_version(con) == SCHEMA_VERSION:
            return
        with self._write() as con:
            version = self._read_version(con)  # re-read under the write lock: another process
            self._check_version(con, version)  # may have migrated meanwhile
            if version == SCHEMA_VERSION:
                return
            if version == 0:
                con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    con.execute(statement)
            con.execute("DELETE FROM schema_version")
            con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def _connection(self) -> sqlite3.Connection:
        """This process's and thread's connection, opened on first use and after a fork."""
        local = self._local
        con = getattr(local, "con", None)
        if con is not None and local.pid == os.getpid():
            return con
        if con is not None:
            _INHERITED_CONNECTIONS.append(con)
        con = sqlite3.connect(self.catalog_path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                              check_same_thread=False)
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("PRAGMA synchronous = NORMAL")
        local.con, local.pid = con, os.getpid()
        return con

    def close(self) -> None:
        """Close this thread's catalog connection (it re-opens on the next call)."""
        con = getattr(self._local, "con", None)
        if con is not None and self._local.pid == os.getpid():
            con.close()
        self._local.con = None

    def _store_error(self, e: sqlite3.Error) -> StoreError:
        if _is_busy(e):
            return StoreError(f"catalog {self.catalog_path} stayed locked by another process for "
                              f"over {BUSY_TIMEOUT_S:.0f} s; retry when it has finished")
        return StoreError(f"catalog {self.catalog_path} cannot be used ({e}); "
                          "check the disk and permissions of the runs root")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, taking the write lock up front (``BEGIN IMMEDIATE``)."""
        con = self._connection()
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._store_error(e) from None
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise

    def _read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                raise self._store_error(e) from None
            raise

    # ---- runs ----------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        """Folder of a run (``<root>/runs/<run_id>``); ``run_id`` must be a full id."""
        return self.root / "runs" / run_id

    def new_run(self, model: str, data: str | None, config: Mapping[str, Any] | None = None, *,
                parent_run: str | None = None, notes: str | None = None) -> str:
        """Register a new run with status ``running`` and return its id.

        The id reads ``YYYYmmdd-HHMMSS-<model>-<6 hex>`` (UTC time); it is unique across processes
        (its folder is created exclusively). ``config`` is stored in the catalog and written to
        ``runs/<run_id>/config.json``.
        """
        config_json = _dumps(config)
        (self.root / "runs").mkdir(exist_ok=True)
        while True:
            run_id = _run_id_for(model)
            try:
                self.run_dir(run_id).mkdir()
                break
            except FileExistsError:
                continue
        config_file = self.run_dir(run_id) / "config.json"
        try:
            atomic_write_text(config_file, json.dumps(json.loads(config_json), indent=2) + "\n")
            now = _now()
            with self._write() as con:
                con.execute(
                    "INSERT INTO runs (run_id, model, data, created_at, updated_at, status,"
                    " config_json, summary_json, host, parent_run, notes)"
                    " VALUES (?, ?, ?, ?, ?, 'running', ?, '{}', ?, ?, ?)",
                    (run_id, str(model), data, now, now, config_json, socket.gethostname(),
                     parent_run, notes))
        except BaseException:  # leave no folder without a catalog row
            with contextlib.suppress(OSError):
                config_file.unlink(missing_ok=True)
                self.run_dir(run_id).rmdir()
            raise
        return run_id

    def update_run(self, run_id: str, *, status: str | None = None,
                   summary: Mapping[str, Any] | None = None, error: str | None = None,
                   notes: str | None = None) -> None:
        """Change a run's status, merge ``summary`` into its summary (key by key), set its error
        text or notes. Arguments left as ``None`` are not changed."""
        if status is not None and status not in STATUSES:
            raise UserError(f"unknown run status {status!r}; use one of {', '.join(STATUSES)}")
        with self._write() as con:
            row = con.execute("SELECT summary_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise self._unknown_run(run_id)
            merged = _loads(row["summary_json"])
            merged.update(to_jsonable(dict(summary or {})))
            con.execute(
                "UPDATE runs SET status = COALESCE(?, status), summary_json = ?,"
                " error = COALESCE(?, error), notes = COALESCE(?, notes), updated_at = ?"
                " WHERE run_id = ?",
                (status, _dumps(merged), error, notes, _now(), run_id))

    def resolve_run(self, ref: str) -> str:
        """Full run id for a reference: a full id, a unique prefix, or ``"last"`` / ``"latest"``."""
        ref = str(ref).strip()
        if ref.lower() in ("last", "latest"):
            rows = self._read("SELECT run_id FROM runs ORDER BY created_at DESC, rowid DESC LIMIT 1")
            if not rows:
                raise UserError(f"no runs yet in {self.root}; train one first (probe train ...)")
            return rows[0]["run_id"]
        if self._read("SELECT 1 FROM runs WHERE run_id = ?", (ref,)):
            return ref
        if ref:
            rows = self._read("SELECT run_id FROM runs WHERE substr(run_id, 1, ?) = ?"
                              " ORDER BY created_at", (len(ref), ref))
            if len(rows) == 1:
                return rows[0]["run_id"]
            if len(rows) > 1:
                shown = ", ".join(r["run_id"] for r in rows[:8])
                raise UserError(f"run prefix {ref!r} matches {len(rows)} runs ({shown}); "
                                "give more characters")
        raise self._unknown_run(ref)

    def _unknown_run(self, ref: str) -> UserError:
        ids = [r["run_id"] for r in self._read("SELECT run_id FROM runs ORDER BY created_at")]
        if not ids:
            return UserError(f"unknown run {ref!r}: no runs yet in {self.root}")
        near = [i for i in ids if ref and ref in i][-5:]
        near += [i for i in difflib.get_close_matches(ref, ids, n=5, cutoff=0.6) if i not in near]
        hint = f"close matches: {', '.join(near)}" if near else "list them with `probe runs`"
        return UserError(f"unknown run {ref!r} in {self.root}; {hint}")

    def _run_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        out = {k: row[k] for k in ("run_id", "model", "data", "created_at", "updated_at", "status",
                                   "error", "host", "parent_run", "notes")}
        out["config"] = _loads(row["config_json"])
        out["summary"] = _loads(row["summary_json"])
        out["path"] = str(self.run_dir(row["run_id"]))
        return out

    def get_run(self, ref: str) -> dict[str, Any]:
        """One run as a dict: ``run_id, model, data, created_at, updated_at, status, error, host,
        parent_run, notes, config, summary, path``. ``ref`` as in :meth:`resolve_run`; an unknown
        reference raises :class:`~probe.errors.UserError` listing close matches."""
        run_id = self.resolve_run(ref)
        return self._run_dict(self._read("SELECT * FROM runs WHERE run_id = ?", (run_id,))[0])

    def list_runs(self, model: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """All runs (newest first), optionally only those of one model name and / or status."""
        sql, args = "SELECT * FROM runs WHERE 1", []
        if model is not None:
            sql += " AND model = ?"
            args.append(model)
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        rows = self._read(sql + " ORDER BY created_at DESC, rowid DESC", tuple(args))
        return [self._run_dict(r) for r in rows]

    # ---- metrics -------------------------------------------------------------------------------

    def log_epoch(self, run_id: str, epoch: int, **metrics: Any) -> None:
        """Record one epoch's metrics. Names in :data:`METRIC_COLUMNS` get their own column, any
        other name is kept in ``extra_json``. Logging an epoch again replaces that row (a resumed run
        stays consistent)."""
        epoch = operator.index(epoch)
        cols = {name: _metric_value(name, metrics.pop(name, None)) for name in METRIC_COLUMNS}
        extra = _dumps(metrics)
        now = _now()
        try:
            with self._write() as con:
                con.execute(
                    f"INSERT OR REPLACE INTO metrics (run_id, epoch, {', '.join(METRIC_COLUMNS)},"
                    f" extra_json, logged_at) VALUES (?, ?, {', '.join('?' * len(METRIC_COLUMNS))},"
                    " ?, ?)",
                    (run_id, epoch, *cols.values(), extra, now))
                con.execute("UPDATE runs SET updated_at = ? WHERE run_id = ?", (now, run_id))
        except sqlite3.IntegrityError:
            raise self._unknown_run(run_id) from None

    def get_metrics(self, ref: str) -> list[dict[str, Any]]:
        """Per-epoch metrics of a run, ordered by epoch: one flat dict per epoch with ``epoch``, every
        column of :data:`METRIC_COLUMNS` (``None`` where not logged) and the extra metrics."""
        run_id = self.resolve_run(ref)
        rows = self._read("SELECT * FROM metrics WHERE run_id = ? ORDER BY epoch", (run_id,))
        out = []
        for r in rows:
            d = {"epoch": r["epoch"], **{c: r[c] for c in METRIC_COLUMNS}}
            d.update(_loads(r["extra_json"]))
            out.append(d)
        return out

    # ---- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, run_id: str, epoch: int, state: Mapping[str, Any]) -> Path:
        """Save ``state`` as ``runs/<run_id>/checkpoints/epoch_XXXX.pt`` and record it.

        The file is written atomically, then its sha256 and size go into the catalog. ``run_id``,
        ``epoch`` and ``config`` (the run's config) are added to the saved dict unless ``state``
        already has them, so a checkpoint describes the model it holds. ``state`` must hold only
        tensors and plain Python values (it is loaded back with ``weights_only=True``).
        Returns the absolute path of the file.
        """
        import torch

        epoch = operator.index(epoch)
        rows = self._read("SELECT config_json FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise self._unknown_run(run_id)
        state = dict(state)
        state.setdefault("run_id", run_id)
        state.setdefault("epoch", epoch)
        state.setdefault("config", _loads(rows[0]["config_json"]))
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        rel = PurePath("runs", run_id, "checkpoints", f"epoch_{epoch:04d}.pt")
        path = atomic_write_bytes(self.root / rel, data)
        with self._write() as con:
            con.execute("INSERT OR REPLACE INTO checkpoints (run_id, epoch, path, sha256, size,"
                        " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (run_id, epoch, rel.as_posix(), _sha256(data), len(data), _now()))
        return path

    def list_checkpoints(self, ref: str) -> list[dict[str, Any]]:
        """Checkpoints of a run ordered by epoch: dicts ``epoch, path (absolute), sha256, size,
        created_at``."""
        run_id = self.resolve_run(ref)
        rows = self._read("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY epoch", (run_id,))
        return [{"epoch": r["epoch"], "path": str(self.root / r["path"]), "sha256": r["sha256"],
                 "size": r["size"], "created_at": r["created_at"]} for r in rows]

    def latest_checkpoint(self, ref: str) -> int | None:
        """Highest checkpointed epoch of a run, or ``None`` when it has none."""
        run_id = self.resolve_run(ref)
        row = self._read("SELECT MAX(epoch) AS e FROM checkpoints WHERE run_id = ?", (run_id,))[0]
        return row["e"]

    def load_checkpoint(self, ref: str, epoch: int | str | None = None,
                        map_location: Any = "cpu") -> dict[str, Any]:
        """Load a run's checkpoint (``epoch`` ``None`` / ``"last"`` = the latest one).

        Always ``torch.load(..., weights_only=True)`` on bytes whose size and sha256 match the
        catalog. Raises :class:`~probe.errors.StoreError` for a missing, truncated or altered file
        and for a file whose pickle asks for anything beyond tensors and plain values (nothing in
        it is run), :class:`~probe.errors.UserError` for an epoch that was not saved.
        """
        import torch

        run_id = self.resolve_run(ref)
        if epoch is None or (isinstance(epoch, str) and epoch.lower() in ("last", "latest")):
            epoch = self.latest_checkpoint(run_id)
            if epoch is None:
                raise UserError(f"run {run_id} has no checkpoints")
        try:
            epoch = int(epoch)
        except (TypeError, ValueError):
            raise UserError(f"checkpoint epoch must be an integer or 'last', got {epoch!r}") from None
        rows = self._read("SELECT * FROM checkpoints WHERE run_id = ? AND epoch = ?", (run_id, epoch))
        if not rows:
            have = [c["epoch"] for c in self.list_checkpoints(run_id)]
            raise UserError(f"run {run_id} has no checkpoint for epoch {epoch}; "
                            f"saved epochs: {have or 'none'}")
        rec = rows[0]
        path = self.root / rec["path"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"checkpoint {path} is missing although the catalog lists it") from None
        except OSError as e:
            raise StoreError(f"checkpoint {path} cannot be read ({e.strerror or e})") from None
        if len(data) != rec["size"] or _sha256(data) != rec["sha256"]:
            raise StoreError(f"checkpoint {path} is corrupt or truncated ({len(data)} bytes, sha256 "
                             f"{_sha256(data)[:12]}..., catalog says {rec['size']} bytes, "
                             f"{rec['sha256'][:12]}...); re-save it or train again")
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            raise StoreError(f"checkpoint {path} was refused: it is not a plain tensor checkpoint "
                             "(its pickle asks for code or objects; nothing was run)") from None
        except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError) as e:
            raise StoreError(f"checkpoint {path} is corrupt or truncated "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    # ---- probes --------------------------------------------------------------------------------

    def add_probe(self, kind: str, *, model: str | None = None, run_id: str | None = None,
                  checkpoint_epoch: int | None = None, params: Mapping[str, Any] | None = None,
                  summary: Mapping[str, Any] | None = None,
                  arrays: Mapping[str, Any] | None = None, status: str = "finished") -> str:
        """Record one probe result and return its id (``YYYYmmdd-HHMMSS-<kind>-<model>-<8 hex>``).

        ``arrays`` (name -> numpy array) are saved atomically to ``probes/<probe_id>.npz`` before
        the row is written; ``params`` and ``summary`` go into the catalog as JSON. ``run_id`` is
        ``None`` for a probe on a bare model; with a run, ``model`` defaults to the run's model.
        """
        if status not in STATUSES:
            raise UserError(f"unknown probe status {status!r}; use one of {', '.join(STATUSES)}")
        if run_id is not None:
            rows = self._read("SELECT model FROM runs WHERE run_id = ?", (run_id,))
            if not rows:
                raise self._unknown_run(run_id)
            model = model if model is not None else rows[0]["model"]
        if model is None:
            raise UserError("a probe needs a model name or a run")
        params_json, summary_json = _dumps(params), _dumps(summary)
        probe_id = _probe_id_for(kind, model)
        artifact = sha = size = None
        if arrays:
            rel = PurePath("probes", f"{probe_id}.npz")
            atomic_savez(self.root / rel, **arrays)
            data = (self.root / rel).read_bytes()
            artifact, sha, size = rel.as_posix(), _sha256(data), len(data)
        try:
            with self._write() as con:
                con.execute(
                    "INSERT INTO probes (probe_id, run_id, model, kind, checkpoint_epoch, created_at,"
                    " status, params_json, summary_json, artifact, artifact_sha256, artifact_size)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (probe_id, run_id, str(model), str(kind),
                     None if checkpoint_epoch is None else operator.index(checkpoint_epoch),
                     _now(), status, params_json, summary_json, artifact, sha, size))
        except sqlite3.IntegrityError:  # the run vanished meanwhile
            if artifact:
                with contextlib.suppress(OSError):
                    (self.root / artifact).unlink()
            raise self._unknown_run(str(run_id)) from None
        return probe_id

    def _probe_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        out = {k: row[k] for k in ("probe_id", "run_id", "model", "kind", "checkpoint_epoch",
                                   "created_at", "status")}
        out["params"] = _loads(row["params_json"])
        out["summary"] = _loads(row["summary_json"])
        out["artifact"] = str(self.root / row["artifact"]) if row["artifact"] else None
        return out

    def get_probe(self, probe_id: str) -> dict[str, Any]:
        """One probe row: ``probe_id, run_id, model, kind, checkpoint_epoch, created_at, status,
        params, summary, artifact`` (absolute path or ``None``)."""
        rows = self._read("SELECT * FROM probes WHERE probe_id = ?", (probe_id,))
        if not rows:
            ids = [r["probe_id"] for r in self._read("SELECT probe_id FROM probes")]
            near = difflib.get_close_matches(probe_id, ids, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(near)}" if near else ""
            raise UserError(f"unknown probe {probe_id!r} in {self.root}{hint}")
        return self._probe_dict(rows[0])

    def list_probes(self, run_id: str | None = None, kind: str | None = None,
                    model: str | None = None) -> list[dict[str, Any]]:
        """Probe rows (oldest first), optionally of one run (a reference, see :meth:`resolve_run`),
        kind and / or model name."""
        sql, args = "SELECT * FROM probes WHERE 1", []
        if run_id is not None:
            sql += " AND run_id = ?"
            args.append(self.resolve_run(run_id))
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        if model is not None:
            sql += " AND model = ?"
            args.append(model)
        rows = self._read(sql + " ORDER BY created_at, rowid", tuple(args))
        return [self._probe_dict(r) for r in rows]

    def load_probe_arrays(self, probe_id: str) -> dict[str, Any]:
        """The arrays saved with a probe (an empty dict when it saved none).

        Loaded with ``allow_pickle=False`` after checking size and sha256 against the catalog;
        a missing, truncated or altered file raises :class:`~probe.errors.StoreError`.
        """
        import numpy as np

        rec = self._read("SELECT artifact, artifact_sha256, artifact_size FROM probes"
                         " WHERE probe_id = ?", (probe_id,))
        if not rec:
            self.get_probe(probe_id)  # raises the UserError with close matches
        rec = rec[0]
        if not rec["artifact"]:
            return {}
        path = self.root / rec["artifact"]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StoreError(f"probe artifact {path} cannot be read ({e.strerror or e})") from None
        if len(data) != rec["artifact_size"] or _sha256(data) != rec["artifact_sha256"]:
            raise StoreError(f"probe artifact {path} is corrupt or truncated ({len(data)} bytes, "
                             f"catalog says {rec['artifact_size']}); run the probe again")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise StoreError(f"probe artifact {path} is corrupt or truncated "
                             f"({type(e).__name__}); run the probe again") from None
