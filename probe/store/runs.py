"""The runs of a :class:`~probe.store.RunStore`: their catalog rows and ``config.json``, their
per-epoch metrics and their checkpoints (``runs/<run_id>/checkpoints/epoch_NNNN.pt``, recorded
with their sha256 and size once the file is in place, both checked on every load).

Run references: functions that only read accept a reference (the full run id, a unique prefix of it,
or ``"last"`` / ``"latest"`` for the most recently created run); functions that write need the full id.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import io
import json
import operator
import pickle
import secrets
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Mapping

from probe.errors import DiskFullError, StoreError, UserError
from probe.store.catalog import Catalog
from probe.store.files import RESERVE_NAME
from probe.store.records import (CHECKPOINT_FIELDS, METRIC_FIELDS, RUN_FIELDS, check_id, checkpoint_rel, dumps,
                                 error_line, first_problem, is_obj, metric_values, parse_json, select_where,
                                 sha256_hex, show, slugify, to_jsonable, utc_now, valid_id)
from probe.store.schema import INSERT_CHECKPOINT, INSERT_METRICS, INSERT_RUN, METRIC_COLUMNS, STATUSES

__all__ = ["RunsMixin"]


def _run_id_for(model: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stamp}-{slugify(model, 'model')}-{secrets.token_hex(3)}"


class RunsMixin(Catalog):
    """Runs, their metrics and their checkpoints, for :class:`~probe.store.RunStore`."""

    # ---- runs ----------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        """Folder of a run (``<root>/runs/<run_id>``); ``run_id`` must be a full id."""
        return self._inside(f"runs/{check_id(run_id)}")

    def new_run(self, model: str, data: str | None, config: Mapping[str, Any] | None = None, *,
                parent_run: str | None = None, notes: str | None = None) -> str:
        """Register a new run with status ``running`` and return its id.

        The id reads ``YYYYmmdd-HHMMSS-<model>-<6 hex>`` (UTC time); it is unique across processes
        (its folder is created exclusively). ``config`` is stored in the catalog and written to
        ``runs/<run_id>/config.json``.
        """
        config_json = dumps(config)
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
            now = utc_now()
            with self._write() as con:
                con.execute(INSERT_RUN, (run_id, str(model), data, now, now, "running", config_json,
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
        check_id(run_id)
        if status is not None and status not in STATUSES:
            raise UserError(f"unknown run status {status!r}; use one of {', '.join(STATUSES)}")
        with self._write() as con:
            row = con.execute("SELECT summary_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise self._unknown_run(run_id)
            merged = parse_json(row["summary_json"])
            if not is_obj(merged):
                raise self._row_error("run", show(run_id), f"summary is {show(merged)}")
            merged.update(to_jsonable(dict(summary or {})))
            con.execute(
                "UPDATE runs SET status = COALESCE(?, status), summary_json = ?,"
                " error = COALESCE(?, error), notes = COALESCE(?, notes), updated_at = ?"
                " WHERE run_id = ?",
                (status, dumps(merged), error, notes, utc_now(), run_id))

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

    def resolve_run(self, ref: str) -> str:
        """Full run id for a reference: a full id, a unique prefix, or ``"last"`` / ``"latest"``.

        Catalog rows whose id is not a valid run id are never returned."""
        ref = str(ref).strip()
        if ref.lower() in ("last", "latest"):
            rows = self._read("SELECT run_id FROM runs ORDER BY created_at DESC, rowid DESC")
            for row in rows:
                if valid_id(row["run_id"]):
                    return row["run_id"]
            raise UserError(f"no runs yet in {self.root}; train one first (probe train ...)")
        if not valid_id(ref):
            raise UserError(f"invalid run reference {show(ref)}: give a run id, a unique prefix of "
                            "one, or 'last' (ids hold letters, digits, '.', '_' and '-')")
        if self._read("SELECT 1 FROM runs WHERE run_id = ?", (ref,)):
            return ref
        rows = [r for r in self._read("SELECT run_id FROM runs WHERE substr(run_id, 1, ?) = ?"
                                      " ORDER BY created_at", (len(ref), ref)) if valid_id(r["run_id"])]
        if len(rows) == 1:
            return rows[0]["run_id"]
        if len(rows) > 1:
            shown = ", ".join(r["run_id"] for r in rows[:8])
            raise UserError(f"run prefix {ref!r} matches {len(rows)} runs ({shown}); "
                            "give more characters")
        raise self._unknown_run(ref)

    def _unknown_run(self, ref: str) -> UserError:
        ids = [r["run_id"] for r in self._read("SELECT run_id FROM runs ORDER BY created_at")
               if valid_id(r["run_id"])]
        if not ids:
            return UserError(f"unknown run {ref!r}: no runs yet in {self.root}")
        near = [i for i in ids if ref and ref in i][-5:]
        near += [i for i in difflib.get_close_matches(ref, ids, n=5, cutoff=0.6) if i not in near]
        hint = f"close matches: {', '.join(near)}" if near else "list them with `probe runs`"
        return UserError(f"unknown run {ref!r} in {self.root}; {hint}")

    def _run_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        out = {k: row[k] for k in ("run_id", "model", "data", "created_at", "updated_at", "status",
                                   "error", "host", "parent_run", "notes")}
        out["config"] = parse_json(row["config_json"])
        out["summary"] = parse_json(row["summary_json"])
        problem = first_problem(out, RUN_FIELDS)
        if problem:
            raise self._row_error("run", show(row["run_id"]), problem)
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
        sql, args = select_where("runs", model=model, status=status)
        rows = self._read(sql + " ORDER BY created_at DESC, rowid DESC", args)
        return self._listing(rows, self._run_dict)

    # ---- metrics -------------------------------------------------------------------------------

    def log_epoch(self, run_id: str, epoch: int, **metrics: Any) -> None:
        """Record one epoch's metrics. Names in :data:`METRIC_COLUMNS` get their own column, any
        other name is kept in ``extra_json``. Logging an epoch again replaces that row (a resumed run
        stays consistent)."""
        check_id(run_id)
        epoch = operator.index(epoch)
        values = metric_values(metrics)
        now = utc_now()
        try:
            with self._write() as con:
                con.execute(INSERT_METRICS, (run_id, epoch, *values, now))
                con.execute("UPDATE runs SET updated_at = ? WHERE run_id = ?", (now, run_id))
        except sqlite3.IntegrityError:
            raise self._unknown_run(run_id) from None

    def get_metrics(self, ref: str) -> list[dict[str, Any]]:
        """Per-epoch metrics of a run, ordered by epoch: one flat dict per epoch with ``epoch``, every
        column of :data:`METRIC_COLUMNS` (``None`` where not logged) and the extra metrics.
        Damaged rows are left out and reported in :attr:`skipped`."""
        run_id = self.resolve_run(ref)

        def convert(r: sqlite3.Row) -> dict[str, Any]:
            d = {"epoch": r["epoch"], **{c: r[c] for c in METRIC_COLUMNS}, "extra": parse_json(r["extra_json"])}
            problem = first_problem(d, METRIC_FIELDS)
            if problem:
                raise self._row_error("metrics row", f"{run_id} epoch {show(r['epoch'])}", problem)
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

        check_id(run_id)
        epoch = operator.index(epoch)
        if epoch < 0:
            raise UserError(f"checkpoint epoch must be >= 0, got {epoch}")
        rows = self._read("SELECT config_json FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise self._unknown_run(run_id)
        config = parse_json(rows[0]["config_json"])
        if not is_obj(config):
            raise self._row_error("run", show(run_id), f"config is {show(config)}")
        state = dict(state)
        state.setdefault("run_id", run_id)
        state.setdefault("epoch", epoch)
        state.setdefault("config", config)
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        rel = checkpoint_rel(run_id, epoch)
        path = self._put(rel, data)
        with self._write() as con:
            con.execute(INSERT_CHECKPOINT, (run_id, epoch, rel, sha256_hex(data), len(data), utc_now()))
        return path

    def _checkpoint_dict(self, run_id: str, r: sqlite3.Row) -> dict[str, Any]:
        d = {k: r[k] for k in CHECKPOINT_FIELDS}
        ident = f"{run_id} epoch {show(r['epoch'])}"
        problem = first_problem(d, CHECKPOINT_FIELDS)
        if problem is None and d["path"] != checkpoint_rel(run_id, d["epoch"]):
            problem = f"path {show(d['path'])} is not {checkpoint_rel(run_id, d['epoch'])}"
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
        data = self._get(checkpoint_rel(run_id, epoch), "checkpoint", rec["size"], rec["sha256"],
                         "re-save it or train again")
        path = rec["path"]
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            raise StoreError(f"checkpoint {path} was refused: it is not a plain tensor checkpoint "
                             "(its pickle asks for code or objects; nothing was run)") from None
        except Exception as e:  # noqa: BLE001 - whatever the defect, the file is unusable
            raise StoreError(f"checkpoint {path} is corrupt or truncated ({error_line(e)})") from None
