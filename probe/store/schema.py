"""The catalog's layout: its tables, their version, the migrations from one version to the next
and the statements that insert whole rows (the store and the rebuild share them).

A catalog of a newer version than :data:`SCHEMA_VERSION` is refused; an older one is brought up
to date by :func:`create_schema`, one migration after the other.
"""
from __future__ import annotations

import functools
import sqlite3

__all__ = ["SCHEMA_VERSION", "STATUSES", "METRIC_COLUMNS", "SCHEMA_VERSION_TABLE", "MIGRATIONS", "INSERT_RUN",
           "INSERT_METRICS", "INSERT_CHECKPOINT", "INSERT_PROBE", "INSERT_FINDING", "create_schema",
           "expected_columns"]

#: Version of the catalog layout this code writes; a newer catalog is refused.
SCHEMA_VERSION = 2
#: Allowed values of a run's (and a probe's) ``status``.
STATUSES = ("running", "finished", "failed", "interrupted")
#: Metrics with their own column; any other keyword of
#: :meth:`probe.store.RunStore.log_epoch` goes to ``extra_json``.
METRIC_COLUMNS = (
    "train_loss", "train_top1", "train_top5",
    "test_loss", "test_top1", "test_top5",
    "lr", "epoch_time_s",
)

SCHEMA_VERSION_TABLE = "CREATE TABLE schema_version (version INTEGER NOT NULL)"
# Each entry brings the catalog from version i to i + 1 (list index i).
MIGRATIONS: list[list[str]] = [
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
assert len(MIGRATIONS) == SCHEMA_VERSION

INSERT_RUN = ("INSERT INTO runs (run_id, model, data, created_at, updated_at, status, config_json,"
              " summary_json, host, parent_run, notes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
INSERT_METRICS = (f"INSERT OR REPLACE INTO metrics (run_id, epoch, {', '.join(METRIC_COLUMNS)},"
                  f" extra_json, logged_at) VALUES (?, ?, {', '.join('?' * len(METRIC_COLUMNS))}, ?, ?)")
INSERT_CHECKPOINT = ("INSERT OR REPLACE INTO checkpoints (run_id, epoch, path, sha256, size, created_at)"
                     " VALUES (?, ?, ?, ?, ?, ?)")
INSERT_PROBE = ("INSERT INTO probes (probe_id, run_id, model, kind, checkpoint_epoch, created_at, status,"
                " params_json, summary_json, artifact, artifact_sha256, artifact_size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
INSERT_FINDING = ("INSERT INTO findings (finding_id, experiment, name, created_at, payload_json)"
                  " VALUES (?, ?, ?, ?, ?)")


def create_schema(con: sqlite3.Connection, version: int = 0, target: int = SCHEMA_VERSION) -> None:
    """Bring a catalog from ``version`` (0: no tables) to ``target`` (in the caller's transaction)."""
    if version == 0:
        con.execute(SCHEMA_VERSION_TABLE)
    for step in range(version, target):
        for statement in MIGRATIONS[step]:
            con.execute(statement)
    con.execute("DELETE FROM schema_version")
    con.execute("INSERT INTO schema_version (version) VALUES (?)", (target,))


@functools.lru_cache(maxsize=None)
def expected_columns(version: int = SCHEMA_VERSION) -> dict[str, frozenset[str]]:
    """Table -> column names of a catalog of ``version`` (built once in memory from the migrations)."""
    con = sqlite3.connect(":memory:")
    try:
        create_schema(con, target=version)
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: frozenset(r[1] for r in con.execute(f"PRAGMA table_info({t})")) for t in tables}
    finally:
        con.close()
