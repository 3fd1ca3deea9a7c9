"""Results out of the catalog, to the tools people already use: a run's per-epoch metrics and its
probes' numbers as CSV files or TensorBoard event files, and a run's metrics as a pandas DataFrame.

CSV (:func:`export_run` with ``fmt="csv"``), into ``out``:

* ``<run_id>_metrics.csv``: one row per epoch, the columns of ``RunStore.get_metrics``;
* ``<probe_id>_summary.csv``: ``key,value`` rows of the probe's summary numbers (nested entries
  as ``a.b``, list entries as ``a.0``, ``a.1``, ...), with its kind, model, run and epoch first;
* ``<probe_id>_<array>.csv``: each numeric array the probe stored (a vector as one ``value``
  column with its ``index``; a matrix as its rows), up to :data:`MAX_CSV_ELEMENTS` elements
  (larger ones, e.g. eigenvectors of a big model, are listed as left out).

TensorBoard (``fmt="tensorboard"``, needs the ``tensorboard`` package, an optional extra), under
``out/<run_id>``: every metric as a scalar ``metrics/<name>`` by epoch, every probe summary number
as ``<kind>/<key>`` at its checkpoint's epoch, and every numeric 1-D array (the spectra) as a
histogram ``<kind>/<array>`` at that epoch.

The CSV files are written atomically; the event files are written by TensorBoard's own writer.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from probe.errors import UserError
from probe.store.atomic import atomic_write_text

__all__ = ["export_run", "run_metrics_frame", "flatten_summary", "EXPORT_FORMATS", "MAX_CSV_ELEMENTS"]

EXPORT_FORMATS = ("csv", "tensorboard")

#: Largest array written as a CSV file (elements).
MAX_CSV_ELEMENTS = 10 ** 6

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _number(v: Any) -> float | int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return v.item() if isinstance(v, np.generic) else v
    return None


def flatten_summary(summary: Any, prefix: str = "") -> dict[str, Any]:
    """A summary's plain values by dotted key: ``{"trace": {"estimate": 3.0}}`` gives
    ``{"trace.estimate": 3.0}``, a list ``[1, 2]`` under ``top`` gives ``top.0``, ``top.1``."""
    out: dict[str, Any] = {}
    if isinstance(summary, dict):
        for k, v in summary.items():
            out.update(flatten_summary(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(summary, (list, tuple)):
        for i, v in enumerate(summary):
            out.update(flatten_summary(v, f"{prefix}.{i}" if prefix else str(i)))
    elif prefix:
        out[prefix] = summary
    return out


def run_metrics_frame(store, run: str):
    """A run's per-epoch metrics as a pandas DataFrame, indexed by epoch (one column per metric)."""
    import pandas as pd

    rows = store.get_metrics(store.resolve_run(run))
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["epoch"]).set_index("epoch")
    return frame.set_index("epoch").sort_index()


def _csv_text(rows: Iterable[Iterable[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def _probes(store, run_id: str | None, probe_ids: list[str] | None) -> list[dict]:
    if probe_ids:
        rows = [store.get_probe(p) for p in probe_ids]
        if run_id is not None:
            for r in rows:
                if r["run_id"] != run_id:
                    raise UserError(f"probe {r['probe_id']} belongs to {r['run_id'] or 'no run'}, not run {run_id}")
        return rows
    return store.list_probes(run_id=run_id) if run_id is not None else []


def _arrays(store, probe_id: str) -> dict[str, np.ndarray]:
    out = {}
    for name, arr in store.load_probe_arrays(probe_id).items():
        arr = np.asarray(arr)
        if arr.dtype.kind in "biuf" and arr.ndim in (1, 2):
            out[name] = arr
    return out


def export_run(store, run: str | None = None, out: str | os.PathLike = ".", *, fmt: str = "csv",
               probe_ids: list[str] | None = None) -> dict[str, Any]:
    """Write run ``run``'s per-epoch metrics and its probes' numbers (only ``probe_ids`` when
    given; without ``run`` just those probes) to ``out`` as ``fmt`` (``"csv"`` or
    ``"tensorboard"``; see the module docstring). Returns ``{"files": paths written,
    "left_out": arrays not written, one line each}``."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"export format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    if run is None and not probe_ids:
        raise UserError("give a run or at least one probe id to export")
    run_id = store.resolve_run(run) if run is not None else None
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: a file, not a folder to export into")
    metrics = store.get_metrics(run_id) if run_id is not None else []
    probes = _probes(store, run_id, probe_ids)
    if fmt == "tensorboard":
        return _tensorboard(store, run_id, out, metrics, probes)
    files, left_out = [], []
    try:
        out.mkdir(parents=True, exist_ok=True)
        if run_id is not None:
            cols = ["epoch"] + sorted({k for row in metrics for k in row} - {"epoch"},
                                      key=lambda k: (k not in _METRIC_ORDER, _METRIC_ORDER.get(k, 0), k))
            files.append(atomic_write_text(out / f"{run_id}_metrics.csv",
                                           _csv_text([cols, *([row.get(c) for c in cols] for row in metrics)])))
        for p in probes:
            head = [("kind", p["kind"]), ("model", p["model"]), ("run_id", p["run_id"]),
                    ("checkpoint_epoch", p["checkpoint_epoch"])]
            flat = [(k, v) for k, v in flatten_summary(p["summary"]).items()
                    if v is None or isinstance(v, (str, int, float, bool))]
            files.append(atomic_write_text(out / f"{p['probe_id']}_summary.csv",
                                           _csv_text([("key", "value"), *head, *flat])))
            for name, arr in _arrays(store, p["probe_id"]).items():
                if arr.size > MAX_CSV_ELEMENTS:
                    left_out.append(f"{p['probe_id']} {name}: {arr.shape} has more than {MAX_CSV_ELEMENTS} elements")
                    continue
                rows = ([("index", "value"), *enumerate(arr.tolist())] if arr.ndim == 1 else arr.tolist())
                files.append(atomic_write_text(out / f"{p['probe_id']}_{_SAFE.sub('_', name)}.csv", _csv_text(rows)))
    except OSError as e:
        raise UserError(f"cannot write into {out} ({e.strerror or e})") from None
    return {"files": [str(f) for f in files], "left_out": left_out}


_METRIC_ORDER = {name: i for i, name in enumerate(
    ("train_loss", "train_top1", "train_top5", "test_loss", "test_top1", "test_top5", "lr", "epoch_time_s"))}


def _tensorboard(store, run_id, out: Path, metrics: list[dict], probes: list[dict]) -> dict[str, Any]:
    try:
        import tensorboard  # noqa: F401  (torch's writer needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("TensorBoard export needs the tensorboard package (pip install tensorboard); "
                        "--format csv needs nothing more") from None
    folder = out / (run_id or "probes")
    try:
        writer = SummaryWriter(log_dir=str(folder))
    except OSError as e:
        raise UserError(f"cannot write into {folder} ({e.strerror or e})") from None
    try:
        for row in metrics:
            for k, v in row.items():
                num = _number(v)
                if k != "epoch" and num is not None and math.isfinite(num):
                    writer.add_scalar(f"metrics/{k}", num, int(row["epoch"]))
        for p in probes:
            step = int(p["checkpoint_epoch"] or 0)
            for k, v in flatten_summary(p["summary"]).items():
                num = _number(v)
                if num is not None and math.isfinite(num):
                    writer.add_scalar(f"{p['kind']}/{k}", num, step)
            for name, arr in _arrays(store, p["probe_id"]).items():
                finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
                if arr.ndim == 1 and finite.size:
                    writer.add_histogram(f"{p['kind']}/{name}", finite.astype(np.float64), step)
        writer.flush()
    finally:
        writer.close()
    files = sorted(str(f) for f in folder.glob("events.out.tfevents.*"))
    return {"files": files, "left_out": []}
