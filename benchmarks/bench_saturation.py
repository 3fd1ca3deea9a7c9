"""Saturation probe: streamed statistics (``probe.probes.saturation.saturation``) against a baseline
that keeps every gate's logits, wall time and peak memory.

Model: ``wrn`` (default WRN-16-4) with a sigmoid fusion (default ``fmm08``,
``sig(bn[b fixed 0](r)) * bn_s[b fixed 1](s)``: one ``models.Gate`` per block, six in all), float32,
eval mode, at its initialisation, on random ``3 x S x S`` inputs (default S = 32, N = 256), CPU.
Methods (each in a fresh subprocess):

* ``forward``   the plain forward pass over the same chunks, no probe (the floor);
* ``ours``      ``saturation(model, x, batch_size=B)``: hooks on every module and a
                TorchFunctionMode, per-gate running float64 sums and an int64 histogram, every logit
                tensor reduced in slices of at most 2^18 elements (CPU);
* ``baseline``  forward hooks on the ``models.find_gates`` gates that append each chunk's logits
                (the tensors themselves, no copy), then per gate ``torch.cat``, a float64 copy and
                the same numbers (fractions, gain, mean, std, ``torch.histc`` histogram with
                under/overflow) computed on the whole tensor at the end.

Memory: ``getrusage`` peak resident set size (``ru_maxrss``; tracemalloc does not see torch's
allocations) after imports, model, data and a one-sample warm-up forward (``base``) and at the end
(``peak``); ``extra = peak - base`` is what the method needed, forward activations included. With
``--device cuda`` (``auto`` on a GPU machine) the peak is ``torch.cuda.max_memory_allocated`` instead.
Wall time is the best of ``--repeats`` runs inside the worker. The baseline's numbers are checked
against ours (max absolute difference of the per-gate fractions, gain, mean and std; histogram counts equal).

    python benchmarks/bench_saturation.py [--depth 16] [--widen 4] [--fusion fmm08] [--size 32]
                                          [--n 256] [--batch-size 256] [--threads 1] [--repeats 1]
                                          [--methods forward ours baseline] [--device cpu|cuda|auto] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks._harness import (add_device_flag, memory_unit, peak_memory_mib, pick_device, print_result, run_worker,
                                 script_command, start_memory, sync)

METHODS = ("forward", "ours", "baseline")


def _baseline(model, x, batch_size: int, bins: int, threshold: float, hist_max: float) -> dict:
    """Keep every gate's logits, compute the numbers at the end."""
    import math

    import torch

    from models import find_gates

    logits: dict[str, list] = {}
    handles = []
    for info in find_gates(model):
        mod = model.get_submodule(info.path)
        logits[info.path] = []
        handles.append(mod.register_forward_hook(
            lambda m, args, out, key=info.path: logits[key].append(args[0].detach())))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    out = {}
    kinds = {g.path: g.kind for g in find_gates(model)}
    for name, chunks in logits.items():
        z = torch.cat([c.reshape(-1) for c in chunks]).double()          # (all logits,) float64
        assert kinds[name] == "sigmoid", "the baseline handles sigmoid gates only"
        fin = torch.isfinite(z)
        z = z[fin]
        s = torch.sigmoid(z)
        n = z.numel()
        hist = torch.histc(z, bins=bins, min=-hist_max, max=hist_max)
        out[name] = {
            "count": n, "frac_logit_sat": (z.abs() > threshold).sum().item() / n,
            "frac_output_sat": ((s < 0.05) | (s > 0.95)).sum().item() / n,
            "gain": (s * (1 - s) / 0.25).mean().item(), "mean": z.mean().item(),
            "std": math.sqrt(z.var(unbiased=False).item()),
            "hist": [int((z < -hist_max).sum())] + [int(v) for v in hist.tolist()] + [int((z > hist_max).sum())],
        }
        del chunks[:]
    return out


def worker(args) -> dict:
    import torch

    import models
    from probe import saturation

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(pick_device(args.device))
    model = models.create_model("wrn", depth=args.depth, widen=args.widen, fusion=args.fusion,
                                num_classes=10, in_chans=3).to(dev).eval()
    x = torch.randn(args.n, 3, args.size, args.size).to(dev)
    with torch.no_grad():
        model(x[:1])                                                      # warm-up: kernels, allocator
    base = start_memory(dev)
    best, numbers = float("inf"), None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        if args.method == "forward":
            with torch.no_grad():
                for i in range(0, args.n, args.batch_size):
                    model(x[i:i + args.batch_size])
        elif args.method == "ours":
            r = saturation(model, x, batch_size=args.batch_size, bins=args.bins, threshold=args.threshold,
                           hist_max=args.hist_max)
            numbers = {str(r.names[i]): {"count": int(r.count[i]), "frac_logit_sat": float(r.frac_logit_sat[i]),
                                         "frac_output_sat": float(r.frac_output_sat[i]), "gain": float(r.gain[i]),
                                         "mean": float(r.mean[i]), "std": float(r.std[i]),
                                         "hist": r.hist[i].tolist()} for i in range(r.n_gates)}
        else:
            numbers = _baseline(model, x, args.batch_size, args.bins, args.threshold, args.hist_max)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    peak = peak_memory_mib(dev)
    params = sum(p.numel() for p in model.parameters())
    return {"method": args.method, "seconds": best, "base_mib": base, "peak_mib": peak, "extra_mib": peak - base,
            "params": params, "numbers": numbers}


def _compare(ours: dict, other: dict) -> dict:
    if ours is None or other is None:
        return {}
    worst, hist_bad = 0.0, 0
    for name, a in ours.items():
        b = other[name]
        for k in ("frac_logit_sat", "frac_output_sat", "gain", "mean", "std"):
            worst = max(worst, abs(a[k] - b[k]))
        hist_bad += sum(abs(u - v) for u, v in zip(a["hist"], b["hist"]))
        assert a["count"] == b["count"], name
    return {"max_abs_diff": worst, "hist_count_diff": hist_bad, "gates": len(ours)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--widen", type=int, default=4)
    p.add_argument("--fusion", default="fmm08")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--bins", type=int, default=64)
    p.add_argument("--threshold", type=float, default=3.0)
    p.add_argument("--hist-max", type=float, default=12.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    add_device_flag(p)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--json", action="store_true")
    p.add_argument("--method", help=argparse.SUPPRESS)                   # worker mode
    args = p.parse_args(argv)
    if args.method:
        print_result(worker(args))
        return 0
    rows = {}
    for method in args.methods:
        cmd = script_command(__file__, "--method", method, *[
            a for k, v in vars(args).items() if k not in ("methods", "json", "method")
            for a in (f"--{k.replace('_', '-')}", str(v))])
        done = run_worker(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if not done.ok:
            print(done.stderr, file=sys.stderr)
            return done.returncode or 1
        rows[method] = done.result
    check = _compare(rows.get("ours", {}).get("numbers"), rows.get("baseline", {}).get("numbers"))
    if args.json:
        print(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "method"},
                          "rows": {k: {kk: vv for kk, vv in v.items() if kk != "numbers"} for k, v in rows.items()},
                          "check": check}, indent=2))
        return 0
    any_row = next(iter(rows.values()))
    print(f"WRN-{args.depth}-{args.widen} fusion {args.fusion} ({any_row['params'] / 1e6:.2f} M params), "
          f"{args.n} x 3x{args.size}x{args.size}, batch {args.batch_size}, {args.device}, {args.threads} thread(s)")
    unit = memory_unit(pick_device(args.device))
    print(f"{'method':<10} {'wall s':>8} {'base MiB':>9} {'peak MiB':>9} {'extra MiB':>10}   ({unit})")
    for m, r in rows.items():
        print(f"{m:<10} {r['seconds']:8.2f} {r['base_mib']:9.0f} {r['peak_mib']:9.0f} {r['extra_mib']:10.0f}")
    if "ours" in rows and "baseline" in rows:
        o, b = rows["ours"], rows["baseline"]
        print(f"baseline / ours: wall {b['seconds'] / o['seconds']:.2f}x, extra memory "
              f"{b['extra_mib'] / max(o['extra_mib'], 1.0):.2f}x")
        if "forward" in rows:
            f = rows["forward"]
            print(f"over a plain forward: ours +{o['seconds'] - f['seconds']:.2f} s, "
                  f"+{o['extra_mib'] - f['extra_mib']:.0f} MiB; baseline +{b['seconds'] - f['seconds']:.2f} s, "
                  f"+{b['extra_mib'] - f['extra_mib']:.0f} MiB")
    if check:
        print(f"check ({check['gates']} gates): max |ours - baseline| = {check['max_abs_diff']:.2e} "
              f"(fractions, gain, mean, std), histogram counts differing: {check['hist_count_diff']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
