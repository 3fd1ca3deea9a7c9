"""The probe results of a :class:`~probe.store.RunStore`: their catalog rows, their arrays
(``probes/<probe_id>.npz``, loaded with ``allow_pickle=False`` after their sha256 and size match)
and their sidecars (``probes/<probe_id>.json``, the row's fields, for the rebuild).

Probe artifacts live in one flat ``probes/`` folder whether or not the probe belongs to a run, because
a probe on an untrained model (``--model NAME``) has no run folder; the catalog row links it to its run.
"""
from __future__ import annotations

import contextlib
import difflib
import io
import json
import operator
import secrets
import sqlite3
import time
from typing import Any, Mapping

from probe.errors import UserError
from probe.store.atomic import write_npz
from probe.store.files import load_npz
from probe.store.records import (PROBE_FIELDS, check_id, dumps, first_problem, parse_json, probe_params, probe_rel,
                                 select_where, sha256_hex, show, slugify, utc_now, valid_id)
from probe.store.runs import RunsMixin
from probe.store.schema import INSERT_PROBE, STATUSES

__all__ = ["ProbesMixin"]


def _probe_id_for(kind: str, model: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stamp}-{slugify(kind, 'probe')}-{slugify(model, 'model')}-{secrets.token_hex(4)}"


class ProbesMixin(RunsMixin):
    """Probe results, on a run or on a bare model, for :class:`~probe.store.RunStore`."""

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
            rows = self._read("SELECT model FROM runs WHERE run_id = ?", (check_id(run_id),))
            if not rows:
                raise self._unknown_run(run_id)
            model = model if model is not None else rows[0]["model"]
        if model is None:
            raise UserError("a probe needs a model name or a run")
        probe_id = _probe_id_for(kind, model)
        fields = {"probe_id": probe_id, "run_id": run_id, "model": str(model), "kind": str(kind),
                  "checkpoint_epoch": None if checkpoint_epoch is None else operator.index(checkpoint_epoch),
                  "created_at": utc_now(), "status": status, "params": json.loads(dumps(params)),
                  "summary": json.loads(dumps(summary)), "artifact_sha256": None, "artifact_size": None}
        written = []
        try:
            if arrays:
                buf = io.BytesIO()
                write_npz(buf, arrays)
                data = buf.getvalue()
                written.append(self._put(probe_rel(probe_id), data))
                fields.update(artifact_sha256=sha256_hex(data), artifact_size=len(data))
            written.append(self._put(probe_rel(probe_id, ".json"),
                                     (json.dumps(fields, indent=2) + "\n").encode()))
            with self._write() as con:
                con.execute(INSERT_PROBE, probe_params(fields))
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
        d = {k: row[k] for k in PROBE_FIELDS if k not in ("params", "summary")}
        d["params"], d["summary"] = parse_json(row["params_json"]), parse_json(row["summary_json"])
        problem = first_problem(d, PROBE_FIELDS)
        expected = probe_rel(d["probe_id"]) if problem is None and d["artifact_sha256"] else None
        if problem is None and row["artifact"] != expected:
            problem = f"artifact {show(row['artifact'])} is not {probe_rel(d['probe_id'])}"
        if problem:
            raise self._row_error("probe", show(row["probe_id"]), problem)
        sha, size = d.pop("artifact_sha256"), d.pop("artifact_size")
        d["artifact"] = str(self.root / probe_rel(d["probe_id"])) if sha else None
        return d, sha, size

    def _probe_row(self, probe_id: str) -> tuple[dict[str, Any], str | None, int | None]:
        check_id(probe_id, "probe")
        rows = self._read("SELECT * FROM probes WHERE probe_id = ?", (probe_id,))
        if not rows:
            ids = [r["probe_id"] for r in self._read("SELECT probe_id FROM probes")
                   if valid_id(r["probe_id"])]
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
        sql, args = select_where("probes", run_id=None if run_id is None else self.resolve_run(run_id), kind=kind,
                                 model=model)
        rows = self._read(sql + " ORDER BY created_at, rowid", args)
        return self._listing(rows, lambda r: self._probe_record(r)[0])

    def load_probe_arrays(self, probe_id: str) -> dict[str, Any]:
        """The arrays saved with a probe (an empty dict when it saved none).

        Loaded with ``allow_pickle=False`` after checking size and sha256 against the catalog;
        a missing, truncated, altered or malformed file raises :class:`~probe.errors.StoreError`.
        """
        d, sha, size = self._probe_row(probe_id)
        if not sha:
            return {}
        data = self._get(probe_rel(probe_id), "probe artifact", size, sha, "run the probe again")
        return load_npz(data, d["artifact"])
