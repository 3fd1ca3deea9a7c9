"""``python -m experiments [all | NAME ...] [--quick] [--force]``: regenerate the experiments'
outputs (html, figure json, numbers.csv, runs.json) under ``--out`` from the runs in ``--runs``.
``python -m experiments report [--out DIR] [--to FILE]``: one page with all of their figures and tables."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

def build_parser() -> argparse.ArgumentParser:
    from . import EXPERIMENTS
    from ._common import cpu_cores
    from .report import DEFAULT_OUT

    p = argparse.ArgumentParser(prog=f"python -m {__package__}", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("names", nargs="*", default=["all"],
                   help=f"experiments to run: all, or any of {', '.join(EXPERIMENTS)}")
    p.add_argument("--quick", action="store_true", help="CPU-minutes settings (2 epochs on 512 digits samples, "
                                                         "small probes); default: the full settings")
    p.add_argument("--force", action="store_true", help="run again what is already done for this setting")
    p.add_argument("--runs", default=os.environ.get("PROBE_RUNS", "runs"),
                   help="runs root (the catalog the experiments train into and read; $PROBE_RUNS)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output root: one folder per experiment")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs on stderr")
    p.add_argument("--jobs", type=_positive, default=1, metavar="N",
                   help="runs trained at once, each in its own worker process (1: one after the other in this "
                        "process)")
    p.add_argument("--threads-per-job", type=_positive, default=argparse.SUPPRESS, metavar="N",
                   help="torch threads of each job (default: the CPU cores shared out, max(1, cores // jobs); "
                        f"{cpu_cores()} cores here)")
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 1024, got {text!r}")
    return value


def _how(r: dict) -> str:
    if r["skipped"]:
        return "already done, skipped"
    return f"done in {r['wall_s']:.0f} s"


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else list(argv)
    if given[:1] == ["report"]:                      # one page with every experiment's outputs
        from .report import main as report_main
        return report_main(given[1:])
    from . import EXPERIMENTS, run_experiment
    from ._common import Context
    from probe.cli.common import TqdmProgress, user_error_types

    args = build_parser().parse_args(argv)
    if args.list:
        for name, m in EXPERIMENTS.items():
            print(f"{name:<16} {m.TITLE}\n{'':<16} {m.DESCRIPTION}")
        return 0
    names = list(EXPERIMENTS) if "all" in args.names else args.names
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        print(f"python -m experiments: error: unknown experiment(s) {', '.join(unknown)}; choose from: "
              f"{', '.join(EXPERIMENTS)} or all", file=sys.stderr)
        return 2
    from probe import RunStore
    from tqdm import tqdm

    def log(line: str) -> None:
        if not args.quiet:
            tqdm.write(line, file=sys.stderr)

    progress = TqdmProgress(args.quiet)
    results = []
    try:
        ctx = Context(store=RunStore(args.runs), out=Path(args.out), quick=args.quick, log=log, progress=progress,
                      jobs=args.jobs, threads_per_job=getattr(args, "threads_per_job", None))
        tty = sys.stderr.isatty()    # a log file gets plain lines (one per experiment), no bar frames
        bar = tqdm(names, desc="experiments", file=sys.stderr, disable=args.quiet or not tty, dynamic_ncols=True)
        for i, name in enumerate(bar):
            bar.set_postfix_str(name)
            if not tty:
                log(f"experiment {i + 1}/{len(names)}: {name}")
            r = run_experiment(ctx, name, force=args.force)
            results.append(r)
            log(f"{name}: {_how(r)} -> {r['folder']}")
    except user_error_types() as e:
        print(f"python -m experiments: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        progress.close()
    if args.json:
        print(json.dumps({"experiments": results, "quick": args.quick, "runs_root": str(ctx.store.root)}))
    else:
        for r in results:
            print(f"== {r['name']} ({_how(r)}) {r['folder']}")
            for line in r["found"]:
                print(f"   {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
