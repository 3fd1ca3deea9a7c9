"""The ``probe`` command line: thin subcommands that parse, call the library, save and print.

Every subcommand accepts ``--json`` (exactly one JSON object on stdout; progress and logs go to
stderr). Exit code 0 on success, 2 on bad input with a one-line error.
"""
from __future__ import annotations

import argparse
import re
import sys

from probe.errors import UserError
from probe.text import format_table
from probe.cli.common import OneLineParser, Output, close_stores, fail, run_command
from probe.companions import load

__all__ = ["main", "build_parser"]


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs on stderr")
    return p


# --- probe models ------------------------------------------------------------------------------


def cmd_models(args) -> Output:
    import torch

    models = load("models")

    rows = []
    for name in models.list_models(args.tag):
        entry = models.model_entry(name)
        with torch.device("meta"):  # count parameters without allocating or initialising memory
            m = models.create_model(name)
        rows.append({"name": name, "family": entry.family, "params": models.count_parameters(m),
                     "tags": list(entry.tags), "description": entry.description})
    text = format_table(rows, [("name", "name"), ("family", "family"), ("params", "params"),
                               ("description", "description")])
    return Output({"models": rows, "count": len(rows)}, text)


# --- probe fusions -----------------------------------------------------------------------------


def cmd_fusions(args) -> Output:
    models = load("models")
    SEED_FUSIONS, resolve_fusion = models.SEED_FUSIONS, models.resolve_fusion

    if args.parse:
        spec = resolve_fusion(args.parse)
        return Output({"name": spec.name, "formula": spec.formula()}, f"{spec.name}\n  {spec.formula()}")
    rows = [r.as_dict() for r in SEED_FUSIONS if args.group is None or r.group == args.group]
    text = format_table(rows, [("id", "id"), ("caltech101_top1", "top-1"), ("group", "group"),
                               ("name", "canonical name"), ("formula", "formula")], floatfmt="{:.2f}")
    text += ("\n\nSeed: WRN-16-10 on Caltech-101 (64x64), best test top-1. Use a name or an id with "
             "--fusion, e.g. `probe train --model wrn --fusion fmm08`.")
    return Output({"fusions": rows, "count": len(rows)}, text)


def build_parser() -> argparse.ArgumentParser:
    from probe import __version__

    parser = OneLineParser(prog="probe", description=__doc__.splitlines()[0].replace("``", "`"))
    parser.add_argument("--version", action="version", version=f"probe {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    common = _common()

    p = sub.add_parser("models", parents=[common], help="list registered models with parameter counts")
    p.add_argument("--tag", help="only models with this tag (family, pair, seed, tiny, attention)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("fusions", parents=[common], help="list the seed's fusion variants")
    p.add_argument("--group", help="only this seed group (e.g. 'bn,sig', 'resgate')")
    p.add_argument("--parse", metavar="SPEC", help="parse one fusion name or id and print its formula")
    p.set_defaults(func=cmd_fusions)

    from probe.cli import commands, probes

    for register in commands.REGISTER:
        register(sub, common)
    probes.register_probe_commands(sub, common)
    return parser


def _terminate(signum, frame):  # SIGTERM ends a command like Ctrl-C: a run is marked interrupted
    raise KeyboardInterrupt


_NEGATIVE_VALUE = re.compile(r"^-(\d|\.\d)")


def join_negative_values(argv: list[str]) -> list[str]:
    """``--opt -1:1:51`` as ``--opt=-1:1:51``: argparse takes a value that starts with '-' for an
    option unless it is a plain negative number; no flag of this CLI starts with a digit, so a
    long option followed by '-' and a digit (or '-.' and a digit) is always that option's value."""
    out: list[str] = []
    for tok in argv:
        prev = out[-1] if out else ""
        if (_NEGATIVE_VALUE.match(tok) and prev.startswith("--") and "=" not in prev and prev != "--"
                and not (len(out) > 1 and out[-2] == "--")):
            out[-1] = f"{prev}={tok}"
        else:
            out.append(tok)
    return out


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok == "--nproc":
            skip = True
        elif not tok.startswith("--nproc="):
            out.append(tok)
    return out


def check_launch(args) -> None:
    """What would fail in every started process, checked before torchrun starts them (a
    :class:`UserError`): the collective timeout of ``PROBE_DIST_TIMEOUT``, and for ``--resume`` the
    number of processes the run was trained with."""
    from probe.runtime.dist import collective_timeout_s

    collective_timeout_s()
    if args.resume:
        from probe.cli.common import open_store

        run = open_store(args, readonly=True).get_run(args.resume)
        world = ((run.get("config") or {}).get("resolved") or {}).get("world_size", 1)
        if world != args.nproc:
            raise UserError(f"run {run['run_id']} was trained by {world} process(es); resume it with the same "
                            f"number (--nproc {world}), not {args.nproc}: each rank's batch share and random "
                            "state are part of the run")


def launch_torchrun(args, argv: list[str]) -> int:
    """``probe train --nproc N ...``: the same command under ``torchrun --standalone
    --nproc-per-node N`` (one machine); its exit status is this command's."""
    import subprocess

    from probe.runtime.dist import launched

    n = args.nproc
    if not isinstance(n, int) or not 1 <= n <= 1024:
        return fail(args, f"probe train: error: --nproc {n}: expected 1 to 1024 processes")
    if launched():
        return fail(args, "probe train: error: --nproc starts torchrun itself; under torchrun give --nproc-per-node "
                          "to torchrun instead")
    from probe.cli.common import user_error_types
    from probe.cli.commands import check_train_args

    try:  # bad input is one line here, before any process starts
        check_train_args(args)
        check_launch(args)
    except user_error_types() as e:
        return fail(args, f"probe train: error: {str(e).strip().splitlines()[0]}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "probe", "--",
           *_without_nproc(argv)]
    try:
        return subprocess.run(cmd).returncode
    except KeyboardInterrupt:
        print("probe train: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    OneLineParser.json_errors = "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv
    try:
        args = parser.parse_args(join_negative_values(argv))
    finally:
        OneLineParser.json_errors = False
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "train" and getattr(args, "nproc", 1) != 1:
            code = launch_torchrun(args, argv)
        elif threading.current_thread() is not threading.main_thread():
            code = run_command(args.func, args, f"probe {args.command}")
        else:
            previous = signal.signal(signal.SIGTERM, _terminate)
            try:
                code = run_command(args.func, args, f"probe {args.command}")
            finally:
                signal.signal(signal.SIGTERM, previous)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`probe fusions | head`): stop quietly, as other tools do
        _stdout_to_devnull()
        return 141
    finally:
        close_stores()
    return code


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush finds no closed pipe."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (captured): nothing to flush later
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
