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

Export (:mod:`probe.store.export`): :func:`export_run` writes a run's per-epoch metrics and its
probes' numbers as CSV or TensorBoard event files, :func:`run_metrics_frame` gives the metrics as a
pandas DataFrame.

JSON convention: dicts stored in the catalog (config, summary, params, extra metrics) go through
:func:`to_jsonable`: numpy / torch scalars and arrays become Python numbers and lists, and non-finite
floats (NaN, +-inf) become ``None``; the stored text is strict JSON. Metric columns follow the same
rule (a NaN loss is stored as NULL and read back as ``None``).

Run references: functions that only read accept a reference (the full run id, a unique prefix of it,
or ``"last"`` / ``"latest"`` for the most recently created run); functions that write need the full id.
"""
from __future__ import annotations

from probe.store.atomic import atomic_savez, atomic_torch_save, atomic_write_bytes, atomic_write_text
from probe.store.export import export_run, run_metrics_frame
from probe.store.files import resolve_runs_root
from probe.store.findings import FINDING_MAX_BYTES
from probe.store.records import to_jsonable
from probe.store.runstore import RunStore, rebuild_catalog
from probe.store.schema import METRIC_COLUMNS, SCHEMA_VERSION, STATUSES

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
    "export_run",
    "run_metrics_frame",
]
