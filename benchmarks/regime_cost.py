"""What one run of the ``regimes`` experiment costs here, to plan its full setting on other machines.

Trains one short run per depth of the full setting's network (WRN-depth-2, the seed's block, fmm18)
on ``--samples`` Fashion-MNIST images at the full setting's 28x28 for one epoch (test evaluation
on ``--test`` images), times it, and projects the wall time of every full-setting run from the
measured seconds per training sample-epoch and per evaluated test sample::

    python benchmarks/regime_cost.py                   # 2,000 samples, this machine's threads
    python benchmarks/regime_cost.py --device cuda --samples 20000

The projection is linear in samples x epochs (a run's cost is its passes over the data); each
regime's test split is evaluated once per epoch.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--samples", type=int, default=2000, help="training samples of the timed epoch")
    p.add_argument("--test", type=int, default=1000, help="test samples evaluated after it")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)

    import torch

    from experiments._regimes import regime_config, settings
    from probe import RunStore
    from probe import train
    from probe.errors import UserError, first_line

    full = [r for r in settings(False).regimes if r.data == "fashion-mnist"]
    per_depth = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs")
        for depth in sorted({r.depth for r in full}):
            r = next(r for r in full if r.depth == depth)
            cfg = replace(regime_config(r, "fmm18", 0), epochs=1, limit_train=args.samples, limit_test=args.test,
                          device=args.device)
            t0 = time.perf_counter()
            try:
                res = train(cfg, store)
            except UserError as e:                   # a missing data set, a bad device: one line
                print(f"regime_cost: {first_line(e)}", file=sys.stderr)
                return 2
            wall = time.perf_counter() - t0
            epoch = res.metrics[-1]["epoch_time_s"]
            per_depth[depth] = {"train_s_per_sample_epoch": epoch / args.samples,
                                "eval_s_per_sample": max(wall - epoch, 0.0) / args.test, "wall_s": wall}
    rows = []
    for r in full:
        c = per_depth[r.depth]
        n_train = r.n_train or 60000
        n_test = r.limit_test or 10000
        secs = r.epochs * (n_train * c["train_s_per_sample_epoch"] + n_test * c["eval_s_per_sample"])
        rows.append({"regime": r.name, "epochs": r.epochs, "n_train": n_train, "projected_run_s": secs})
    n_seeds = len(settings(False).seeds)
    n_variants = len(settings(False).variants)
    total = sum(x["projected_run_s"] for x in rows) * n_seeds * n_variants
    out = {"device": str(args.device), "threads": torch.get_num_threads(), "per_depth": per_depth, "runs": rows,
           "base_grid_s": total, "seeds": n_seeds, "variants": n_variants}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"measured on {args.device} with {torch.get_num_threads()} threads, {args.samples} samples at 28x28:")
    for d, c in per_depth.items():
        print(f"  depth {d:>2}: {1e3 * c['train_s_per_sample_epoch']:.2f} ms per training sample-epoch, "
              f"{1e3 * c['eval_s_per_sample']:.2f} ms per test sample")
    print("projected wall time of one full-setting run:")
    for x in rows:
        print(f"  {x['regime']:<16} {x['epochs']:>3} epochs x {x['n_train']:>6} samples: "
              f"{x['projected_run_s'] / 60:7.1f} min")
    print(f"the base grid ({n_variants} variants x {n_seeds} seeds, matched-loss runs not counted): "
          f"{total / 3600:.1f} h of one such process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
