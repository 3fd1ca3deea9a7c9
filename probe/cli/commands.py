"""Subcommands beyond models / fusions: train, runs, show, demo, explore, export (the probes:
:mod:`probe.cli.probes`).

Each ``register(sub, common)`` adds one subparser; each ``cmd_*`` parses, calls the library,
saves, and returns an :class:`probe.cli.common.Output`.
"""
from __future__ import annotations

import dataclasses
import sys

from probe.text import format_table
from probe.cli.common import (Output, TqdmProgress, factory_args, field_type, flag_name, open_store,
                              parse_model_args, rank_group, runs_arg)
from probe.errors import UserError
from probe.companions import load

REGISTER: list = []


def _register(fn):
    REGISTER.append(fn)
    return fn


def _report_skipped(store) -> list[str]:
    """Catalog rows a listing skipped as malformed: one line each on stderr, and returned for --json."""
    skipped = list(getattr(store, "skipped", None) or [])
    for line in skipped:
        print(f"warning: {line}", file=sys.stderr)
    return skipped


# --- probe train -------------------------------------------------------------------------------
#
# Its flags are TrainConfig's fields (help from their metadata): a value field gives a flag whose
# default is None (unset: the preset's or the config's default), a bool field a switch.


def _train_fields() -> list[dataclasses.Field]:
    """TrainConfig's fields that are flags of ``probe train``, in field order."""
    from probe.training import TrainConfig

    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag", True)]


def _value_fields() -> list[dataclasses.Field]:
    return [f for f in _train_fields() if not isinstance(f.default, bool)]


#: The switches shown before ``--resume`` in ``probe train --help``; the other bool fields follow ``--nproc``.
_FIRST_SWITCHES = ("hflip", "amp", "nesterov", "rebuild_optimizer_each_epoch")


def _switches() -> list[str]:
    """The bool fields, in the order of their switches."""
    rest = [f.name for f in _train_fields() if isinstance(f.default, bool) and f.name not in _FIRST_SWITCHES]
    return [*_FIRST_SWITCHES, *rest]


def train_config_from_args(args):
    from probe.training import PRESETS, TrainConfig

    base: dict = {}
    if args.preset:
        if args.preset not in PRESETS:
            raise UserError(f"unknown preset {args.preset!r}; presets: {', '.join(PRESETS)}")
        base.update(PRESETS[args.preset])
    for f in _value_fields():
        value = getattr(args, f.name)
        if value is not None:
            base[f.name] = value
    for name in _switches():
        if getattr(args, name):
            base[name] = True
    extra = parse_model_args(args.model_arg)
    if extra:
        base["model_kwargs"] = {**base.get("model_kwargs", {}), **extra}
    if "model" not in base:
        raise UserError("--model is required (or --preset, or --resume RUN); `probe models` lists the names")
    return TrainConfig(**base)


#: What ``--resume`` can honour besides the run itself: extend the epochs, move the device or the data files.
_RESUME_FLAGS = ("epochs", "device", "data_root")


def _resume_conflicts(args) -> list[str]:
    flags = [flag_name(f.name) for f in _value_fields()
             if f.name not in _RESUME_FLAGS and getattr(args, f.name) is not None]
    flags += [flag_name(name) for name in ("preset", "model_arg") if getattr(args, name) is not None]
    flags += [flag_name(name) for name in _switches() if getattr(args, name)]
    return flags


def check_train_args(args):
    """The checks a train command passes before anything runs (also before ``--nproc`` starts
    torchrun): the new run's validated config, or None for ``--resume``."""
    from probe.training import resolve_device

    if not args.resume and (args.factory or args.trust_factory):
        raise UserError("--factory / --trust-factory apply to --resume of a run built by a user factory; "
                        "for a new run give the factory as --model package.module:factory")
    if args.resume:
        conflicts = _resume_conflicts(args)
        if conflicts:
            raise UserError(f"--resume continues run {args.resume} with its stored config; {', '.join(conflicts)} "
                            f"cannot change on resume (only --epochs, --device and --data-root can be given)")
        return None
    config = train_config_from_args(args).validate()
    if config.sync_bn and resolve_device(config.device).type != "cuda":
        raise UserError("--sync-bn needs CUDA devices (torch's SyncBatchNorm is GPU-only); on CPU each rank "
                        "normalises its own part of the batch")
    return config


def cmd_train(args) -> Output:
    from probe.training import TrainingDiverged, resume, train

    config = check_train_args(args)
    # under torchrun: join the group; rank 0 alone opens the store and reports
    try:
        with rank_group(args.device or (config.device if config else "auto"), args.quiet,
                        together=(TrainingDiverged,)) as (main, progress):
            store = open_store(args) if main else None
            log = None if args.quiet or not main else _epoch_line
            if args.resume:
                result = resume(args.resume, store, epochs=args.epochs, factory=args.factory,
                                trust_factory=args.trust_factory, device=args.device, data_root=args.data_root,
                                on_epoch=log, progress=progress)
            else:
                result = train(config, store, on_epoch=log, progress=progress)
    except TrainingDiverged as e:    # every rank saw the same all-reduced loss and stopped at the same step
        raise UserError(str(e)) from None
    if not main:
        return None
    data = result.summary()
    text = (f"run {result.run_id}: best test top-1 {_pct(result.best_acc)} (epoch {result.best_epoch}), "
            f"final {_pct(result.final_acc)}, {result.train_time_s:.1f}s training\n"
            f"stored under {result.runs_root}; `probe show {result.run_id}` for the curves")
    return Output(data, text)


def _epoch_line(row: dict) -> None:
    """One line per epoch on stderr (the CLI's rendering of the trainer's ``on_epoch``)."""
    print(f"[{row['run_id']}] epoch {row['epoch']}/{row['epochs']}  train loss {row['train_loss']:.4f} "
          f"acc {row['train_top1']:.2f}  test loss {row['test_loss']:.4f} acc {row['test_top1']:.2f}  "
          f"lr {row['lr']:.4g}  {row['epoch_time_s']:.1f}s", file=sys.stderr)


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.2f}%"


@_register
def _reg_train(sub, common):
    from probe.data.registry import dataset_help
    from probe.training import TrainConfig

    p = sub.add_parser("train", parents=[common], help="train a model into the run store")
    helps = {**_TRAIN_HELP, "data": dataset_help()}  # the registered data sets, as they are now
    for f in _value_fields():
        text = helps.get(f.name, f.metadata["help"])
        if "default" not in text:
            text += f" (default: {'none' if f.default is None else f.default})"
        p.add_argument(flag_name(f.name), dest=f.name, type=field_type(TrainConfig, f.name), default=None, help=text)
    p.add_argument("--preset", help="fmm-caltech101 (the seed's WRN-16-10 recipe) or nku-cifar100; flags given "
                   "override it (default: none)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="extra model argument (JSON value), e.g. --model-arg width=8; repeatable")
    by_name = {f.name: f for f in _train_fields()}
    for name in _FIRST_SWITCHES:
        p.add_argument(flag_name(name), dest=name, action="store_true", help=by_name[name].metadata["help"])
    p.add_argument("--resume", metavar="RUN", help="continue RUN (id, unique prefix or 'last') from its last "
                   "checkpoint (or from the start when it has none) with its stored config")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes on this machine: starts `torchrun --standalone --nproc-per-node N "
                        "-m probe train ...` (gloo on CPU, NCCL on CUDA: one process per GPU); a distributed run "
                        "resumes with the same N (default: 1, this process; with PROBE_DIST_FORCE=1 in a process "
                        "group of one, through DDP)")
    for name in _switches()[len(_FIRST_SWITCHES):]:
        p.add_argument(flag_name(name), dest=name, action="store_true", help=by_name[name].metadata["help"])
    factory_args(p)
    runs_arg(p)
    p.set_defaults(func=cmd_train)


#: Help worded for the command line (how a model, a data set and its files are named there), in
#: place of the field's own.
_TRAIN_HELP = {
    "model": "registered model name (`probe models`) or package.module:factory (required, unless by "
             "default from --preset or --resume)",
    "data_root": "folder with the data set's files (default: $PROBE_DATA, ./data, /usr/share/datasets/<name>)",
}


# --- probe runs / show -------------------------------------------------------------------------


def _run_row(r: dict) -> dict:
    s = r.get("summary") or {}
    return {"run_id": r["run_id"], "model": r["model"], "data": r["data"], "status": r["status"],
            "epochs": s.get("epochs_done"), "best_acc": s.get("best_acc"), "final_acc": s.get("final_acc"),
            "train_time_s": s.get("train_time_s"), "fusion": (r.get("config") or {}).get("fusion"),
            "created_at": r["created_at"]}


def _plain(value):
    """A stored value for a table cell: short printable text as it is, anything else escaped and cut."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = str(value)
    if not text.isprintable() or len(text) > 80:
        text = repr(text)[:77] + ("..." if len(repr(text)) > 77 else "")
    return text


def _damaged_run_row(d: dict) -> dict:
    """A run row the catalog could not read, listed as ``damaged`` with what is wrong."""
    return {"run_id": _plain(d.get("run_id")), "model": _plain(d.get("model")), "data": _plain(d.get("data")),
            "status": "damaged", "epochs": None, "best_acc": None, "final_acc": None, "train_time_s": None,
            "fusion": None, "created_at": _plain(d.get("created_at")), "problem": d.get("problem")}


def cmd_runs(args) -> Output:
    rebuilt = None
    if args.rebuild_catalog:
        from probe.store import RunStore, resolve_runs_root
        rebuilt = RunStore.rebuild_catalog(resolve_runs_root(args.runs))
    store = open_store(args, readonly=not args.rebuild_catalog)
    rows = [_run_row(r) for r in store.list_runs(model=args.model, status=args.status)]
    damaged = [_damaged_run_row(d) for d in getattr(store, "damaged", None) or []]
    rows = sorted(rows + damaged, key=lambda r: str(r.get("created_at") or ""), reverse=True) if damaged else rows
    skipped = _report_skipped(store)
    text = format_table(rows, [("run_id", "run"), ("model", "model"), ("data", "data"), ("status", "status"),
                               ("epochs", "epochs"), ("best_acc", "best"), ("final_acc", "final"),
                               ("train_time_s", "time s")], floatfmt="{:.2f}")
    data = {"runs": rows, "count": len(rows), "skipped": skipped}
    if rebuilt is not None:
        data["rebuilt"] = rebuilt
        text = _rebuilt_text(rebuilt) + "\n\n" + text
    return Output(data, text)


def _rebuilt_text(r: dict) -> str:
    lines = [f"catalog rebuilt from the run folders: {r.get('runs', 0)} runs, {r.get('checkpoints', 0)} "
             f"checkpoints, {r.get('metrics', 0)} metric rows, {r.get('probes', 0)} probes"]
    if r.get("old_catalog"):
        lines.append(f"the previous catalog was kept as {r['old_catalog']}")
    for item in r.get("skipped") or []:
        lines.append(f"  skipped: {item}")
    return "\n".join(lines)


def cmd_show(args) -> Output:
    store = open_store(args, readonly=True)
    run = store.get_run(args.run)
    skipped: list[str] = []     # each listing resets the store's report: collect it after each one
    metrics = store.get_metrics(run["run_id"])
    skipped += _report_skipped(store)
    ckpts = [c["epoch"] for c in store.list_checkpoints(run["run_id"])]
    bad_ckpts = [{"epoch": _plain(d.get("epoch")), "problem": d["problem"]} for d in getattr(store, "damaged", [])]
    skipped += _report_skipped(store)
    probes = [{k: p[k] for k in ("probe_id", "kind", "checkpoint_epoch", "created_at")}
              for p in store.list_probes(run_id=run["run_id"])]
    skipped += _report_skipped(store)
    data = {"run": run, "metrics": metrics, "checkpoints": ckpts, "damaged_checkpoints": bad_ckpts,
            "probes": probes, "skipped": skipped}
    head = _run_row(run)
    text = "\n".join(f"{k:>12}: {v}" for k, v in head.items())
    if run.get("error"):
        text += f"\n       error: {run['error']}"
    text += "\n\n" + format_table(metrics, [("epoch", "epoch"), ("train_loss", "train loss"),
                                            ("train_top1", "train top1"), ("test_loss", "test loss"),
                                            ("test_top1", "test top1"), ("test_top5", "test top5"),
                                            ("lr", "lr"), ("epoch_time_s", "time s")])
    text += f"\n\ncheckpoints: {ckpts}"
    if bad_ckpts:
        text += f"\ndamaged checkpoint rows (epochs): {[d['epoch'] for d in bad_ckpts]} (see the warnings)"
    text += f"\nprobes: {len(probes)}"
    return Output(data, text)


@_register
def _reg_runs(sub, common):
    p = sub.add_parser("runs", parents=[common], help="list runs in the catalog")
    p.add_argument("--model", help="only runs of this model name (default: all)")
    p.add_argument("--status", choices=["running", "finished", "failed", "interrupted"],
                   help="only runs with this status (default: all)")
    p.add_argument("--rebuild-catalog", action="store_true",
                   help="rebuild catalog.sqlite from the run folders (the old catalog is kept beside it), "
                        "then list")
    runs_arg(p)
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("show", parents=[common], help="one run: config, per-epoch metrics, checkpoints, probes")
    p.add_argument("run", help="run id, unique prefix, or 'last'")
    runs_arg(p)
    p.set_defaults(func=cmd_show)


# --- probe demo --------------------------------------------------------------------------------


def cmd_demo(args) -> Output:
    from probe.demo import run_demo

    progress = TqdmProgress(args.quiet)
    try:
        result = run_demo(args.runs, quick=args.quick, epochs=args.epochs, progress=progress,
                          log=None if args.quiet else (lambda line: print(line, file=sys.stderr)),
                          on_epoch=None if args.quiet else _epoch_line)
    finally:
        progress.close()
    return Output(result["data"], result["text"])


@_register
def _reg_demo(sub, common):
    p = sub.add_parser("demo", parents=[common], help="the main job: train add_resnet and mul_resnet on digits and compare")
    p.add_argument("--quick", action="store_true",
                   help="4 epochs on 768 training images, batch 32, lr 0.05, smaller probes: both models train "
                        "(default: off, the full recipe)")
    p.add_argument("--epochs", type=int, default=None, help="override the number of epochs (default: 12, 4 with --quick)")
    runs_arg(p)
    p.set_defaults(func=cmd_demo)


# --- probe explore -----------------------------------------------------------------------------


def cmd_explore(args) -> Output:
    import subprocess
    from pathlib import Path

    from probe.store import resolve_runs_root

    import socket

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be in [1, 65535], got {args.port}")
    try:  # a name that does not resolve is refused here, before the server starts
        socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise UserError(f"--host {args.host!r}: not an address or a name this machine resolves "
                        f"({getattr(e, 'strerror', None) or e})") from None
    app = Path(load("apps").__file__).resolve().parent / "explorer.py"
    root = resolve_runs_root(args.runs)
    if root.exists() and not root.is_dir():
        raise UserError(f"--runs {root}: a file, not a folder; give the runs root (the folder holding "
                        "catalog.sqlite)")
    url = f"http://{args.host}:{args.port}"
    print(f"explorer: {url}  (runs root {root}; Ctrl-C stops it)", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.host,
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--", "--runs", str(root)]
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait()
    return Output({"url": url, "runs_root": str(root), "exit_code": code}, "")


@_register
def _reg_explore(sub, common):
    p = sub.add_parser("explore", parents=[common], help="open the Streamlit explorer over the runs root")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default: 8501)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only)")
    runs_arg(p)
    p.set_defaults(func=cmd_explore)


# --- probe export ------------------------------------------------------------------------------


def cmd_export(args) -> Output:
    from probe.store import export_run

    store = open_store(args, readonly=True)
    result = export_run(store, args.run, args.out, fmt=args.format, probe_ids=args.probe)
    for line in result["left_out"]:
        print(f"warning: left out {line}", file=sys.stderr)
    text = f"{len(result['files'])} file(s) written under {args.out}" + "".join(
        f"\n  {f}" for f in result["files"])
    return Output(result, text)


@_register
def _reg_export(sub, common):
    p = sub.add_parser("export", parents=[common], help="write a run's metrics and its probes' numbers as CSV or "
                       "TensorBoard files")
    p.add_argument("run", nargs="?", default=None,
                   help="run id, unique prefix or 'last' (default: none; then give --probe)")
    p.add_argument("--probe", action="append", metavar="ID",
                   help="only this stored probe (repeatable; default: every probe of the run)")
    p.add_argument("--format", choices=["csv", "tensorboard"], default="csv",
                   help="csv files, or TensorBoard event files (needs the tensorboard package) (default: csv)")
    p.add_argument("--out", metavar="DIR", default="export", help="folder to write into (default: ./export)")
    runs_arg(p)
    p.set_defaults(func=cmd_export)
