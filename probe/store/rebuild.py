"""Rebuilding the catalog from the run folders, probe sidecars and finding files, the source of
truth for what exists (:meth:`probe.store.RunStore.rebuild_catalog`, ``probe runs --rebuild-catalog``)."""
from __future__ import annotations

import contextlib
import io
import json
import operator
import os
import re
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from probe.errors import DiskFullError, StoreError
from probe.store.atomic import disk_errors, fsync_dir, no_space_message, temp_file
from probe.store.catalog import CATALOG_NAME, Catalog
from probe.store.findings import FINDING_MAX_BYTES, load_finding_payload
from probe.store.records import (FINDING_FIELDS, PROBE_FIELDS, checkpoint_rel, dumps, error_line, finding_rel,
                                 first_problem, is_int, is_obj, is_str, metric_values, mtime_stamp, parse_json,
                                 probe_params, probe_rel, sha256_hex, show, show_path, valid_id)
from probe.store.schema import (INSERT_CHECKPOINT, INSERT_FINDING, INSERT_METRICS, INSERT_PROBE, INSERT_RUN,
                                METRIC_COLUMNS, create_schema)

__all__ = ["rebuild_catalog"]


def rebuild_catalog(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Rebuild ``catalog.sqlite`` from the run folders, probe sidecars and finding files (the source
    of truth).

    Runs come from ``runs/<id>/config.json`` (model and data from ``config["model"]`` /
    ``config["data"]``); checkpoints from ``runs/<id>/checkpoints/epoch_NNNN.pt`` that load with
    ``weights_only=True`` (sha256 and size recomputed); the highest such checkpoint gives the
    summary (``best_acc``, ``best_epoch``, its epoch), the metrics table (its ``metrics`` list,
    when present) and the status (``finished`` once its epoch reaches ``config["epochs"]``, else
    ``interrupted``); probes come from ``probes/<id>.json`` with their ``.npz`` checked (a probe
    whose run is gone keeps run_id ``None``); findings from ``findings/<id>.json`` (a JSON object
    with the finding's fields and a payload object with a ``kind``). The new catalog is built in a
    temp file and renamed
    in place; the old one (with its -wal / -shm) is moved to ``catalog.sqlite.broken-<UTC stamp>``,
    never deleted. Run it while no other process uses the root.

    Returns ``{"runs", "checkpoints", "metrics", "probes", "findings": counts restored, "skipped": [one line
    per item left out, with the reason], "old_catalog": path or None, "catalog": path}``.
    """
    store = Catalog.__new__(Catalog)  # the root and its catalog, none of the store's rows
    store._attach(root, readonly=False)
    for suffix in ("", "-wal", "-shm"):
        store._inside(CATALOG_NAME + suffix)
    fd, tmp = temp_file(store.root, CATALOG_NAME)
    try:
        with disk_errors(tmp):
            con = sqlite3.connect(tmp, isolation_level=None)
            try:
                con.execute("PRAGMA journal_mode = MEMORY")  # no journal file beside the temp
                con.execute("BEGIN")
                create_schema(con)
                report = _restore(store, con)
                con.execute("COMMIT")
            finally:
                con.close()
            os.fsync(fd)
            report["old_catalog"] = _move_catalog_aside(store)
            os.replace(tmp, store.catalog_path)
        fsync_dir(store.root)
    except sqlite3.Error as e:
        if "disk is full" in str(e).lower():
            raise DiskFullError(no_space_message(tmp)) from None
        raise StoreError(f"cannot build the new catalog {tmp} ({e})") from None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
    store._open_catalog()  # WAL mode, and a last check of what was built
    store.close()
    report["catalog"] = str(store.catalog_path)
    return report

def _move_catalog_aside(store: Catalog) -> str | None:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = store.root / f"{CATALOG_NAME}.broken-{stamp}"
    moved = None
    for suffix in ("", "-wal", "-shm"):  # the same suffixes: SQLite finds the moved WAL again
        src = Path(f"{store.catalog_path}{suffix}")
        if src.exists() or src.is_symlink():
            os.rename(src, f"{aside}{suffix}")
            moved = str(aside)
    return moved

def _restore(store: Catalog, con: sqlite3.Connection) -> dict[str, Any]:
    """Insert what the run folders and probe sidecars hold into the new catalog ``con``."""
    report: dict[str, Any] = {"runs": 0, "checkpoints": 0, "metrics": 0, "probes": 0, "findings": 0,
                              "skipped": []}
    skip = report["skipped"].append
    restored = set()
    for name in _scan(store, "runs", skip):
        counts = _restore_run(store, con, name, skip)
        if counts is not None:
            restored.add(name)
            report["runs"] += 1
            report["checkpoints"] += counts[0]
            report["metrics"] += counts[1]
    files = set(_scan(store, "probes", skip))
    for file in sorted(files):
        stem, suffix = os.path.splitext(file)
        if suffix == ".npz" and f"{stem}.json" not in files:
            skip(f"{show_path('probes/' + file)}: no sidecar .json (written before sidecars); "
                 "not restored")
        elif suffix == ".json" and _restore_probe(store, con, stem, restored, skip):
            report["probes"] += 1
    for file in _scan(store, "findings", skip):
        stem, suffix = os.path.splitext(file)
        if suffix == ".json" and _restore_finding(store, con, stem, skip):
            report["findings"] += 1
    return report

def _restore_run(store: Catalog, con: sqlite3.Connection, name: str,
                 skip: Callable[[str], None]) -> tuple[int, int] | None:
    """Insert the run folder ``runs/<name>``: (checkpoints, metrics rows), None if left out."""
    import torch

    folder = f"runs/{name}"
    if not valid_id(name):
        skip(f"{show_path(folder)}: not a valid run id; not restored")
        return None
    try:
        if not store._inside(folder).is_dir():
            return None
        config = parse_json(store._get(f"{folder}/config.json", "run config"))
    except StoreError as e:
        skip(f"{folder}: {e}; not restored")
        return None
    if not is_obj(config) or not is_str(config.get("model")):
        skip(f"{folder}/config.json: not a JSON object with a 'model' name; run not restored")
        return None
    checkpoints, best = [], None  # best: (epoch, what the summary needs of it, its time)
    for file in _scan(store, f"{folder}/checkpoints", skip):
        m = re.fullmatch(r"epoch_(\d{4,})\.pt", file)
        rel = f"{folder}/checkpoints/{file}"
        if not m or checkpoint_rel(name, int(m[1])) != rel:
            continue
        try:
            data = store._get(rel, "checkpoint")
            ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(ck, dict):
                raise TypeError(f"a {type(ck).__name__}, not a dict")
        except Exception as e:  # noqa: BLE001 - any defect: leave this checkpoint out
            skip(f"{rel}: does not load ({error_line(e)}); not restored")
            continue
        epoch, stamp = int(m[1]), mtime_stamp(store.root / rel)
        checkpoints.append((name, epoch, rel, sha256_hex(data), len(data), stamp))
        if best is None or epoch > best[0]:
            best = (epoch, {k: ck[k] for k in ("best_acc", "best_epoch", "metrics") if k in ck}, stamp)
    created = updated = mtime_stamp(store.root / folder / "config.json")
    metrics, summary, status = [], {}, "interrupted"
    if best is not None:
        epoch, kept, updated = best
        for entry in kept.pop("metrics", None) or []:
            try:
                entry = dict(entry)
                metrics.append((name, operator.index(entry.pop("epoch")), *metric_values(entry), updated))
            except Exception as e:  # noqa: BLE001 - a malformed entry is left out
                skip(f"{folder}: a metrics entry in checkpoint epoch {epoch} is malformed "
                     f"({error_line(e)}); left out")
        metrics.sort(key=operator.itemgetter(1))
        try:
            summary = json.loads(dumps(kept))
        except TypeError:
            skip(f"{folder}: best_acc / best_epoch of checkpoint epoch {epoch} are not numbers; left out")
        summary["epochs_done"] = epoch
        if metrics:
            summary["final_acc"] = metrics[-1][2 + METRIC_COLUMNS.index("test_top1")]
        epochs = config.get("epochs")
        status = "finished" if is_int(epochs) and epoch >= epochs else "interrupted"
    data = config.get("data") if is_str(config.get("data")) else None
    con.execute(INSERT_RUN, (name, config["model"], data, created, updated, status, dumps(config),
                             dumps(summary), None, None, None))
    con.executemany(INSERT_CHECKPOINT, checkpoints)
    con.executemany(INSERT_METRICS, metrics)
    return len(checkpoints), len(metrics)

def _restore_probe(store: Catalog, con: sqlite3.Connection, probe_id: str, runs: set[str],
                   skip: Callable[[str], None]) -> bool:
    """Insert the probe of the sidecar ``probes/<probe_id>.json`` if it and its arrays check out."""
    rel = show_path(probe_rel(probe_id, ".json"))
    try:
        fields = parse_json(store._get(probe_rel(probe_id, ".json"), "probe sidecar"))
        problem = (first_problem(fields, PROBE_FIELDS) if is_obj(fields) else
                   f"not a JSON object ({show(fields)})")
        if problem is None and fields["probe_id"] != probe_id:
            problem = f"probe_id {show(fields['probe_id'])} is not the file's name"
        if problem:
            raise StoreError(problem)
        if fields["artifact_sha256"]:
            store._get(probe_rel(probe_id), "probe artifact", fields["artifact_size"],
                       fields["artifact_sha256"], "run the probe again")
    except StoreError as e:
        skip(f"{rel}: {e}; probe not restored")
        return False
    if fields["run_id"] not in runs:
        fields["run_id"] = None
    con.execute(INSERT_PROBE, probe_params(fields))
    return True

def _restore_finding(store: Catalog, con: sqlite3.Connection, finding_id: str,
                     skip: Callable[[str], None]) -> bool:
    """Insert the finding of the file ``findings/<finding_id>.json`` if it checks out."""
    rel = finding_rel(finding_id)
    try:
        if not valid_id(finding_id):
            raise StoreError("not a valid finding id")
        size = os.stat(store._inside(rel)).st_size
        if size > FINDING_MAX_BYTES + 4096:
            raise StoreError(f"{size} bytes, over the {FINDING_MAX_BYTES // 2**20} MiB limit of a finding")
        fields = load_finding_payload(_json_text(store._get(rel, "finding")))
        problem = (first_problem(fields, FINDING_FIELDS) if is_obj(fields) else
                   f"not a JSON object ({show(fields)})")
        payload = fields.get("payload") if problem is None else None
        if problem is None and fields["finding_id"] != finding_id:
            problem = f"finding_id {show(fields['finding_id'])} is not the file's name"
        elif problem is None and not (is_obj(payload) and is_str(payload.get("kind"))):
            problem = "its payload is not a JSON object with a kind"
        if problem:
            raise StoreError(problem)
        text = json.dumps(payload, allow_nan=False)
    except (StoreError, OSError, RecursionError) as e:
        why = e if isinstance(e, StoreError) else error_line(e)
        skip(f"{show_path(rel)}: {why}; finding not restored")
        return False
    con.execute(INSERT_FINDING, (finding_id, fields["experiment"], fields["name"], fields["created_at"], text))
    return True


def _json_text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _scan(store: Catalog, rel: str, skip: Callable[[str], None]) -> list[str]:
    """Sorted names in the folder ``root/rel`` but temp files ([] when absent; a folder that
    leads out of the root is reported to ``skip``)."""
    try:
        with os.scandir(store._inside(rel)) as entries:
            return sorted(e.name for e in entries
                          if not (e.name.startswith(".") and e.name.endswith(".tmp")))
    except StoreError as e:
        skip(f"{rel}: {e}")
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as e:
        skip(f"{rel}: cannot be listed ({e.strerror or e})")
    return []
