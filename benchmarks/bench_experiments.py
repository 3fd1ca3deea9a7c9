"""Sweep throughput: ``experiments._common.train_many`` (what ``python -m experiments --jobs N``
trains with) at one job against several.

The same set of runs (the first ``--runs`` seed fusion rows at WRN-10-2 on digits, ``--epochs``
each, ``--limit-train`` samples, batch 64, from ``experiments._fusion.fusion_config``) is trained
twice, each time into a fresh temporary runs root: once at one job in this process on all the
cores (threads per job = cores), once at ``--jobs`` worker processes sharing the cores out
(threads per job = cores // jobs). This process loads the data and builds a model once before
either sweep is timed; the parallel sweep's time includes starting its workers (a fresh
interpreter and imports each).

A third sweep trains the same runs at one job on one job's share of the threads (cores // jobs),
which says what the parallel sweep is up against: when one run already gets a speed-up of S from
all the cores' threads, ``jobs`` processes can beat it by at most jobs / S (the bound printed), and
the parallel sweep's runs per hour over jobs x that sweep's is its scaling.

It prints the wall time and the runs per hour of each sweep, their ratio (the target is 1.6x at
two jobs on two cores) and checks that the two sweeps reach the same final test accuracy per run:
exactly equal numbers are not promised, since the thread count changes the order of floating
point sums, so the check allows ``--tol`` percentage points. The last line is a one-line summary.

    python benchmarks/bench_experiments.py [--runs 8] [--epochs 6] [--limit-train 512] [--jobs 2]
                                           [--tol 1.0] [--device cpu|cuda|auto] [--json]

``--device cuda`` trains every run on the GPU (the jobs of the parallel sweep share it); the script
measures throughput only, no memory.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import add_device_flag, pick_device  # noqa: E402

TARGET = 1.6


def configs(runs: int, epochs: int, limit_train: int | None, device: str = "cpu") -> list:
    from experiments._fusion import Protocol, fusion_config, row_ids

    rows = row_ids()
    protocol = Protocol("bench", limit_train, epochs, 64, "benchmark")
    return [replace(fusion_config(rows[i % len(rows)], protocol, i // len(rows)), device=device) for i in range(runs)]


def sweep(configs: list, jobs: int, threads: int) -> dict:
    """Train ``configs`` into a fresh root: wall time, runs per hour, final accuracy per run."""
    from experiments._common import Context, train_many
    from probe import RunStore

    with tempfile.TemporaryDirectory(prefix="bench-experiments-") as root:
        store = RunStore(root)
        t0 = time.perf_counter()
        ids = train_many(Context(store=store, out=Path(root), jobs=jobs, threads_per_job=threads), configs)
        wall = time.perf_counter() - t0
        final = [store.get_run(i)["summary"].get("final_acc") for i in ids]
        store.close()
    return {"jobs": jobs, "threads_per_job": threads, "wall_s": wall, "runs_per_hour": 3600.0 * len(configs) / wall,
            "final_acc": final}


def warm_up() -> None:
    """Load the data and build a model once in this process (imports, the digits set)."""
    from probe import load_data
    from probe import build_model

    data = load_data("digits", None, seed=0, limit_train=64)
    build_model("wrn", num_classes=data.num_classes, in_chans=data.in_channels, image_size=data.image_size[0],
                fusion="fmm01", model_kwargs={"depth": 10, "widen": 2})


def main(argv: list[str] | None = None) -> int:
    from experiments._common import cpu_cores

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", type=int, default=8, help="runs in the sweep (seed fusion rows, in order)")
    p.add_argument("--epochs", type=int, default=6, help="epochs of each run")
    p.add_argument("--limit-train", type=int, default=None,
                   help="digits training samples of each run (default: all 1,437)")
    p.add_argument("--jobs", type=int, default=2, help="jobs of the parallel sweep")
    p.add_argument("--tol", type=float, default=1.0,
                   help="largest difference in a run's final test accuracy (percentage points) between the sweeps")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_device_flag(p)
    args = p.parse_args(argv)
    if args.runs < 1 or args.epochs < 1 or (args.limit_train or 1) < 1 or args.jobs < 2 or args.tol < 0:
        p.error("--runs, --epochs, --limit-train must be positive, --jobs at least 2, --tol not negative")
    cores = cpu_cores()
    todo = configs(args.runs, args.epochs, args.limit_train, pick_device(args.device))
    warm_up()
    serial = sweep(todo, 1, cores)
    per_job = max(1, cores // args.jobs)
    one = sweep(todo, 1, per_job) if per_job != cores else serial     # one job on a job's threads
    parallel = sweep(todo, args.jobs, per_job)
    ratio = parallel["runs_per_hour"] / serial["runs_per_hour"]
    intra = serial["runs_per_hour"] / one["runs_per_hour"]            # what the extra threads give one run
    bound = args.jobs / intra                                          # jobs x one job, against jobs 1
    scaling = parallel["runs_per_hour"] / (args.jobs * one["runs_per_hour"])
    diffs = [abs(a - b) for a, b in zip(serial["final_acc"], parallel["final_acc"])]
    acc_ok = all(d <= args.tol for d in diffs)
    result = {"runs": args.runs, "epochs": args.epochs, "limit_train": args.limit_train, "cores": cores,
              "sweeps": [serial, one, parallel] if one is not serial else [serial, parallel], "speedup": ratio,
              "target": TARGET, "threads_speedup": intra, "bound": bound, "jobs_scaling": scaling,
              "max_acc_diff": max(diffs), "acc_ok": acc_ok}
    summary = (f"bench_experiments: {args.runs} runs x {args.epochs} epochs on {cores} cores: jobs 1 "
               f"({serial['threads_per_job']} threads) {serial['wall_s']:.1f} s, {serial['runs_per_hour']:.0f} runs/h; "
               f"jobs {args.jobs} ({parallel['threads_per_job']} thread(s) each) {parallel['wall_s']:.1f} s, "
               f"{parallel['runs_per_hour']:.0f} runs/h; speed-up {ratio:.2f}x (target {TARGET}x: "
               f"{'met' if ratio >= TARGET else 'missed'}); final accuracies "
               f"{'equal' if max(diffs) == 0 else f'within {max(diffs):.2f} points'}"
               f"{'' if acc_ok else f' -- MORE than --tol {args.tol}'}"
               f"; one run is {intra:.2f}x faster on {cores} threads than on {per_job}, so {args.jobs} jobs can "
               f"be at most {bound:.2f}x faster than one; they reach {scaling:.0%} of {args.jobs} x one job "
               f"on {per_job} thread(s)")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'sweep':<10} {'threads/job':>11} {'wall s':>8} {'runs/h':>8}")
        for s in ((serial, one, parallel) if one is not serial else (serial, parallel)):
            print(f"{'jobs ' + str(s['jobs']):<10} {s['threads_per_job']:>11} {s['wall_s']:>8.1f} "
                  f"{s['runs_per_hour']:>8.0f}")
        print("final test top-1 per run (jobs 1 / jobs N):",
              ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(serial["final_acc"], parallel["final_acc"])))
        print(summary)
    return 0 if acc_ok else 1


if __name__ == "__main__":
    sys.exit(main())
