"""The findings of a :class:`~probe.store.RunStore`: an experiment's numbers by name, a JSON object
with a ``kind`` (data for :mod:`probe.figures.findings`, never markup or code), one file
``findings/<finding_id>.json`` each plus its catalog row. A newer finding of the same experiment and
name supersedes the older ones, which are kept.
"""
from __future__ import annotations

import contextlib
import json
import math
import secrets
import sqlite3
import time
from typing import Any, Mapping

from probe.errors import UserError
from probe.store.catalog import Catalog
from probe.store.records import (BAD_JSON, FINDING_FIELDS, finding_rel, first_problem, is_count, show, slugify,
                                 to_jsonable, utc_now)
from probe.store.schema import INSERT_FINDING

__all__ = ["FindingsMixin", "FINDING_MAX_BYTES", "FINDING_NAME_MAX", "load_finding_payload"]

#: Largest payload of one finding (its JSON text, in bytes).
FINDING_MAX_BYTES = 16 * 1024 * 1024
#: Longest experiment or finding name.
FINDING_NAME_MAX = 200


def _check_name(value: Any, what: str) -> str:
    """An experiment or finding name: one line of printable text, 1 to :data:`FINDING_NAME_MAX` long."""
    if not isinstance(value, str) or not value.strip() or len(value) > FINDING_NAME_MAX or \
            not value.isprintable():
        raise UserError(f"invalid {what} {show(value)}: give 1-{FINDING_NAME_MAX} characters of printable "
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
        raise UserError(f"{what}: the payload needs a 'kind' (a string), got {show(obj.get('kind'))}")
    size = len(text.encode())
    if size > FINDING_MAX_BYTES:
        raise UserError(f"{what}: the payload is {size} bytes of JSON, over the "
                        f"{FINDING_MAX_BYTES // 2**20} MiB limit; store fewer rows")
    from probe.store.finding_shapes import FINDING_KINDS, validate_finding

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


def load_finding_payload(text: Any) -> Any:
    """A stored payload's JSON text parsed (NaN, infinities and overflowing numbers become None);
    ``BAD_JSON`` when it is not JSON."""
    if not isinstance(text, str):
        return BAD_JSON
    try:
        return json.loads(text, parse_constant=_finding_constant, parse_float=_finding_float)
    except (ValueError, RecursionError):
        return BAD_JSON


def _finding_label(experiment: Any, name: Any) -> str:
    """``experiment/name`` for a message, hostile text escaped and cut."""
    return f"{_label_part(experiment)}/{_label_part(name)}"


def _label_part(value: Any) -> str:
    if isinstance(value, str) and value.isprintable() and len(value) <= 80:
        return value
    return show(value)


def _finding_id_for(experiment: str, name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stamp}-{slugify(experiment, 'experiment')}-{slugify(name, 'finding')}-{secrets.token_hex(4)}"


class FindingsMixin(Catalog):
    """An experiment's findings, for :class:`~probe.store.RunStore`."""

    # ---- findings ------------------------------------------------------------------------------

    def save_finding(self, experiment: str, name: str, payload: Mapping[str, Any]) -> str:
        """Store one finding of an experiment and return its id
        (``YYYYmmdd-HHMMSS-<experiment>-<name>-<8 hex>``).

        ``payload`` is a dict of JSON-able values (numpy / torch numbers and arrays allowed; NaN and
        infinities become ``None``, see :func:`to_jsonable`) with a string ``kind``; a payload of
        a kind that :mod:`probe.figures.findings` draws must have that kind's shape
        (:func:`~probe.store.finding_shapes.validate_finding`); its JSON may take up to
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
        fields = {"finding_id": finding_id, "experiment": experiment, "name": name, "created_at": utc_now()}
        data = json.dumps({**fields, "payload": obj}, allow_nan=False).encode()
        path = self._put(finding_rel(finding_id), data + b"\n")
        try:
            with self._write() as con:
                con.execute(INSERT_FINDING, (*fields.values(), text))
        except BaseException:  # leave no file without a row
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return finding_id

    def _finding_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        """A finding row as :meth:`list_findings` returns it; a row whose payload is not a JSON object
        with a kind comes with ``payload`` None and a one-line ``error``; a row whose other fields
        are damaged raises StoreError."""
        d = {k: row[k] for k in FINDING_FIELDS}
        problem = first_problem(d, FINDING_FIELDS)
        if problem:
            raise self._row_error("finding", show(row["finding_id"]), problem)
        text, size = row["payload_json"], row["payload_size"]
        payload = BAD_JSON if text is None else load_finding_payload(text)
        if text is None and is_count(size):
            problem = f"its payload is {size} bytes, over the {FINDING_MAX_BYTES // 2**20} MiB limit"
        elif payload is BAD_JSON:
            problem = "its payload is not valid JSON"
        elif not isinstance(payload, dict):
            problem = f"its payload is not a JSON object ({type(payload).__name__})"
        elif not isinstance(payload.get("kind"), str) or not payload["kind"]:
            problem = f"its payload has no kind (kind is {show(payload.get('kind'))})"
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
