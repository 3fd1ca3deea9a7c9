"""The catalog ``catalog.sqlite`` of a runs root: opening it (checks, WAL mode, migrations), its
connections and its transactions.

Concurrency: every write is one short ``BEGIN IMMEDIATE`` transaction, the catalog is in WAL mode with
a 30 s busy timeout, so several processes may train and probe into the same root at the same time.
Connections are per process and per thread, opened lazily and re-opened after ``fork``. A read-only
store creates, migrates and cleans up nothing; a foreign SQLite file is never altered; a damaged
catalog raises :class:`~probe.errors.StoreError` with a hint to rebuild it.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterator

from probe.errors import DiskFullError, StoreError, UserError
from probe.store.atomic import no_space_message
from probe.store.files import RootFiles, resolve_runs_root
from probe.store.records import is_int, show
from probe.store.schema import SCHEMA_VERSION, create_schema, expected_columns

__all__ = ["Catalog", "CATALOG_NAME", "BUSY_TIMEOUT_S"]

CATALOG_NAME = "catalog.sqlite"
BUSY_TIMEOUT_S = 30.0

_REBUILD = ("rebuild it from the run folders with `probe runs --rebuild-catalog` or "
            "RunStore.rebuild_catalog(root) (the old catalog is kept aside)")

# Connections inherited through fork are kept alive here and never used or closed: closing them in
# the child would drop the parent's POSIX locks on the catalog.
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []


def _is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class Catalog(RootFiles):
    """A runs root and its catalog: :meth:`_attach` checks the root, :meth:`_open_catalog` checks,
    configures and migrates the catalog; :meth:`_read` and :meth:`_write` run SQL on this process's
    and thread's connection, SQLite errors turned into StoreError naming the catalog."""

    def _attach(self, root: str | os.PathLike | None, readonly: bool) -> None:
        """Everything of opening but the catalog: attributes, root checks, the temp-file sweep."""
        self.root = resolve_runs_root(root)
        self.catalog_path = self.root / CATALOG_NAME
        self.readonly = bool(readonly)
        self.skipped: list[str] = []
        self.damaged: list[dict[str, Any]] = []
        self._local = threading.local()
        self._empty = False  # read-only store on a root without a catalog: an empty in-memory one
        self._check_root()
        if not self.readonly:
            self._sweep()

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
        if len(values) != 1 or not is_int(values[0]) or values[0] < 1:
            raise StoreError(f"catalog {cat} has an invalid schema version "
                             f"({', '.join(map(show, values)) or 'no row'}); {_REBUILD}")
        version = values[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"catalog {cat} has schema version {version} but this "
                             f"landscape-probe knows up to {SCHEMA_VERSION}; upgrade landscape-probe")
        for table, expected in expected_columns(version).items():
            have = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
            problem = (f"table {table} is missing" if not have else
                       f"table {table} lacks column(s) {', '.join(sorted(expected - have))}"
                       if expected - have else None)
            if problem:
                raise StoreError(f"catalog {cat} is damaged ({problem}); {_REBUILD}")
        check = [r[0] for r in con.execute("PRAGMA quick_check")]
        if check != ["ok"]:
            raise StoreError(f"catalog {cat} is damaged ({show(check[0] if check else '')}); "
                             f"{_REBUILD}")
        return version

    def _migrate(self) -> None:
        with self._write() as con:
            version = self._inspect(con)  # re-read under the write lock: another process
            if version == 0:              # may have migrated meanwhile
                self._refuse_lost_catalog()
            if version < SCHEMA_VERSION:
                create_schema(con, version)

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
            create_schema(con)
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
            return DiskFullError(no_space_message(f"catalog {cat}"))
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
        """``convert`` each row; damaged ones are left out and reported in :attr:`skipped` (one line
        each) and :attr:`damaged` (each row's plain values that identify it, as stored, and the line)."""
        self.skipped, self.damaged = [], []
        out = []
        for row in rows:
            try:
                out.append(convert(row))
            except StoreError as e:
                self.skipped.append(str(e))
                ident = {k: row[k] for k in row.keys() if not k.endswith("_json")
                         and (row[k] is None or isinstance(row[k], (int, float, str)))}
                self.damaged.append({**ident, "problem": str(e)})
        return out
