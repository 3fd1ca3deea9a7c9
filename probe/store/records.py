"""What the store writes and reads back: plain JSON values, ids and the paths derived from them,
and the checks a catalog row or a sidecar file must pass before it is used.

JSON convention: dicts stored in the catalog (config, summary, params, extra metrics) go through
:func:`to_jsonable`: numpy / torch scalars and arrays become Python numbers and lists, and non-finite
floats (NaN, +-inf) become ``None``; the stored text is strict JSON. Metric columns follow the same
rule (a NaN loss is stored as NULL and read back as ``None``).

Everything read from a runs root is data: a row's fields are checked against a spec
(:data:`RUN_FIELDS`, :data:`PROBE_FIELDS`, ...) by :func:`first_problem`, and :func:`show` /
:func:`show_path` put hostile text into a one-line message escaped and cut.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, Callable, Mapping

from probe.errors import UserError, first_line
from probe.store.schema import METRIC_COLUMNS, STATUSES

__all__ = ["select_where", "to_jsonable", "dumps", "BAD_JSON", "parse_json", "show", "error_line", "show_path", "utc_now",
           "mtime_stamp", "slugify", "metric_values", "sha256_hex", "valid_id", "check_id", "checkpoint_rel",
           "probe_rel", "finding_rel", "is_str", "is_int", "is_count", "is_obj", "RUN_FIELDS",
           "CHECKPOINT_FIELDS", "METRIC_FIELDS", "FINDING_FIELDS", "PROBE_FIELDS", "first_problem",
           "probe_params"]


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


def dumps(obj: Any) -> str:
    """Strict JSON text of ``obj`` (``None`` -> ``{}``) after :func:`to_jsonable`."""
    return json.dumps(to_jsonable(obj if obj is not None else {}), allow_nan=False)


BAD_JSON = object()  # what parse_json() returns for text that is not JSON


def parse_json(text: Any) -> Any:
    """Parsed JSON text from the catalog or a file; ``BAD_JSON`` when it is not JSON."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return BAD_JSON
    if not isinstance(text, str):
        return BAD_JSON
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return BAD_JSON


def show(value: Any) -> str:
    """A value for a one-line message (hostile text is escaped and cut)."""
    if value is BAD_JSON:
        return "not valid JSON"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def error_line(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for a one-line error."""
    line = first_line(e, default="")
    return f"{type(e).__name__}: {line[:200]}" if line else type(e).__name__


def show_path(rel: str) -> str:
    """A relative path for a message: as it is when plain, else quoted and escaped."""
    return rel if rel.isascii() and rel.isprintable() and " " not in rel else show(rel)


def utc_now() -> str:
    """UTC time stamp, ISO 8601 with microseconds; sorts as text."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def mtime_stamp(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="microseconds")


def slugify(text: str, fallback: str) -> str:
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


def metric_values(metrics: Mapping[str, Any]) -> tuple:
    """``(*METRIC_COLUMNS values, extra_json)`` for one epoch's metrics (see log_epoch)."""
    metrics = dict(metrics)
    cols = [_metric_value(name, metrics.pop(name, None)) for name in METRIC_COLUMNS]
    return (*cols, dumps(metrics))


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


# ids and catalog rows

_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def valid_id(value: Any) -> bool:
    """A run or probe id: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` and no ``..``: a plain file name."""
    return isinstance(value, str) and _ID_PATTERN.fullmatch(value) is not None and ".." not in value


def check_id(value: Any, kind: str = "run") -> str:
    if not valid_id(value):
        raise UserError(f"invalid {kind} id {show(value)}: ids are 1-128 letters, digits, '.', '_' "
                        "or '-', start with a letter or digit and hold no '..'")
    return value


def checkpoint_rel(run_id: str, epoch: int) -> str:
    return f"runs/{run_id}/checkpoints/epoch_{epoch:04d}.pt"


def probe_rel(probe_id: str, suffix: str = ".npz") -> str:
    return f"probes/{probe_id}{suffix}"


def finding_rel(finding_id: str) -> str:
    return f"findings/{finding_id}.json"


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def is_str(v: Any) -> bool:
    return isinstance(v, str)


def is_int(v: Any) -> bool:
    return type(v) is int


def is_count(v: Any) -> bool:
    return type(v) is int and v >= 0


def is_obj(v: Any) -> bool:
    return isinstance(v, dict)


def _is_status(v: Any) -> bool:
    return isinstance(v, str) and v in STATUSES


def _is_sha(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def _is_number(v: Any) -> bool:
    return v is None or type(v) in (int, float)


RUN_FIELDS = {"run_id": valid_id, "model": is_str, "data": _opt(is_str), "created_at": is_str,
              "updated_at": is_str, "status": _is_status, "error": _opt(is_str),
              "host": _opt(is_str), "parent_run": _opt(is_str), "notes": _opt(is_str),
              "config": is_obj, "summary": is_obj}
CHECKPOINT_FIELDS = {"epoch": is_count, "path": is_str, "sha256": _is_sha, "size": is_count,
                     "created_at": is_str}
METRIC_FIELDS = {"epoch": is_int, **{c: _is_number for c in METRIC_COLUMNS}, "extra": is_obj}
#: A finding's fields but its payload, as in its file ``findings/<finding_id>.json``.
FINDING_FIELDS = {"finding_id": valid_id, "experiment": is_str, "name": is_str, "created_at": is_str}
#: A probe's fields, as in its sidecar ``probes/<probe_id>.json``.
PROBE_FIELDS = {"probe_id": valid_id, "run_id": _opt(valid_id), "model": is_str, "kind": is_str,
                "checkpoint_epoch": _opt(is_int), "created_at": is_str, "status": _is_status,
                "params": is_obj, "summary": is_obj, "artifact_sha256": _opt(_is_sha),
                "artifact_size": _opt(is_count)}


def first_problem(values: Mapping[str, Any], spec: Mapping[str, Callable[[Any], bool]]) -> str | None:
    for key, ok in spec.items():
        if not ok(values.get(key)):
            return f"{key} is {show(values.get(key))}"
    if "artifact_sha256" in spec and (values.get("artifact_sha256") is None) != \
            (values.get("artifact_size") is None):
        return "artifact_sha256 and artifact_size must be given together"
    return None


def probe_params(p: Mapping[str, Any]) -> tuple:
    """The values of :data:`INSERT_PROBE` for validated probe fields ``p``."""
    artifact = probe_rel(p["probe_id"]) if p["artifact_sha256"] else None
    return (p["probe_id"], p["run_id"], p["model"], p["kind"], p["checkpoint_epoch"], p["created_at"],
            p["status"], dumps(p["params"]), dumps(p["summary"]), artifact, p["artifact_sha256"],
            p["artifact_size"])


def select_where(table: str, **filters: Any) -> tuple[str, tuple]:
    """``SELECT * FROM table`` with one ``AND column = ?`` per filter that is not None, and its
    arguments (the table and column names are the store's own, never the caller's)."""
    sql, args = f"SELECT * FROM {table} WHERE 1", []
    for column, value in filters.items():
        if value is not None:
            sql += f" AND {column} = ?"
            args.append(value)
    return sql, tuple(args)
