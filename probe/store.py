"""The run store: one SQLite catalog plus files under a runs root.

Layout of a runs root (``--runs DIR``, else ``$PROBE_RUNS``, else ``./runs``)::

    <root>/catalog.sqlite                       the catalog (WAL mode; -wal/-shm files beside it)
    <root>/runs/<run_id>/config.json            resolved training config, exactly get_run()["config"]
    <root>/runs/<run_id>/checkpoints/epoch_0007.pt   torch.save'd dict, loaded with weights_only=True
    <root>/probes/<probe_id>.npz                arrays of one probe result (runs or bare models alike)
    <root>/probes/<probe_id>.json               sidecar: the probe's catalog row (params, summary, ...)
    <root>/findings/<finding_id>.json           one finding of an experiment (its catalog row, payload included)

Probe artifacts live in one flat ``probes/`` folder whether or not the probe belongs to a run, because
a probe on an untrained model (``--model NAME``) has no run folder; the catalog row links it to its run.

The catalog has six tables: ``schema_version`` (one row), ``runs``, ``metrics`` (one row per run and
epoch), ``checkpoints`` (one row per run and epoch: path relative to the root, sha256, size),
``probes`` and ``findings`` (an experiment's numbers by name, a JSON object with a ``kind``: data
for :mod:`probe.figures.findings`, never markup or code; a newer finding of the same experiment and
name supersedes the older ones, which are kept). The files are the source of truth for what exists:
:meth:`RunStore.rebuild_catalog` rebuilds a lost or damaged catalog from the run folders
(config.json, checkpoints, whose dicts carry the summary and per-epoch ``metrics``), the probe
sidecars and the finding files, keeping the old catalog aside.

Threat model: a runs root may come from someone else, so everything in it is data. Run and probe ids
must match ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` without ``..``; file paths are derived from the ids,
never taken from the catalog (a stored path that differs is refused); every file is resolved before
it is read or written and must stay inside the real root (symlinks leading out are refused); a
foreign SQLite file is never altered; damaged rows, files and catalogs raise
:class:`~probe.errors.StoreError` naming the file (listings skip bad rows and report them in
``RunStore.skipped``), never a traceback or a wrong answer. Checkpoints load with
``weights_only=True`` and probe arrays with ``allow_pickle=False``, after their sha256 and size match.

Concurrency: every write is one short ``BEGIN IMMEDIATE`` transaction, the catalog is in WAL mode with
a 30 s busy timeout, so several processes may train and probe into the same root at the same time.
Connections are per process and per thread, opened lazily and re-opened after ``fork``.
``RunStore(root, readonly=True)`` reads a root it may not write (a read-only mount, someone else's
folder): it creates, migrates and cleans up nothing (SQLite may add the catalog's -wal / -shm
files where the folder is writable); on a folder it cannot write, with no -wal / -shm there, it
reads the file as it is (SQLite ``immutable=1``).

Files are written atomically (temp file ``.<name>.<hex>.tmp`` in the same folder, held under an
exclusive ``flock`` while written, fsync, ``os.replace``, fsync of the folder): a reader sees the old
file or the new one, never half of one. Opening a store read-write removes the temp files of writers
that died (their lock is free). A checkpoint row is recorded only after its file is in place, with
its sha256 and size, and both are checked on every load. A full disk raises a StoreError and leaves
the previous files and the catalog as they were.

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
import functools
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
import urllib.parse
import zipfile
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, Callable, Iterator, Mapping

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: temp files are not locked, none is swept
    fcntl = None

from probe._atomic import (_NO_SPACE, _disk_errors, _no_space, _savez, _temp_file, atomic_savez, atomic_torch_save, atomic_write_bytes, atomic_write_text)
from probe.errors import DiskFullError, StoreError, UserError

__all__ = [
    "RunStore",
    "rebuild_catalog",
    "resolve_runs_root",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_torch_save",
    "atomic_savez",
    "to_jsonable",
    "SCHEMA_VERSION",
    "FINDING_MAX_BYTES",
    "STATUSES",
    "METRIC_COLUMNS",
]

#: Version of the catalog layout this code writes; a newer catalog is refused.
SCHEMA_VERSION = 2
#: Allowed values of a run's (and a probe's) ``status``.
STATUSES = ("running", "finished", "failed", "interrupted")
#: Metrics with their own column; any other keyword of :meth:`RunStore.log_epoch` goes to ``extra_json``.
METRIC_COLUMNS = (
    "train_loss", "train_top1", "train_top5",
    "test_loss", "test_top1", "test_top5",
    "lr", "epoch_time_s",
)
CATALOG_NAME = "catalog.sqlite"
#: A file of zeros kept in the root so that a run's status can be written on a full disk.
RESERVE_NAME = ".space-reserve"
RESERVE_BYTES = 512 * 1024
BUSY_TIMEOUT_S = 30.0
#: Largest payload of one finding (its JSON text, in bytes).
FINDING_MAX_BYTES = 16 * 1024 * 1024
#: Longest experiment or finding name.
FINDING_NAME_MAX = 200

_SCHEMA_VERSION_TABLE = "CREATE TABLE schema_version (version INTEGER NOT NULL)"
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
    [
        """CREATE TABLE findings (
            finding_id   TEXT PRIMARY KEY,
            experiment   TEXT NOT NULL,
            name         TEXT NOT NULL,
            created_at   TEXT NOT NULL,
            payload_json TEXT NOT NULL
        )""",
        "CREATE INDEX findings_by_name ON findings (experiment, name, created_at)",
    ],
]
assert len(_MIGRATIONS) == SCHEMA_VERSION

_INSERT_RUN = ("INSERT INTO runs (run_id, model, data, created_at, updated_at, status, config_json,"
               " summary_json, host, parent_run, notes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_METRICS = (f"INSERT OR REPLACE INTO metrics (run_id, epoch, {', '.join(METRIC_COLUMNS)},"
                   f" extra_json, logged_at) VALUES (?, ?, {', '.join('?' * len(METRIC_COLUMNS))}, ?, ?)")
_INSERT_CHECKPOINT = ("INSERT OR REPLACE INTO checkpoints (run_id, epoch, path, sha256, size, created_at)"
                      " VALUES (?, ?, ?, ?, ?, ?)")
_INSERT_PROBE = ("INSERT INTO probes (probe_id, run_id, model, kind, checkpoint_epoch, created_at, status,"
                 " params_json, summary_json, artifact, artifact_sha256, artifact_size)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_FINDING = ("INSERT INTO findings (finding_id, experiment, name, created_at, payload_json)"
                   " VALUES (?, ?, ?, ?, ?)")

_REBUILD = ("rebuild it from the run folders with `probe runs --rebuild-catalog` or "
            "RunStore.rebuild_catalog(root) (the old catalog is kept aside)")

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


_BAD_JSON = object()  # what _json() returns for text that is not JSON


def _json(text: Any) -> Any:
    """Parsed JSON text from the catalog or a file; ``_BAD_JSON`` when it is not JSON."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return _BAD_JSON
    if not isinstance(text, str):
        return _BAD_JSON
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _BAD_JSON


def _show(value: Any) -> str:
    """A value for a one-line message (hostile text is escaped and cut)."""
    if value is _BAD_JSON:
        return "not valid JSON"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _why(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for a one-line error."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _where(rel: str) -> str:
    """A relative path for a message: as it is when plain, else quoted and escaped."""
    return rel if rel.isascii() and rel.isprintable() and " " not in rel else _show(rel)


def _now() -> str:
    """UTC time stamp, ISO 8601 with microseconds; sorts as text."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _mtime_stamp(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="microseconds")


def _slug(text: str, fallback: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.]+", "_", str(text))
    slug = re.sub(r"\.{2,}", ".", slug).strip("._")[:40].strip("._")
    return slug or fallback


def _metric_value(name: str, value: Any) -> float | None:
    value = to_jsonable(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} must be a number, got {value!r}")
    return float(value)


def _metric_values(metrics: Mapping[str, Any]) -> tuple:
    """``(*METRIC_COLUMNS values, extra_json)`` for one epoch's metrics (see log_epoch)."""
    metrics = dict(metrics)
    cols = [_metric_value(name, metrics.pop(name, None)) for name in METRIC_COLUMNS]
    return (*cols, _dumps(metrics))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ids and catalog rows

_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _valid_id(value: Any) -> bool:
    """A run or probe id: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` and no ``..``: a plain file name."""
    return isinstance(value, str) and _ID_PATTERN.fullmatch(value) is not None and ".." not in value


def _check_id(value: Any, kind: str = "run") -> str:
    if not _valid_id(value):
        raise UserError(f"invalid {kind} id {_show(value)}: ids are 1-128 letters, digits, '.', '_' "
                        "or '-', start with a letter or digit and hold no '..'")
    return value


def _checkpoint_rel(run_id: str, epoch: int) -> str:
    return f"runs/{run_id}/checkpoints/epoch_{epoch:04d}.pt"


def _probe_rel(probe_id: str, suffix: str = ".npz") -> str:
    return f"probes/{probe_id}{suffix}"


def _finding_rel(finding_id: str) -> str:
    return f"findings/{finding_id}.json"


def _check_name(value: Any, what: str) -> str:
    """An experiment or finding name: one line of printable text, 1 to :data:`FINDING_NAME_MAX` long."""
    if not isinstance(value, str) or not value.strip() or len(value) > FINDING_NAME_MAX or \
            not value.isprintable():
        raise UserError(f"invalid {what} {_show(value)}: give 1-{FINDING_NAME_MAX} characters of printable "
                        "text on one line")
    return value


def _finding_payload(payload: Any, what: str) -> tuple[dict, str]:
    """A finding's payload as plain JSON types and as its JSON text; UserError when it is not a dict
    with a ``kind``, cannot be stored as JSON, is too large or does not have its kind's shape."""
    if not isinstance(payload, Mapping):
        raise UserError(f"{what}: the payload must be a dict, got a {type(payload).__name__}")
    try:
        obj = to_jsonable(payload)
        text = json.dumps(obj, allow_nan=False)
    except TypeError as e:
        raise UserError(f"{what}: the payload cannot be stored as JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise UserError(f"{what}: the payload is nested too deeply to store") from None
    if not isinstance(obj.get("kind"), str) or not obj["kind"]:
        raise UserError(f"{what}: the payload needs a 'kind' (a string), got {_show(obj.get('kind'))}")
    size = len(text.encode())
    if size > FINDING_MAX_BYTES:
        raise UserError(f"{what}: the payload is {size} bytes of JSON, over the "
                        f"{FINDING_MAX_BYTES // 2**20} MiB limit; store fewer rows")
    from probe.figures.findings import FINDING_KINDS, validate_finding

    if obj["kind"] in FINDING_KINDS:
        problem = validate_finding(obj)
        if problem:
            raise UserError(f"{what}: {problem}")
    return obj, text


def _finding_constant(_: str) -> None:
    return None


def _finding_float(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def _load_finding_payload(text: Any) -> Any:
    """A stored payload's JSON text parsed (NaN, infinities and overflowing numbers become None);
    ``_BAD_JSON`` when it is not JSON."""
    if not isinstance(text, str):
        return _BAD_JSON
    try:
        return json.loads(text, parse_constant=_finding_constant, parse_float=_finding_float)
    except (ValueError, RecursionError):
        return _BAD_JSON


def _finding_label(experiment: Any, name: Any) -> str:
    """``experiment/name`` for a message, hostile text escaped and cut."""
    return f"{_label_part(experiment)}/{_label_part(name)}"


def _label_part(value: Any) -> str:
    if isinstance(value, str) and value.isprintable() and len(value) <= 80:
        return value
    return _show(value)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_count(v: Any) -> bool:
    return type(v) is int and v >= 0


def _is_obj(v: Any) -> bool:
    return isinstance(v, dict)


def _is_status(v: Any) -> bool:
    return isinstance(v, str) and v in STATUSES


def _is_sha(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def _is_number(v: Any) -> bool:
    return v is None or type(v) in (int, float)


_RUN_FIELDS = {"run_id": _valid_id, "model": _is_str, "data": _opt(_is_str), "created_at": _is_str,
               "updated_at": _is_str, "status": _is_status, "error": _opt(_is_str),
               "host": _opt(_is_str), "parent_run": _opt(_is_str), "notes": _opt(_is_str),
               "config": _is_obj, "summary": _is_obj}
_CHECKPOINT_FIELDS = {"epoch": _is_count, "path": _is_str, "sha256": _is_sha, "size": _is_count,
                      "created_at": _is_str}
_METRIC_FIELDS = {"epoch": _is_int, **{c: _is_number for c in METRIC_COLUMNS}, "extra": _is_obj}
#: A finding's fields but its payload, as in its file ``findings/<finding_id>.json``.
_FINDING_FIELDS = {"finding_id": _valid_id, "experiment": _is_str, "name": _is_str, "created_at": _is_str}
#: A probe's fields, as in its sidecar ``probes/<probe_id>.json``.
_PROBE_FIELDS = {"probe_id": _valid_id, "run_id": _opt(_valid_id), "model": _is_str, "kind": _is_str,
                 "checkpoint_epoch": _opt(_is_int), "created_at": _is_str, "status": _is_status,
                 "params": _is_obj, "summary": _is_obj, "artifact_sha256": _opt(_is_sha),
                 "artifact_size": _opt(_is_count)}


def _first_problem(values: Mapping[str, Any], spec: Mapping[str, Callable[[Any], bool]]) -> str | None:
    for key, ok in spec.items():
        if not ok(values.get(key)):
            return f"{key} is {_show(values.get(key))}"
    if "artifact_sha256" in spec and (values.get("artifact_sha256") is None) != \
            (values.get("artifact_size") is None):
        return "artifact_sha256 and artifact_size must be given together"
    return None


def _probe_params(p: Mapping[str, Any]) -> tuple:
    """The values of :data:`_INSERT_PROBE` for validated probe fields ``p``."""
    artifact = _probe_rel(p["probe_id"]) if p["artifact_sha256"] else None
    return (p["probe_id"], p["run_id"], p["model"], p["kind"], p["checkpoint_epoch"], p["created_at"],
            p["status"], _dumps(p["params"]), _dumps(p["summary"]), artifact, p["artifact_sha256"],
            p["artifact_size"])


# --------------------------------------------------------------------------------------------------
# reading untrusted files


def _load_npz(data: bytes, path: Any) -> dict[str, Any]:
    """The arrays of an .npz file's bytes; any defect raises StoreError naming ``path``.

    Every member must be an .npy array whose header's shape and dtype fit the member's size, and
    no member may claim more bytes than deflate can produce from it: a hostile header cannot make
    us allocate a gigantic array.
    """
    import numpy as np
    from numpy.lib import format as npy

    headers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0,
               (3, 0): npy.read_array_header_2_0}  # 3.0 differs from 2.0 in the text encoding only
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                ratio = 1100 if info.compress_type != zipfile.ZIP_STORED else 1
                if info.file_size > ratio * info.compress_size + 1024:
                    raise ValueError(f"member {info.filename!r} claims {info.file_size} bytes "
                                     f"from {info.compress_size}")
                with zf.open(info) as f:
                    version = npy.read_magic(f)
                    if version not in headers:
                        raise ValueError(f"member {info.filename!r} has .npy version {version}")
                    shape, _, dtype = headers[version](f)
                    if math.prod(shape) * dtype.itemsize > info.file_size:
                        raise ValueError(f"member {info.filename!r} declares a {shape} {dtype} array "
                                         f"but holds {info.file_size} bytes")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as e:  # noqa: BLE001 - whatever the defect, the file is unusable
        raise StoreError(f"probe artifact {path} is corrupt ({_why(e)}); run the probe again") from None


# --------------------------------------------------------------------------------------------------
# the store


def _run_id_for(model: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stamp}-{_slug(model, 'model')}-{secrets.token_hex(3)}"


def _probe_id_for(kind: str, model: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stamp}-{_slug(kind, 'probe')}-{_slug(model, 'model')}-{secrets.token_hex(4)}"


def _finding_id_for(experiment: str, name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stamp}-{_slug(experiment, 'experiment')}-{_slug(name, 'finding')}-{secrets.token_hex(4)}"


def _is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _create_schema(con: sqlite3.Connection, version: int = 0, target: int = SCHEMA_VERSION) -> None:
    """Bring a catalog from ``version`` (0: no tables) to ``target`` (in the caller's transaction)."""
    if version == 0:
        con.execute(_SCHEMA_VERSION_TABLE)
    for step in range(version, target):
        for statement in _MIGRATIONS[step]:
            con.execute(statement)
    con.execute("DELETE FROM schema_version")
    con.execute("INSERT INTO schema_version (version) VALUES (?)", (target,))


@functools.lru_cache(maxsize=None)
def _expected_columns(version: int = SCHEMA_VERSION) -> dict[str, frozenset[str]]:
    """Table -> column names of a catalog of ``version`` (built once in memory from the migrations)."""
    con = sqlite3.connect(":memory:")
    try:
        _create_schema(con, target=version)
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: frozenset(r[1] for r in con.execute(f"PRAGMA table_info({t})")) for t in tables}
    finally:
        con.close()


class RunStore:
    """Runs, per-epoch metrics, checkpoints and probe results under one runs root.

    ``RunStore(root)`` checks at once that the root is a writable folder (creating it if needed)
    and that ``catalog.sqlite`` is an SQLite catalog this code understands, creating or migrating
    it; otherwise it raises :class:`~probe.errors.StoreError`. It also removes temp files left by
    writers that died. ``root=None`` means :func:`resolve_runs_root` (``$PROBE_RUNS`` or ``./runs``).

    ``readonly=True`` opens the catalog read-only (``mode=ro``, or ``immutable=1`` on a folder it
    cannot write while no writer has the catalog open) and creates, migrates and removes nothing;
    a root without a catalog reads as an empty store, a catalog of an older schema version as it
    is (what that version lacks, e.g. the findings, reads as empty). Every write then raises
    StoreError.

    ``skipped`` holds one line per damaged row that the last listing (:meth:`list_runs`,
    :meth:`list_probes`, :meth:`list_checkpoints`, :meth:`get_metrics`, :meth:`list_findings`)
    left out.

    The object can be pickled (e.g. passed to a spawned process); the copy re-opens the catalog.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, readonly: bool = False):
        self._attach(root, readonly)
        self._open_catalog()
        if not self.readonly:
            self._keep_reserve()

    def _attach(self, root: str | os.PathLike | None, readonly: bool) -> None:
        """Everything of opening but the catalog: attributes, root checks, the temp-file sweep."""
        self.root = resolve_runs_root(root)
        self.catalog_path = self.root / CATALOG_NAME
        self.readonly = bool(readonly)
        self.skipped: list[str] = []
        self._local = threading.local()
        self._empty = False  # read-only store on a root without a catalog: an empty in-memory one
        self._check_root()
        if not self.readonly:
            self._sweep()

    def __reduce__(self):
        return (functools.partial(type(self), readonly=self.readonly), (str(self.root),))

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r}{', readonly=True' if self.readonly else ''})"

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the root as a boundary ----------------------------------------------------------------

    def _inside(self, rel: str) -> Path:
        """``root / rel`` after checking that, symlinks resolved, it stays inside the real root.

        Every file and folder of the store is reached through here before it is read or written.
        The root itself may be a symlink (the user's choice); anything below it that leads out is
        refused with a StoreError."""
        path = self.root / rel
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if os.path.commonpath([real, real_root]) != real_root:
            raise StoreError(f"{path} leads outside the runs root {self.root} (to {real}) through a "
                             "symlink; nothing was read or written there; replace the link by the "
                             "real file or folder")
        return path

    def _require_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"runs root {self.root} was opened read-only (readonly=True); nothing was "
                             "written; open it without readonly to train or probe")

    def _put(self, rel: str, data: bytes) -> Path:
        """Write ``root/rel`` atomically (parents created); disk errors become StoreError."""
        self._require_writable()
        path = self._inside(rel)
        with _disk_errors(path):
            atomic_write_bytes(path, data)
        return path

    def _mkdir(self, rel: str, exist_ok: bool = True) -> Path:
        self._require_writable()
        path = self._inside(rel)
        with _disk_errors(path):
            path.mkdir(exist_ok=exist_ok)
        return path

    def _get(self, rel: str, what: str, size: int | None = None, sha256: str | None = None,
             redo: str = "") -> bytes:
        """The bytes of ``root/rel``; with ``size`` / ``sha256`` (from the catalog) they must match."""
        path = self._inside(rel)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            listed = " although the catalog lists it" if size is not None else ""
            raise StoreError(f"{what} {path} is missing{listed}; {redo}".rstrip("; ")) from None
        except OSError as e:
            raise StoreError(f"{what} {path} cannot be read ({e.strerror or e})") from None
        if size is not None and (len(data) != size or _sha256(data) != sha256):
            raise StoreError(f"{what} {path} is corrupt or truncated ({len(data)} bytes, sha256 "
                             f"{_sha256(data)[:12]}..., catalog says {size} bytes, "
                             f"{sha256[:12]}...); {redo}")
        return data

    def _keep_reserve(self) -> None:
        """Keep ``.space-reserve`` (:data:`RESERVE_BYTES`) in the root, best effort: on a full disk
        :meth:`record_stop` gives it up so that the catalog can still say why a run stopped."""
        path = self.root / RESERVE_NAME
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and path.stat().st_size >= RESERVE_BYTES:
                return
            atomic_write_bytes(self._inside(RESERVE_NAME), bytes(RESERVE_BYTES))

    def record_stop(self, run_id: str, status: str, error: str) -> None:
        """Set the status and the one-line reason of a run that stopped, even on a full disk: when
        the catalog cannot grow, the space reserve is given up for this write (it is made again
        the next time the root is opened with space to spare)."""
        try:
            self.update_run(run_id, status=status, error=error)
        except DiskFullError:
            reserve = self.root / RESERVE_NAME
            if not reserve.is_file() or reserve.is_symlink():
                raise
            reserve.unlink()
            self.update_run(run_id, status=status, error=error)

    def _sweep(self) -> None:
        """Remove ``.*.tmp`` files of dead writers (their lock is free) in the root, ``probes/``,
        ``findings/``, ``runs/*/`` and ``runs/*/checkpoints/``; symlinked folders are not entered."""
        if fcntl is None:
            return
        folders, runs = [self.root, self.root / "probes", self.root / "findings"], self.root / "runs"
        with contextlib.suppress(OSError):
            if not runs.is_symlink():
                with os.scandir(runs) as entries:
                    for e in entries:
                        if e.is_dir(follow_symlinks=False):
                            folders += [Path(e.path), Path(e.path) / "checkpoints"]
        for folder in folders:
            if not folder.is_dir() or folder.is_symlink():
                continue
            with contextlib.suppress(OSError), os.scandir(folder) as entries:
                for e in entries:
                    if e.name.startswith(".") and e.name.endswith(".tmp") and \
                            e.is_file(follow_symlinks=False):
                        self._remove_if_dead(e.path)

    @staticmethod
    def _remove_if_dead(path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while the writer lives
            os.unlink(path)  # still locked: see _temp_file
        except OSError:
            pass
        finally:
            os.close(fd)

    # ---- opening -------------------------------------------------------------------------------

    def _check_root(self) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise StoreError(f"runs root {root} exists but is not a folder; pick another runs root")
        if self.readonly:
            return
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create runs root {root} ({e.strerror or e}); "
                             "pick a writable runs root") from None
        try:  # a real write: os.access is blind to read-only mounts and ACLs
            fd, probe = _temp_file(root, "write-test")
            os.close(fd)
            probe.unlink()
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise DiskFullError(_no_space(f"runs root {root}")) from None
            raise StoreError(f"runs root {root} is not writable (read-only: {e.strerror or e}); "
                             "reading it works with RunStore(root, readonly=True); pick a writable "
                             "runs root to train or probe") from None

    def _open_catalog(self) -> None:
        """Validate, configure and migrate the catalog (retrying while another process holds it).

        Nothing is changed before the file has been recognised as a catalog: a foreign SQLite
        database is refused untouched, a damaged one is refused with a hint to rebuild it."""
        cat = self.catalog_path
        for suffix in ("", "-wal", "-shm"):
            self._inside(CATALOG_NAME + suffix)
        if cat.exists() and not cat.is_file():
            raise StoreError(f"catalog {cat} is not a file; move it away or pick another runs root")
        need, what = (os.R_OK, "readable") if self.readonly else (os.R_OK | os.W_OK, "readable and writable")
        if cat.exists() and not os.access(cat, need):
            raise StoreError(f"catalog {cat} is not {what}; fix its permissions or pick another runs root")
        if not cat.exists():
            self._refuse_lost_catalog()
            if self.readonly:
                self._empty = True
                return
        side = [Path(f"{cat}{suffix}") for suffix in ("-wal", "-shm")]
        made = [p for p in side if not p.exists()]  # a read-only reader may create them; see below
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                con = self._connection()
                version = self._inspect(con)
                if version == 0:  # no tables at all: ours to initialise, unless runs exist
                    self._refuse_lost_catalog()
                if self.readonly:  # an older catalog is read as it is
                    if version == 0:
                        self.close()
                        self._empty = True
                    return
                if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    if mode.lower() != "wal":
                        raise StoreError(f"catalog {cat} cannot use WAL mode "
                                         f"(got {mode}); put the runs root on a local disk")
                if version < SCHEMA_VERSION:
                    self._migrate()
                return
            except sqlite3.OperationalError as e:
                if _is_busy(e) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                self._close_refused(made)
                raise self._db_error(e) from None
            except sqlite3.DatabaseError as e:
                self._close_refused(made)
                raise self._db_error(e) from None
            except BaseException:
                self._close_refused(made)
                raise

    def _close_refused(self, made: list[Path]) -> None:
        """Close a catalog that was refused; a read-only reader cannot delete the -wal / -shm files
        SQLite made for it, so those this open created go (a foreign file is left as it was)."""
        self.close()
        if self.readonly:
            for path in made:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _refuse_lost_catalog(self) -> None:
        """An empty or missing catalog is only initialised when no run folder says it was lost."""
        runs = self._inside("runs")
        try:
            with os.scandir(runs) as entries:
                n = sum(1 for e in entries if e.is_dir() and os.path.isfile(Path(e.path, "config.json")))
        except OSError:
            n = 0
        if n:
            raise StoreError(f"catalog {self.catalog_path} is empty or missing but {runs} holds {n} run "
                             f"folders; {_REBUILD}")

    def _inspect(self, con: sqlite3.Connection) -> int:
        """Schema version of the catalog, 0 for a database without tables; raises StoreError for a
        foreign database, a bad version, a missing table or column and a failing quick_check.
        Reads only."""
        cat = self.catalog_path
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return 0
        foreign = StoreError(f"{cat} is an SQLite database but not a landscape-probe catalog (no valid "
                             "schema_version table); it was not changed; move it away or pick another "
                             "runs root")
        if "schema_version" not in tables:
            raise foreign
        try:
            values = [r[0] for r in con.execute("SELECT version FROM schema_version")]
        except sqlite3.OperationalError:
            raise foreign from None
        if len(values) != 1 or not _is_int(values[0]) or values[0] < 1:
            raise StoreError(f"catalog {cat} has an invalid schema version "
                             f"({', '.join(map(_show, values)) or 'no row'}); {_REBUILD}")
        version = values[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"catalog {cat} has schema version {version} but this "
                             f"landscape-probe knows up to {SCHEMA_VERSION}; upgrade landscape-probe")
        for table, expected in _expected_columns(version).items():
            have = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
            problem = (f"table {table} is missing" if not have else
                       f"table {table} lacks column(s) {', '.join(sorted(expected - have))}"
                       if expected - have else None)
            if problem:
                raise StoreError(f"catalog {cat} is damaged ({problem}); {_REBUILD}")
        check = [r[0] for r in con.execute("PRAGMA quick_check")]
        if check != ["ok"]:
            raise StoreError(f"catalog {cat} is damaged ({_show(check[0] if check else '')}); "
                             f"{_REBUILD}")
        return version

    def _migrate(self) -> None:
        with self._write() as con:
            version = self._inspect(con)  # re-read under the write lock: another process
            if version == 0:              # may have migrated meanwhile
                self._refuse_lost_catalog()
            if version < SCHEMA_VERSION:
                _create_schema(con, version)

    def _connection(self) -> sqlite3.Connection:
        """This process's and thread's connection, opened on first use and after a fork.

        A read-only store that found no catalog (or one without tables yet) looks again on each
        use, so that it sees a catalog a writer creates later."""
        local = self._local
        con = getattr(local, "con", None)
        if self._empty and con is not None and local.pid == os.getpid() and self._catalog_appeared():
            con = None
        if con is not None and local.pid == os.getpid():
            return con
        if con is not None:
            _INHERITED_CONNECTIONS.append(con)
        if self._empty:
            con = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            _create_schema(con)
        else:
            target, uri = str(self.catalog_path), False
            if self.readonly:
                target, uri = f"file:{urllib.parse.quote(target)}?mode=ro", True
                # On a folder it cannot write (a read-only mount), a mode=ro reader of a WAL catalog
                # needs -wal / -shm to exist already; without them no writer has the catalog open
                # (none can create them either): read the file as it is. Where the folder is
                # writable a writer may come at any time, so a live mode=ro reader is kept (SQLite
                # may create the -wal / -shm files beside the catalog, which changes no data).
                if not os.access(self.root, os.W_OK) and \
                        not all(Path(f"{self.catalog_path}{s}").exists() for s in ("-wal", "-shm")):
                    target += "&immutable=1"
            con = sqlite3.connect(target, uri=uri, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                  check_same_thread=False)
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("PRAGMA synchronous = NORMAL")
        local.con, local.pid = con, os.getpid()
        return con

    def _catalog_appeared(self) -> bool:
        """For an empty read-only store: open the catalog if a writer has made one since (else stay
        empty). True when the store now reads a real catalog."""
        try:
            if self.catalog_path.stat().st_size == 0:
                return False
        except OSError:
            return False
        self.close()
        self._empty = False
        self._open_catalog()  # empty again while the catalog has no tables yet
        return not self._empty

    def close(self) -> None:
        """Close this thread's catalog connection (it re-opens on the next call)."""
        con = getattr(self._local, "con", None)
        if con is not None and self._local.pid == os.getpid():
            con.close()
        self._local.con = None

    def _db_error(self, e: sqlite3.Error) -> StoreError:
        cat, text = self.catalog_path, str(e).lower()
        if _is_busy(e):
            return StoreError(f"catalog {cat} stayed locked by another process for "
                              f"over {BUSY_TIMEOUT_S:.0f} s; retry when it has finished")
        if "disk is full" in text:
            return DiskFullError(_no_space(f"catalog {cat}"))
        if "readonly" in text or "read-only" in text:
            return StoreError(f"catalog {cat} cannot be written ({e}); to read it, open the runs root "
                              "with readonly=True")
        if "unable to open" in text or "i/o error" in text:
            return StoreError(f"catalog {cat} cannot be used ({e}); check the disk and permissions "
                              "of the runs root")
        return StoreError(f"catalog {cat} is not an SQLite catalog or is damaged ({e}); {_REBUILD}")

    @contextlib.contextmanager
    def _sql(self) -> Iterator[None]:
        """SQLite errors -> StoreError naming the catalog (integrity / programming errors pass)."""
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise
        except sqlite3.DatabaseError as e:
            raise self._db_error(e) from None
        except UnicodeEncodeError:
            raise UserError("a name given is not valid text (undecodable bytes, e.g. from a command "
                            "line in another encoding); retype it") from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, taking the write lock up front (``BEGIN IMMEDIATE``)."""
        self._require_writable()
        with self._sql():
            con = self._connection()
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        con.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._sql():
            return self._connection().execute(sql, params).fetchall()

    def _row_error(self, what: str, ident: Any, problem: str) -> StoreError:
        return StoreError(f"{what} {ident} in catalog {self.catalog_path} is damaged ({problem}); "
                          f"delete that row or {_REBUILD}")

    def _listing(self, rows: list, convert: Callable[[Any], dict]) -> list[dict[str, Any]]:
        """``convert`` each row; damaged ones are left out and reported in :attr:`skipped`."""
        self.skipped = []
        out = []
        for row in rows:
            try:
                out.append(convert(row))
            except StoreError as e:
                self.skipped.append(str(e))
        return out

    # ---- runs ----------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        """Folder of a run (``<root>/runs/<run_id>``); ``run_id`` must be a full id."""
        return self._inside(f"runs/{_check_id(run_id)}")

    def new_run(self, model: str, data: str | None, config: Mapping[str, Any] | None = None, *,
                parent_run: str | None = None, notes: str | None = None) -> str:
        """Register a new run with status ``running`` and return its id.

        The id reads ``YYYYmmdd-HHMMSS-<model>-<6 hex>`` (UTC time); it is unique across processes
        (its folder is created exclusively). ``config`` is stored in the catalog and written to
        ``runs/<run_id>/config.json``.
        """
        config_json = _dumps(config)
        self._mkdir("runs")
        while True:
            run_id = _run_id_for(model)
            try:
                folder = self._mkdir(f"runs/{run_id}", exist_ok=False)
                break
            except FileExistsError:
                continue
        try:
            self._put(f"runs/{run_id}/config.json",
                      (json.dumps(json.loads(config_json), indent=2) + "\n").encode())
            now = _now()
            with self._write() as con:
                con.execute(_INSERT_RUN, (run_id, str(model), data, now, now, "running", config_json,
                                          "{}", socket.gethostname(), parent_run, notes))
        except BaseException:  # leave no folder without a catalog row
            with contextlib.suppress(OSError):
                (folder / "config.json").unlink(missing_ok=True)
                folder.rmdir()
            raise
        return run_id

    def update_run(self, run_id: str, *, status: str | None = None,
                   summary: Mapping[str, Any] | None = None, error: str | None = None,
                   notes: str | None = None) -> None:
        """Change a run's status, merge ``summary`` into its summary (key by key), set its error
        text or notes. Arguments left as ``None`` are not changed."""
        _check_id(run_id)
        if status is not None and status not in STATUSES:
            raise UserError(f"unknown run status {status!r}; use one of {', '.join(STATUSES)}")
        with self._write() as con:
            row = con.execute("SELECT summary_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise self._unknown_run(run_id)
            merged = _json(row["summary_json"])
            if not _is_obj(merged):
                raise self._row_error("run", _show(run_id), f"summary is {_show(merged)}")
            merged.update(to_jsonable(dict(summary or {})))
            con.execute(
                "UPDATE runs SET status = COALESCE(?, status), summary_json = ?,"
                " error = COALESCE(?, error), notes = COALESCE(?, notes), updated_at = ?"
                " WHERE run_id = ?",
                (status, _dumps(merged), error, notes, _now(), run_id))

    def resolve_run(self, ref: str) -> str:
        """Full run id for a reference: a full id, a unique prefix, or ``"last"`` / ``"latest"``.

        Catalog rows whose id is not a valid run id are never returned."""
        ref = str(ref).strip()
        if ref.lower() in ("last", "latest"):
            rows = self._read("SELECT run_id FROM runs ORDER BY created_at DESC, rowid DESC")
            for row in rows:
                if _valid_id(row["run_id"]):
                    return row["run_id"]
            raise UserError(f"no runs yet in {self.root}; train one first (probe train ...)")
        if not _valid_id(ref):
            raise UserError(f"invalid run reference {_show(ref)}: give a run id, a unique prefix of "
                            "one, or 'last' (ids hold letters, digits, '.', '_' and '-')")
        if self._read("SELECT 1 FROM runs WHERE run_id = ?", (ref,)):
            return ref
        rows = [r for r in self._read("SELECT run_id FROM runs WHERE substr(run_id, 1, ?) = ?"
                                      " ORDER BY created_at", (len(ref), ref)) if _valid_id(r["run_id"])]
        if len(rows) == 1:
            return rows[0]["run_id"]
        if len(rows) > 1:
            shown = ", ".join(r["run_id"] for r in rows[:8])
            raise UserError(f"run prefix {ref!r} matches {len(rows)} runs ({shown}); "
                            "give more characters")
        raise self._unknown_run(ref)

    def _unknown_run(self, ref: str) -> UserError:
        ids = [r["run_id"] for r in self._read("SELECT run_id FROM runs ORDER BY created_at")
               if _valid_id(r["run_id"])]
        if not ids:
            return UserError(f"unknown run {ref!r}: no runs yet in {self.root}")
        near = [i for i in ids if ref and ref in i][-5:]
        near += [i for i in difflib.get_close_matches(ref, ids, n=5, cutoff=0.6) if i not in near]
        hint = f"close matches: {', '.join(near)}" if near else "list them with `probe runs`"
        return UserError(f"unknown run {ref!r} in {self.root}; {hint}")

    def _run_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        out = {k: row[k] for k in ("run_id", "model", "data", "created_at", "updated_at", "status",
                                   "error", "host", "parent_run", "notes")}
        out["config"] = _json(row["config_json"])
        out["summary"] = _json(row["summary_json"])
        problem = _first_problem(out, _RUN_FIELDS)
        if problem:
            raise self._row_error("run", _show(row["run_id"]), problem)
        out["path"] = str(self.root / "runs" / row["run_id"])
        return out

    def get_run(self, ref: str) -> dict[str, Any]:
        """One run as a dict: ``run_id, model, data, created_at, updated_at, status, error, host,
        parent_run, notes, config, summary, path``. ``ref`` as in :meth:`resolve_run`; an unknown
        reference raises :class:`~probe.errors.UserError` listing close matches, a damaged row a
        :class:`~probe.errors.StoreError`."""
        run_id = self.resolve_run(ref)
        rows = self._read("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise self._unknown_run(run_id)
        return self._run_dict(rows[0])

    def list_runs(self, model: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """All runs (newest first), optionally only those of one model name and / or status.
        Damaged rows are left out and reported in :attr:`skipped`."""
        sql, args = "SELECT * FROM runs WHERE 1", []
        if model is not None:
            sql += " AND model = ?"
            args.append(model)
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        rows = self._read(sql + " ORDER BY created_at DESC, rowid DESC", tuple(args))
        return self._listing(rows, self._run_dict)

    # ---- metrics -------------------------------------------------------------------------------

    def log_epoch(self, run_id: str, epoch: int, **metrics: Any) -> None:
        """Record one epoch's metrics. Names in :data:`METRIC_COLUMNS` get their own column, any
        other name is kept in ``extra_json``. Logging an epoch again replaces that row (a resumed run
        stays consistent)."""
        _check_id(run_id)
        epoch = operator.index(epoch)
        values = _metric_values(metrics)
        now = _now()
        try:
            with self._write() as con:
                con.execute(_INSERT_METRICS, (run_id, epoch, *values, now))
                con.execute("UPDATE runs SET updated_at = ? WHERE run_id = ?", (now, run_id))
        except sqlite3.IntegrityError:
            raise self._unknown_run(run_id) from None

    def get_metrics(self, ref: str) -> list[dict[str, Any]]:
        """Per-epoch metrics of a run, ordered by epoch: one flat dict per epoch with ``epoch``, every
        column of :data:`METRIC_COLUMNS` (``None`` where not logged) and the extra metrics.
        Damaged rows are left out and reported in :attr:`skipped`."""
        run_id = self.resolve_run(ref)

        def convert(r: sqlite3.Row) -> dict[str, Any]:
            d = {"epoch": r["epoch"], **{c: r[c] for c in METRIC_COLUMNS}, "extra": _json(r["extra_json"])}
            problem = _first_problem(d, _METRIC_FIELDS)
            if problem:
                raise self._row_error("metrics row", f"{run_id} epoch {_show(r['epoch'])}", problem)
            d.update(d.pop("extra"))
            return d

        rows = self._read("SELECT * FROM metrics WHERE run_id = ? ORDER BY epoch", (run_id,))
        return self._listing(rows, convert)

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

        _check_id(run_id)
        epoch = operator.index(epoch)
        if epoch < 0:
            raise UserError(f"checkpoint epoch must be >= 0, got {epoch}")
        rows = self._read("SELECT config_json FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise self._unknown_run(run_id)
        config = _json(rows[0]["config_json"])
        if not _is_obj(config):
            raise self._row_error("run", _show(run_id), f"config is {_show(config)}")
        state = dict(state)
        state.setdefault("run_id", run_id)
        state.setdefault("epoch", epoch)
        state.setdefault("config", config)
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        rel = _checkpoint_rel(run_id, epoch)
        path = self._put(rel, data)
        with self._write() as con:
            con.execute(_INSERT_CHECKPOINT, (run_id, epoch, rel, _sha256(data), len(data), _now()))
        return path

    def _checkpoint_dict(self, run_id: str, r: sqlite3.Row) -> dict[str, Any]:
        d = {k: r[k] for k in _CHECKPOINT_FIELDS}
        ident = f"{run_id} epoch {_show(r['epoch'])}"
        problem = _first_problem(d, _CHECKPOINT_FIELDS)
        if problem is None and d["path"] != _checkpoint_rel(run_id, d["epoch"]):
            problem = f"path {_show(d['path'])} is not {_checkpoint_rel(run_id, d['epoch'])}"
        if problem:
            raise self._row_error("checkpoint", ident, problem)
        d["path"] = str(self.root / d["path"])
        return d

    def list_checkpoints(self, ref: str) -> list[dict[str, Any]]:
        """Checkpoints of a run ordered by epoch: dicts ``epoch, path (absolute), sha256, size,
        created_at``. Damaged rows are left out and reported in :attr:`skipped`."""
        run_id = self.resolve_run(ref)
        rows = self._read("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY epoch", (run_id,))
        return self._listing(rows, functools.partial(self._checkpoint_dict, run_id))

    def latest_checkpoint(self, ref: str) -> int | None:
        """Highest checkpointed epoch of a run, or ``None`` when it has none."""
        run_id = self.resolve_run(ref)
        row = self._read("SELECT MAX(epoch) AS e FROM checkpoints WHERE run_id = ?"
                         " AND typeof(epoch) = 'integer' AND epoch >= 0", (run_id,))[0]
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
        rec = self._checkpoint_dict(run_id, rows[0])
        data = self._get(_checkpoint_rel(run_id, epoch), "checkpoint", rec["size"], rec["sha256"],
                         "re-save it or train again")
        path = rec["path"]
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            raise StoreError(f"checkpoint {path} was refused: it is not a plain tensor checkpoint "
                             "(its pickle asks for code or objects; nothing was run)") from None
        except Exception as e:  # noqa: BLE001 - whatever the defect, the file is unusable
            raise StoreError(f"checkpoint {path} is corrupt or truncated ({_why(e)})") from None

    # ---- probes --------------------------------------------------------------------------------

    def add_probe(self, kind: str, *, model: str | None = None, run_id: str | None = None,
                  checkpoint_epoch: int | None = None, params: Mapping[str, Any] | None = None,
                  summary: Mapping[str, Any] | None = None,
                  arrays: Mapping[str, Any] | None = None, status: str = "finished") -> str:
        """Record one probe result and return its id (``YYYYmmdd-HHMMSS-<kind>-<model>-<8 hex>``).

        ``arrays`` (name -> numpy array) are saved atomically to ``probes/<probe_id>.npz``, then
        the sidecar ``probes/<probe_id>.json`` (the row's fields, for :meth:`rebuild_catalog`),
        then the row is written; ``params`` and ``summary`` go into the catalog as JSON.
        ``run_id`` is ``None`` for a probe on a bare model; with a run, ``model`` defaults to the
        run's model.
        """
        if status not in STATUSES:
            raise UserError(f"unknown probe status {status!r}; use one of {', '.join(STATUSES)}")
        if run_id is not None:
            rows = self._read("SELECT model FROM runs WHERE run_id = ?", (_check_id(run_id),))
            if not rows:
                raise self._unknown_run(run_id)
            model = model if model is not None else rows[0]["model"]
        if model is None:
            raise UserError("a probe needs a model name or a run")
        probe_id = _probe_id_for(kind, model)
        fields = {"probe_id": probe_id, "run_id": run_id, "model": str(model), "kind": str(kind),
                  "checkpoint_epoch": None if checkpoint_epoch is None else operator.index(checkpoint_epoch),
                  "created_at": _now(), "status": status, "params": json.loads(_dumps(params)),
                  "summary": json.loads(_dumps(summary)), "artifact_sha256": None, "artifact_size": None}
        written = []
        try:
            if arrays:
                buf = io.BytesIO()
                _savez(buf, arrays)
                data = buf.getvalue()
                written.append(self._put(_probe_rel(probe_id), data))
                fields.update(artifact_sha256=_sha256(data), artifact_size=len(data))
            written.append(self._put(_probe_rel(probe_id, ".json"),
                                     (json.dumps(fields, indent=2) + "\n").encode()))
            with self._write() as con:
                con.execute(_INSERT_PROBE, _probe_params(fields))
        except BaseException as e:  # leave no files without a row
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            if isinstance(e, sqlite3.IntegrityError):  # the run vanished meanwhile
                raise self._unknown_run(str(run_id)) from None
            raise
        return probe_id

    def _probe_record(self, row: sqlite3.Row) -> tuple[dict[str, Any], str | None, int | None]:
        """A validated probe row: (the dict get_probe returns, artifact sha256, artifact size)."""
        d = {k: row[k] for k in _PROBE_FIELDS if k not in ("params", "summary")}
        d["params"], d["summary"] = _json(row["params_json"]), _json(row["summary_json"])
        problem = _first_problem(d, _PROBE_FIELDS)
        expected = _probe_rel(d["probe_id"]) if problem is None and d["artifact_sha256"] else None
        if problem is None and row["artifact"] != expected:
            problem = f"artifact {_show(row['artifact'])} is not {_probe_rel(d['probe_id'])}"
        if problem:
            raise self._row_error("probe", _show(row["probe_id"]), problem)
        sha, size = d.pop("artifact_sha256"), d.pop("artifact_size")
        d["artifact"] = str(self.root / _probe_rel(d["probe_id"])) if sha else None
        return d, sha, size

    def _probe_row(self, probe_id: str) -> tuple[dict[str, Any], str | None, int | None]:
        _check_id(probe_id, "probe")
        rows = self._read("SELECT * FROM probes WHERE probe_id = ?", (probe_id,))
        if not rows:
            ids = [r["probe_id"] for r in self._read("SELECT probe_id FROM probes")
                   if _valid_id(r["probe_id"])]
            near = difflib.get_close_matches(probe_id, ids, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(near)}" if near else ""
            raise UserError(f"unknown probe {probe_id!r} in {self.root}{hint}")
        return self._probe_record(rows[0])

    def get_probe(self, probe_id: str) -> dict[str, Any]:
        """One probe row: ``probe_id, run_id, model, kind, checkpoint_epoch, created_at, status,
        params, summary, artifact`` (absolute path or ``None``)."""
        return self._probe_row(probe_id)[0]

    def list_probes(self, run_id: str | None = None, kind: str | None = None,
                    model: str | None = None) -> list[dict[str, Any]]:
        """Probe rows (oldest first), optionally of one run (a reference, see :meth:`resolve_run`),
        kind and / or model name. Damaged rows are left out and reported in :attr:`skipped`."""
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
        return self._listing(rows, lambda r: self._probe_record(r)[0])

    def load_probe_arrays(self, probe_id: str) -> dict[str, Any]:
        """The arrays saved with a probe (an empty dict when it saved none).

        Loaded with ``allow_pickle=False`` after checking size and sha256 against the catalog;
        a missing, truncated, altered or malformed file raises :class:`~probe.errors.StoreError`.
        """
        d, sha, size = self._probe_row(probe_id)
        if not sha:
            return {}
        data = self._get(_probe_rel(probe_id), "probe artifact", size, sha, "run the probe again")
        return _load_npz(data, d["artifact"])

    # ---- findings ------------------------------------------------------------------------------

    def save_finding(self, experiment: str, name: str, payload: Mapping[str, Any]) -> str:
        """Store one finding of an experiment and return its id
        (``YYYYmmdd-HHMMSS-<experiment>-<name>-<8 hex>``).

        ``payload`` is a dict of JSON-able values (numpy / torch numbers and arrays allowed; NaN and
        infinities become ``None``, see :func:`to_jsonable`) with a string ``kind``; a payload of
        a kind that :mod:`probe.figures.findings` draws must have that kind's shape
        (:func:`~probe.figures.findings.validate_finding`); its JSON may take up to
        :data:`FINDING_MAX_BYTES`. The finding is written to ``findings/<finding_id>.json`` (for
        :meth:`rebuild_catalog`), then to the catalog. A newer finding of the same experiment and
        name supersedes the older ones in :meth:`list_findings` and :meth:`get_finding` (they are
        kept). Raises :class:`~probe.errors.UserError` for a bad name or payload.
        """
        self._require_writable()
        experiment = _check_name(experiment, "experiment name")
        name = _check_name(name, "finding name")
        obj, text = _finding_payload(payload, f"finding {_finding_label(experiment, name)}")
        finding_id = _finding_id_for(experiment, name)
        fields = {"finding_id": finding_id, "experiment": experiment, "name": name, "created_at": _now()}
        data = json.dumps({**fields, "payload": obj}, allow_nan=False).encode()
        path = self._put(_finding_rel(finding_id), data + b"\n")
        try:
            with self._write() as con:
                con.execute(_INSERT_FINDING, (*fields.values(), text))
        except BaseException:  # leave no file without a row
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return finding_id

    def _finding_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        """A finding row as :meth:`list_findings` returns it; a row whose payload is not a JSON object
        with a kind comes with ``payload`` None and a one-line ``error``; a row whose other fields
        are damaged raises StoreError."""
        d = {k: row[k] for k in _FINDING_FIELDS}
        problem = _first_problem(d, _FINDING_FIELDS)
        if problem:
            raise self._row_error("finding", _show(row["finding_id"]), problem)
        text, size = row["payload_json"], row["payload_size"]
        payload = _BAD_JSON if text is None else _load_finding_payload(text)
        if text is None and _is_count(size):
            problem = f"its payload is {size} bytes, over the {FINDING_MAX_BYTES // 2**20} MiB limit"
        elif payload is _BAD_JSON:
            problem = "its payload is not valid JSON"
        elif not isinstance(payload, dict):
            problem = f"its payload is not a JSON object ({type(payload).__name__})"
        elif not isinstance(payload.get("kind"), str) or not payload["kind"]:
            problem = f"its payload has no kind (kind is {_show(payload.get('kind'))})"
        d["payload"] = None if problem else payload
        if problem:
            d["error"] = (f"finding {_finding_label(d['experiment'], d['name'])} ({d['finding_id']}) "
                          f"in catalog {self.catalog_path} is damaged: {problem}; run its experiment again")
        return d

    def _newest_findings(self, where: str, args: tuple) -> list[sqlite3.Row]:
        """The newest finding row per (experiment, name) among those matching ``where``; a payload
        over the size limit is not read (``payload_json`` NULL, ``payload_size`` its size)."""
        if not self._read("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'findings'"):
            return []  # a read-only catalog of an older schema version
        return self._read(
            "SELECT f.finding_id, f.experiment, f.name, f.created_at,"
            " length(CAST(f.payload_json AS BLOB)) AS payload_size,"
            f" CASE WHEN length(CAST(f.payload_json AS BLOB)) <= {FINDING_MAX_BYTES}"
            " THEN f.payload_json END AS payload_json"
            " FROM findings f JOIN (SELECT rowid AS row_key, ROW_NUMBER() OVER (PARTITION BY experiment, name"
            f" ORDER BY created_at DESC, rowid DESC) AS newest FROM findings WHERE {where}) n"
            " ON f.rowid = n.row_key WHERE n.newest = 1 ORDER BY f.experiment, f.created_at, f.rowid", args)

    def list_findings(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """The newest finding per experiment and name (of one experiment, or all), ordered by
        experiment, then oldest first: dicts ``finding_id, experiment, name, created_at, payload``.
        A finding whose payload is damaged (not JSON, not an object, no kind) has ``payload`` None and
        ``error``, one line naming it; a row whose other fields are damaged is left out and reported
        in :attr:`skipped`. Empty for a read-only catalog older than findings."""
        where, args = ("1", ()) if experiment is None else ("experiment = ?", (experiment,))
        return self._listing(self._newest_findings(where, args), self._finding_dict)

    def get_finding(self, experiment: str, name: str) -> dict[str, Any] | None:
        """The newest finding of ``experiment`` named ``name`` (as :meth:`list_findings` gives
        it), or ``None`` when there is none."""
        rows = self._newest_findings("experiment = ? AND name = ?", (experiment, name))
        return self._finding_dict(rows[0]) if rows else None

    # ---- rebuilding the catalog ----------------------------------------------------------------

    @classmethod
    def rebuild_catalog(cls, root: str | os.PathLike | None = None) -> dict[str, Any]:
        """Rebuild ``catalog.sqlite`` from the run folders and probe sidecars; see
        :func:`probe._rebuild.rebuild_catalog` (the old catalog is moved aside, never deleted)."""
        from probe._rebuild import rebuild_catalog

        return rebuild_catalog(root)

rebuild_catalog = RunStore.rebuild_catalog
