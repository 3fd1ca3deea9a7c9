"""What every experiment shares: its context (the run store, the output folder, quick or full, the
jobs that train at once), the training of its runs (:func:`train_many`: reused when the store
already holds a finished run of the same recipe, continued when it holds an unfinished one),
probes through the public runner, and the outputs written atomically.

An experiment is a module with ``NAME``, ``TITLE``, ``DESCRIPTION`` and ``run(ctx) -> Outcome``;
:func:`write_outputs` turns its outcome into ``<out>/<NAME>/``: one ``.html`` page and one plotly
``.json`` per figure, ``numbers.csv`` (one row per measured target, the stored summary's scalar
numbers), ``runs.json`` (the run and probe ids it used, the settings) and, last, ``done.json``
(what a later ``python -m experiments`` reads to skip it).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from probe import UserError
from probe.companions import load

__all__ = ["Context", "Outcome", "find_or_train", "train_many", "cpu_cores", "pair_runs", "probe_rows",
           "probe_figures", "last_entries", "write_outputs", "is_done", "PAIR", "scalars", "fmt"]

#: The comparison pair: the seed's WRN block, fmm01 bn(r) + s against fmm18 bn(r) * bn(s).
PAIR = ("add_resnet", "mul_resnet")


@dataclass
class Context:
    """``store`` the run store, ``out`` the output root, ``quick`` CPU-minutes settings,
    ``log(line)`` and ``progress(desc, done, total)`` for the CLI; ``jobs`` runs trained at once
    by :func:`train_many` (1: one after the other in this process), each on ``threads_per_job``
    torch threads (default: the CPU cores shared out, ``max(1, cores // jobs)``; with one job,
    torch's own count)."""

    store: Any
    out: Path
    quick: bool = True
    log: Callable[[str], None] = lambda line: None
    progress: Callable | None = None
    jobs: int = 1
    threads_per_job: int | None = None


@dataclass
class Outcome:
    """What an experiment measured: ``figures`` {file stem: plotly figure}, ``rows`` (dicts of
    numbers, one per target), the ``run_ids`` and ``probe_ids`` it used, and ``found`` (one line
    per finding, with its numbers); ``tables`` {file stem: rows} more csv files beside
    ``numbers.csv`` (e.g. correlations)."""

    figures: dict
    rows: list[dict]
    run_ids: list[str]
    probe_ids: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    tables: dict = field(default_factory=dict)


def _recipe(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("device",)}


def _key(recipe: dict) -> str:
    return json.dumps(recipe, sort_keys=True, default=str)


def _name(config) -> str:
    """A config in a log or error line: model, fusion, seed, epochs and data."""
    fusion = f" {config.fusion}" if config.fusion else ""
    epochs = f"{config.epochs} epoch{'' if config.epochs == 1 else 's'}"
    return f"{config.model}{fusion} seed {config.seed}, {epochs} on {config.data}"


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def _diverged(run: dict) -> bool:
    """Whether a run stopped on a non-finite loss or weights (:class:`probe.training.TrainingDiverged`)."""
    error = (run.get("error") or "").lower()
    return run["status"] == "failed" and ("diverged" in error or "non-finite" in error)


def _stored_runs(store, configs) -> dict[str, dict[str, str]]:
    """``{recipe: {kind: newest run id}}`` of the runs in the store of the configs' models, kind
    ``finished``, ``diverged`` or ``open`` (any other state: interrupted, failed otherwise, or
    left ``running`` by a process that died)."""
    from probe import TrainConfig

    found: dict[str, dict[str, str]] = {}
    for model in dict.fromkeys(c.model for c in configs):
        for run in store.list_runs(model=model):   # newest first
            try:  # the stored config read back as a config: options added since take their defaults
                key = _key(_recipe(TrainConfig.from_dict(run.get("config") or {})))
            except UserError:
                continue
            kind = "finished" if run["status"] == "finished" else "diverged" if _diverged(run) else "open"
            found.setdefault(key, {}).setdefault(kind, run["run_id"])
    return found


def _train_or_resume(store, config, run_id: str | None, progress=None) -> tuple[str, str]:
    """Train ``config`` into ``store``, continuing run ``run_id`` from its last checkpoint when
    given: ``("finished", run id)``, or ``("diverged", run id)`` for a run stopped by a non-finite
    loss. Any other error is raised."""
    is_factory_name = load("models").is_factory_name
    from probe import TrainingDiverged, resume, train

    try:
        if run_id is None:
            return "finished", train(config, store, progress=progress).run_id
        factory = config.model if is_factory_name(config.model) else None  # the caller named it
        return "finished", resume(run_id, store, device=config.device, factory=factory, progress=progress).run_id
    except TrainingDiverged:
        run_id = run_id or _stored_runs(store, [config]).get(_key(_recipe(config)), {}).get("diverged")
        if run_id is None:
            raise
        return "diverged", run_id


def _work(root: str, config, run_id: str | None, threads: int | None) -> tuple[str, str]:
    """One task of a worker process: :func:`_train_or_resume` on its own store of ``root`` and
    ``threads`` torch threads, an error returned as ``("error", its first line)``."""
    import torch

    from probe.training.state import one_line
    from probe import RunStore

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with RunStore(root) as store:
            return _train_or_resume(store, config, run_id)
    except Exception as e:  # noqa: BLE001 - reported by the sweep, naming the config
        return "error", one_line(e)


def _settings(ctx: Context) -> tuple[int, int | None]:
    """(jobs, threads per job or None for torch's own count), checked."""
    from probe.checks import check_int
    from probe.runtime.dist import launched

    jobs = check_int("jobs", ctx.jobs, 1, 1024)
    threads = None if ctx.threads_per_job is None else check_int("threads_per_job", ctx.threads_per_job, 1, 4096)
    if jobs > 1 and launched():
        raise UserError(f"jobs={jobs} under torchrun: there every run is trained by all ranks together; "
                        "use one or the other")
    if threads is None and jobs > 1:
        threads = max(1, cpu_cores() // jobs)
    return jobs, threads


@contextlib.contextmanager
def _sweep_lock(ctx: Context):
    """Hold ``<runs root>/.sweep.lock`` while a sweep plans and trains, waiting for a sweep that
    holds it. A run of the sweep's recipes left ``running`` is then one whose process died (the
    lock dies with its process). Not taken under torchrun, on a read-only store, or where there
    is no ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on every platform
        fcntl = None
    from probe.runtime.dist import launched

    if fcntl is None or launched() or getattr(ctx.store, "readonly", False):
        yield
        return
    path = Path(ctx.store.root) / ".sweep.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise UserError(f"cannot open the sweep lock {path} ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            ctx.log(f"another sweep is training into {ctx.store.root}; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def train_many(ctx: Context, configs, desc: str | None = None) -> list[str]:
    """The run id of each config, in order (device is not part of the recipe):

    * the newest finished run of its recipe in the store;
    * else the newest run of it that diverged (a non-finite loss): returned as it is, a failed
      run, since training it again would diverge again;
    * else the newest unfinished run of it (interrupted, failed otherwise, or left ``running``
      by a process that died), continued from its last checkpoint (:func:`probe.training.resume`);
    * else a new run trained now.

    Runs are trained ``ctx.jobs`` at a time, in worker processes (spawned, each with its own
    store on the same root and ``threads_per_job`` torch threads) when ``jobs > 1``, in this
    process otherwise. The sweep holds the root's sweep lock (:func:`_sweep_lock`) while it
    plans and trains: a second sweep on the root waits for it, then reuses its runs. A run being
    trained on the same root by something else than a sweep (``probe train``) is not seen as
    alive: do not start a sweep of its recipe meanwhile.

    ``desc`` names a progress bar over the configs, advanced as runs complete; with one job the
    steps of each epoch are shown too. A run that cannot be trained is logged naming its config
    and the others go on; a :class:`UserError` listing every such run is raised at the end.

    Under ``torchrun`` the runs are trained one after the other, each by all the ranks together
    (``jobs`` must be 1; the first error stops the sweep). Sharing the configs out to the ranks,
    one run per rank, is not done: :func:`probe.train` joins the ranks' process group for
    every run."""
    configs = list(configs)
    jobs, threads = _settings(ctx)
    counts = Counter(_key(_recipe(c)) for c in configs)
    ids: dict[str, str] = {}
    failures: list[str] = []
    with _sweep_lock(ctx):
        stored = _stored_runs(ctx.store, configs)
        todo: dict[str, tuple[Any, str | None]] = {}   # recipe: (config, run to continue)
        for config in configs:
            key = _key(_recipe(config))
            have = stored.get(key, {})
            if key in ids or key in todo:
                continue
            if "finished" in have:
                ids[key] = have["finished"]
                ctx.log(f"reusing run {ids[key]} ({_name(config)})")
            elif "diverged" in have:
                ids[key] = have["diverged"]
                ctx.log(f"reusing run {ids[key]} ({_name(config)}), which diverged: not trained again")
            else:
                todo[key] = (config, have.get("open"))
                ctx.log(f"resuming run {have['open']} ({_name(config)})" if "open" in have else
                        f"training {_name(config)}")
        done = sum(counts[k] for k in ids)
        if desc and ctx.progress is not None and todo:
            ctx.progress(desc, done, len(configs))

        def finish(key: str, outcome: str, detail: str) -> None:
            nonlocal done
            name = _name(todo[key][0])
            if outcome == "error":
                failures.append(f"{name}: {detail}")
                ctx.log(f"could not train {name}: {detail}")
            else:
                ids[key] = detail
                ctx.log(f"run {detail} ({name}) diverged: kept as a failed run" if outcome == "diverged" else
                        f"finished run {detail} ({name})")
            done += counts[key]
            if desc and ctx.progress is not None:
                ctx.progress(desc, done, len(configs))

        if jobs == 1:
            _train_here(ctx, todo, threads, finish)
        elif todo:
            _train_in_workers(ctx, todo, jobs, threads, finish)
    if desc and ctx.progress is not None and not todo:
        ctx.progress(desc, len(configs), len(configs))
    if failures:
        raise UserError(f"{len(failures)} of {len(todo)} run(s) to train failed: {'; '.join(failures)}")
    return [ids[_key(_recipe(c))] for c in configs]


def _train_here(ctx: Context, todo: dict, threads: int | None, finish: Callable) -> None:
    """Train the runs of ``todo`` one after the other in this process (under torchrun an error
    stops the sweep: the ranks must stay in step)."""
    import torch

    from probe.training.state import one_line
    from probe.runtime.dist import launched

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for key, (config, run_id) in todo.items():
            try:
                outcome, detail = _train_or_resume(ctx.store, config, run_id, progress=ctx.progress)
            except Exception as e:  # noqa: BLE001 - reported naming the config; the others go on
                if launched():
                    raise
                outcome, detail = "error", one_line(e)
            finish(key, outcome, detail)
    finally:
        torch.set_num_threads(before)


def _train_in_workers(ctx: Context, todo: dict, jobs: int, threads: int | None, finish: Callable) -> None:
    """Train the runs of ``todo`` in ``jobs`` spawned worker processes, one run per task. A
    worker that dies fails the runs not yet done (a later sweep resumes those it had started)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from probe.training.state import one_line

    pool = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_work, str(ctx.store.root), config, run_id, threads): key
                   for key, (config, run_id) in todo.items()}
        for future in as_completed(futures):
            try:
                outcome, detail = future.result()
            except Exception as e:  # noqa: BLE001 - the worker process died (BrokenProcessPool)
                outcome, detail = "error", one_line(e)
            finish(futures[future], outcome, detail)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def find_or_train(ctx: Context, config) -> str:
    """The id of the newest finished run of ``config``'s recipe in the store, else of a new run
    trained now (as :func:`train_many`). Device is not part of the recipe."""
    return train_many(ctx, [config])[0]


def pair_runs(ctx: Context) -> dict[str, str]:
    """{model: run id} of the comparison pair under the demo recipe (quick: 2 epochs on 512 digits
    samples, the demo's full recipe otherwise; full: 12 epochs on all of them). The quick pair is its
    own recipe, not ``probe demo --quick``'s, so that finished quick runs stay reusable."""
    from dataclasses import replace

    from probe.demo import demo_config

    configs = [replace(demo_config(name), epochs=2, limit_train=512) if ctx.quick else demo_config(name)
               for name in PAIR]
    return dict(zip(PAIR, train_many(ctx, configs)))


def fmt(v, spec: str = ".4g") -> str:
    """A number for a finding line; ``n/a`` for a missing one."""
    return "n/a" if v is None else format(v, spec)


def scalars(summary: dict, prefix: str = "") -> dict:
    """The numbers of a stored summary, flattened one level into ``a.b`` keys (lists and long
    texts left out): what ``numbers.csv`` holds."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, bool) or isinstance(v, (int, float)) or v is None:
            out[prefix + k] = v
        elif isinstance(v, str) and len(v) <= 80:
            out[prefix + k] = v
        elif isinstance(v, dict) and not prefix:
            out.update(scalars(v, prefix=f"{k}."))
    return out


def probe_rows(ctx: Context, probe: str, params: dict | None, runs: dict[str, str], *, checkpoint="last",
               n: int | None = None) -> tuple[list[tuple[dict, Any]], list[dict], list[str]]:
    """Run ``probe`` through the public runner on each run at ``checkpoint``: (figure entries,
    rows of numbers (model, run_id, epoch, probe_id and the summary's scalars), probe ids). A
    target that fails is an error in the outcome: raised here, naming the run."""
    from probe import figure_entries, run_probe

    entries, rows, ids = [], [], []
    for model, rid in runs.items():
        ctx.log(f"probe {probe} on {model} ({rid}, checkpoint {checkpoint})")
        outs = run_probe(ctx.store, probe, params, run=rid, checkpoint=checkpoint, n=n, progress=ctx.progress)
        for o in outs:
            if o.error is not None:
                raise UserError(f"probe {probe} failed on run {rid} (epoch {o.info.get('epoch')}): {o.error}")
            ids.append(o.info["probe_id"])
            rows.append({"model": model, "run_id": rid, "epoch": o.info.get("epoch"), "probe_id": o.info["probe_id"],
                         **scalars(o.result.summary())})
        entries += figure_entries(outs)
    return entries, rows, ids


def last_entries(entries: Sequence[tuple[dict, Any]]) -> list[tuple[dict, Any]]:
    """The entry of each run's latest checkpoint, in the order the runs first appear."""
    best: dict = {}
    for info, result in entries:
        key = info.get("run_id") or info.get("model")
        if key not in best or (info.get("epoch") or 0) >= (best[key][0].get("epoch") or 0):
            best[key] = (info, result)
    return list(best.values())


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")[:48] or "figure"


def probe_figures(probe: str, entries: Sequence[tuple[dict, Any]], main: str,
                  across: Sequence[tuple[dict, Any]] | None = None) -> dict:
    """The probe's own figures: its main figure under the stem ``main`` and every extra figure
    under the slug of its title; the figures that draw a series across training
    (:attr:`probe.probes.registry.Figure.series`) get ``across`` (every checkpoint) when given,
    the others ``entries``."""
    from probe import get_probe

    spec = get_probe(probe)
    out = {main: spec.figure(list(entries))}
    for fig in spec.extra_figures:
        use = across if across is not None and fig.series else entries
        out[_slug(fig.title)] = fig.build(list(use))
    return out


def _csv(rows: Sequence[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    return buf.getvalue()


def is_done(ctx: Context, name: str) -> bool:
    """Whether ``<out>/<name>/done.json`` records a finished run with the same quick setting and
    its runs are still in the store."""
    path = ctx.out / name / "done.json"
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(done, dict) or done.get("quick") != ctx.quick:
        return False
    known = {r["run_id"] for r in ctx.store.list_runs()}
    return all(r in known for r in done.get("run_ids") or [])


def write_outputs(ctx: Context, name: str, title: str, outcome: Outcome, wall_s: float) -> Path:
    """Write the experiment's files (module docstring), ``done.json`` last; returns the folder.
    The pages share one ``plotly.min.js`` in the output root (loaded as ``../plotly.min.js``: copy
    the output root whole to view them offline); ``runs.json`` lists the figure and table stems
    this run wrote, in order."""
    from probe import write_html
    from probe import atomic_write_text

    folder = ctx.out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "done.json").unlink(missing_ok=True)
    for stem, fig in outcome.figures.items():
        write_html(fig, folder / f"{stem}.html", plotlyjs=ctx.out / "plotly.min.js")
        atomic_write_text(folder / f"{stem}.json", fig.to_json())
    atomic_write_text(folder / "numbers.csv", _csv(outcome.rows))
    for stem, rows in outcome.tables.items():
        atomic_write_text(folder / f"{stem}.csv", _csv(rows))
    meta = {"name": name, "title": title, "quick": ctx.quick, "run_ids": outcome.run_ids,
            "probe_ids": outcome.probe_ids, "runs_root": str(ctx.store.root), "found": outcome.found,
            "wall_s": wall_s, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "figures": list(outcome.figures), "tables": ["numbers", *outcome.tables]}
    atomic_write_text(folder / "runs.json", json.dumps(meta, indent=1) + "\n")
    atomic_write_text(folder / "done.json", json.dumps(meta, indent=1) + "\n")
    return folder
