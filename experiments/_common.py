"""What every experiment shares: its context (the run store, the output folder, quick or full), the
training of the comparison pair (reused when the store already holds a finished run of the same
recipe), probes through the public runner, and the outputs written atomically.

An experiment is a module with ``NAME``, ``TITLE``, ``DESCRIPTION`` and ``run(ctx) -> Outcome``;
:func:`write_outputs` turns its outcome into ``<out>/<NAME>/``: one ``.html`` page and one plotly
``.json`` per figure, ``numbers.csv`` (one row per measured target, the stored summary's scalar
numbers), ``runs.json`` (the run and probe ids it used, the settings) and, last, ``done.json``
(what a later ``python -m experiments`` reads to skip it).
"""
from __future__ import annotations

import csv
import io
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from probe.errors import UserError

__all__ = ["Context", "Outcome", "find_or_train", "train_many", "pair_runs", "probe_rows", "probe_figures", "last_entries", "write_outputs",
           "is_done", "PAIR", "scalars", "fmt"]

#: The comparison pair: the seed's WRN block, fmm01 bn(r) + s against fmm18 bn(r) * bn(s).
PAIR = ("add_resnet", "mul_resnet")


@dataclass
class Context:
    """``store`` the run store, ``out`` the output root, ``quick`` CPU-minutes settings,
    ``log(line)`` and ``progress(desc, done, total)`` for the CLI."""

    store: Any
    out: Path
    quick: bool = True
    log: Callable[[str], None] = lambda line: None
    progress: Callable | None = None


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


def train_many(ctx: Context, configs, desc: str | None = None) -> list[str]:
    """The run id of each config: the newest finished run of its recipe in the store, else a new
    run trained now (device is not part of the recipe). ``desc`` names a progress bar over the
    configs."""
    from probe.train import train

    from probe.train import TrainConfig

    finished: dict[str, str] = {}
    for model in dict.fromkeys(c.model for c in configs):
        for run in ctx.store.list_runs(model=model, status="finished"):   # newest first
            try:  # the stored config read back as a config: options added since take their defaults
                have = _recipe(TrainConfig.from_dict(run.get("config") or {}))
            except UserError:
                continue
            finished.setdefault(_key(have), run["run_id"])
    out = []
    for i, config in enumerate(configs):
        rid = finished.get(_key(_recipe(config)))
        if rid is not None:
            ctx.log(f"reusing run {rid} ({config.model})")
        else:
            ctx.log(f"training {config.model}{' ' + config.fusion if config.fusion else ''} "
                    f"({config.epochs} epochs on {config.data}, seed {config.seed})")
            rid = train(config, ctx.store, progress=ctx.progress).run_id
            finished[_key(_recipe(config))] = rid
        out.append(rid)
        if desc and ctx.progress is not None:
            ctx.progress(desc, i + 1, len(configs))
    return out


def find_or_train(ctx: Context, config) -> str:
    """The id of the newest finished run of ``config``'s recipe in the store, else of a new run
    trained now. Device is not part of the recipe."""
    return train_many(ctx, [config])[0]


def pair_runs(ctx: Context) -> dict[str, str]:
    """{model: run id} of the comparison pair under the demo recipe (quick: 2 epochs on 512 digits
    samples; full: 12 epochs on all of them)."""
    from probe.demo import demo_config

    return {name: find_or_train(ctx, demo_config(name, quick=ctx.quick)) for name in PAIR}


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
    from probe.jobs import figure_entries, run_probe

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
    under the slug of its title; figures whose title says "across training" get ``across``
    (every checkpoint) when given, the others ``entries``."""
    from probe.probes.registry import get_probe

    spec = get_probe(probe)
    out = {main: spec.figure(list(entries))}
    for title, build in spec.extra_figures:
        use = across if across is not None and "across training" in title else entries
        out[_slug(title)] = build(list(use))
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
    """Write the experiment's files (module docstring), ``done.json`` last; returns the folder."""
    from probe.figures import write_html
    from probe.store import atomic_write_text

    folder = ctx.out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "done.json").unlink(missing_ok=True)
    for stem, fig in outcome.figures.items():
        write_html(fig, folder / f"{stem}.html")
        atomic_write_text(folder / f"{stem}.json", fig.to_json())
    atomic_write_text(folder / "numbers.csv", _csv(outcome.rows))
    for stem, rows in outcome.tables.items():
        atomic_write_text(folder / f"{stem}.csv", _csv(rows))
    meta = {"name": name, "title": title, "quick": ctx.quick, "run_ids": outcome.run_ids,
            "probe_ids": outcome.probe_ids, "runs_root": str(ctx.store.root), "found": outcome.found,
            "wall_s": wall_s, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(folder / "runs.json", json.dumps(meta, indent=1) + "\n")
    atomic_write_text(folder / "done.json", json.dumps(meta, indent=1) + "\n")
    return folder
