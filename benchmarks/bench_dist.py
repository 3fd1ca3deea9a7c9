"""Probes under torchrun: world size 1 against 2 on this machine, for the NTK kernel and a loss
surface, with the scaling efficiency and the share of the time spent in communication.

One model for every run: the registry's ``add_resnet`` (WRN-10-2, the seed's block) on the
embedded digits (8x8), in eval mode with BatchNorm running statistics from 256 training samples,
float32. Jobs (each run in its own processes, the library called directly):

* ``ntk``      ``empirical_ntk(model, x)``, trace kernel over ``--samples`` training samples (default
               512); under two ranks each rank records the layer inputs and output gradients of its
               half of the samples once, the ranks exchange them (half of the cross block's
               items each way) and each contracts its own block and its half of the cross block.
* ``surface``  ``loss_surface(model, x, y, random_directions(model, 2), "-1:1:S")``, an S x S
               filter-normalised plane (default 21) on ``--surface-n`` samples (default 256);
               under two ranks the grid's chunks go round robin.

(Flags are named so that torchrun's prefix-matching parser, which sees the worker's arguments,
takes none of them for its own.) Configurations: ``w1t1`` one process, one thread; ``w1t2`` one process, two threads (the same
cores as two ranks); ``w2t1`` ``torchrun --standalone --nproc-per-node 2``, one thread each (gloo).

Every configuration runs ``--repeat`` times (default 3), the configurations interleaved, and the
times printed are the medians (this machine's speed drifts by 10-20% between runs). Printed per
job: wall time of each configuration, the speed-up of ``w2t1`` over ``w1t1`` and
``w1t2``, the scaling efficiency T(w1t1) / (2 T(w2t1)), the communication share (rank 0's time
in collectives, waiting included, over its wall time), ``x cpu`` the CPU time of w1t1 over that
of w2t1's rank 0 (the work per rank, which on a machine shared with other jobs says more than the
wall times), and the largest difference between the
two-rank and the one-process results (they must agree to float32 rounding). On a 2-core machine
the speed-up is bounded by 2; the NTK's two ranks each rebuild the Jacobian rows of the other's
samples for their half of the cross block (the earlier tiles recomputed every tile's rows and
columns and measured 0.94x at N=512; the factors: 1.70x, median of 5 repeats, each 1.61-1.81x). The ranks' clocks start after a barrier once each has built
its model and data, so that one rank's slower start is not counted as the other's waiting.

    python benchmarks/bench_dist.py [--samples 512] [--steps 21] [--surface-n 256] [--jobs ntk surface]
                                    [--repeat 3] [--device cpu|cuda|auto] [--json]

``--device cuda`` runs every rank on its own GPU (NCCL; two ranks need two GPUs) and adds each
configuration's CUDA allocator peak on rank 0 (``max_memory_allocated``) to the report.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks._harness import (add_device_flag, log, peak_memory_mib, pick_device, print_result, run_worker,
                                 start_memory)

JOBS = ("ntk", "surface")


def _setup(n: int):
    import torch

    from models import create_model
    from probe import load_data
    from probe import calibrate_batchnorm

    data = load_data("digits")
    torch.manual_seed(0)
    model = create_model("add_resnet", in_chans=data.in_channels, num_classes=data.num_classes)
    model = calibrate_batchnorm(model.eval(), data.x_train[:256]).eval()
    return model, data.x_train[:n], data.y_train[:n]


def _start_together(ddp, dev) -> float:
    """The ranks' clocks start together: a barrier once every rank has built its model and data
    (the communication counters then start at zero); returns the memory baseline."""
    from probe.runtime.dist import COMM

    ddp.barrier()
    COMM["seconds"], COMM["calls"] = 0.0, 0
    return start_memory(dev)


def worker(args) -> None:
    """One configuration of one job (under torchrun or alone): rank 0 prints one JSON line."""
    import numpy as np
    import torch

    from probe.runtime.dist import COMM, current, setup, teardown

    dev = pick_device(args.device)
    ddp = setup(dev)
    dev = ddp.device(torch.device(dev))
    if args.job == "ntk":
        from probe import empirical_ntk

        model, x, _ = _setup(args.samples)
        model, x = model.to(dev), x.to(dev)
        base = _start_together(ddp, dev)
        t0, c0 = time.perf_counter(), time.process_time()
        out = empirical_ntk(model, x).kernel
    else:
        from probe import loss_surface, random_directions

        model, x, y = _setup(args.surface_n)
        model, x, y = model.to(dev), x.to(dev), y.to(dev)
        dirs = random_directions(model, 2)
        base = _start_together(ddp, dev)
        t0, c0 = time.perf_counter(), time.process_time()
        out = loss_surface(model, x, y, dirs, f"-1:1:{args.steps}").loss
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if current().main:
        np.save(args.out, np.asarray(out, dtype=np.float64))
        extra = {"gpu_extra_mib": peak_memory_mib(dev) - base} if dev.type == "cuda" else {}
        print_result({"job": args.job, "world": ddp.world, "threads": torch.get_num_threads(), "wall_s": wall,
                      "cpu_s": cpu, "comm_s": COMM["seconds"], "comm_calls": COMM["calls"], **extra})
    teardown()


def _run(job: str, world: int, threads: int, args, out: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    me = [str(Path(__file__).resolve()), "--worker", "--job", job, "--samples", str(args.samples), "--steps", str(args.steps),
          "--surface-n", str(args.surface_n), "--out", out, "--device", args.device]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *me]
           if world > 1 else [sys.executable, *me])
    done = run_worker(cmd, env=env, timeout=3600)
    if not done.ok:
        raise SystemExit(f"{job} w{world}t{threads} failed:\n{done.stderr[-2000:]}")
    return done.result


def _median_run(rs: list[dict]) -> dict:
    """One configuration's repeats: the median of each time, the first repeat's result."""
    import numpy as np

    out = dict(rs[0])
    for k in ("wall_s", "cpu_s", "comm_s", "gpu_extra_mib"):
        if k in out:
            out[k] = float(np.median([r[k] for r in rs]))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--samples", type=int, default=512, help="NTK samples")
    p.add_argument("--steps", type=int, default=21, help="surface points per axis")
    p.add_argument("--surface-n", type=int, default=256, help="surface samples")
    p.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS, help="which jobs to run")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each configuration, interleaved; the times reported are the medians")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_device_flag(p)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--job", default="ntk", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    import numpy as np
    import torch

    if pick_device(args.device) == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit(f"--device {args.device}: the two-rank configuration needs two GPUs, this machine has "
                         f"{torch.cuda.device_count()}")

    report = []
    with tempfile.TemporaryDirectory() as tmp:
        for job in args.jobs:
            reps: dict[str, list[dict]] = {"w1t1": [], "w1t2": [], "w2t1": []}
            for rep in range(args.repeat):          # interleaved, so that a slow spell hits every configuration
                for name, world, threads in (("w1t1", 1, 1), ("w1t2", 1, 2), ("w2t1", 2, 1)):
                    out = os.path.join(tmp, f"{job}-{name}.npy")
                    reps[name].append(_run(job, world, threads, args, out))
                    reps[name][-1]["result"] = np.load(out)
                    log(f"{job:<8} {name} ({rep + 1}/{args.repeat}): {reps[name][-1]['wall_s']:8.2f} s")
            runs = {name: _median_run(rs) for name, rs in reps.items()}
            pairs = [a["wall_s"] / b["wall_s"] for a, b in zip(reps["w1t1"], reps["w2t1"])]
            ref, two = runs["w1t1"]["result"], runs["w2t1"]["result"]
            scale = float(np.nanmax(np.abs(ref))) or 1.0
            row = {"job": job, **{f"{k}_s": v["wall_s"] for k, v in runs.items()},
                   "speedup_vs_w1t1": runs["w1t1"]["wall_s"] / runs["w2t1"]["wall_s"],
                   "speedup_vs_w1t2": runs["w1t2"]["wall_s"] / runs["w2t1"]["wall_s"],
                   "cpu_speedup": runs["w1t1"]["cpu_s"] / runs["w2t1"]["cpu_s"],
                   "efficiency": runs["w1t1"]["wall_s"] / (2 * runs["w2t1"]["wall_s"]),
                   "comm_share": runs["w2t1"]["comm_s"] / runs["w2t1"]["wall_s"],
                   "comm_calls": runs["w2t1"]["comm_calls"],
                   "max_rel_diff": float(np.nanmax(np.abs(two - ref))) / scale,
                   "repeat": args.repeat, "speedup_per_repeat": pairs,
                   **{f"{k}_gpu_extra_mib": v["gpu_extra_mib"] for k, v in runs.items() if "gpu_extra_mib" in v}}
            report.append(row)
    if args.json:
        print(json.dumps({"jobs": report, "samples": args.samples, "steps": args.steps, "surface_n": args.surface_n}))
        return
    print(f"{'job':<8} {'w1t1 s':>8} {'w1t2 s':>8} {'w2t1 s':>8} {'x w1t1':>7} {'x w1t2':>7} {'effic.':>7} "
          f"{'comm':>6} {'x cpu':>6} {'max rel diff':>13}")
    for r in report:
        print(f"{r['job']:<8} {r['w1t1_s']:8.2f} {r['w1t2_s']:8.2f} {r['w2t1_s']:8.2f} {r['speedup_vs_w1t1']:7.2f} "
              f"{r['speedup_vs_w1t2']:7.2f} {r['efficiency']:7.2f} {r['comm_share']:6.1%} {r['cpu_speedup']:6.2f} "
              f"{r['max_rel_diff']:13.2e}")
        print(f"{'':<8} x w1t1 per repeat (w1t1 / w2t1 of the same round): "
              + ", ".join(f"{x:.2f}" for x in r["speedup_per_repeat"]))
        if "w1t1_gpu_extra_mib" in r:
            print(f"{'':<8} peak CUDA allocated above the start (rank 0), MiB: " + ", ".join(
                f"{k} {r[f'{k}_gpu_extra_mib']:.0f}" for k in ("w1t1", "w1t2", "w2t1")))


if __name__ == "__main__":
    main()
