"""NTK probe memory budget: peak RSS of every method against the budget, and large-N Lanczos.

Part 1, peak RSS against the budget. For each method of ``empirical_ntk`` (trace kernel:
``auto``, ``jacobian``, ``layerwise``, ``ntvp``) and of ``ntk_topk_lanczos`` (trace kernel,
k=5: ``gram``, ``ntvp``), one fresh subprocess builds the model and the inputs, reads its
resident set (``VmRSS`` of /proc/self/status), resets the high-water mark (``5`` written to
/proc/self/clear_refs), runs the call and reads ``VmHWM``; ``extra`` = VmHWM - VmRSS before is
what the call itself needed. Before building the model each worker makes the same call once on
a tiny model of the same family (MLP width 16, or 2 inputs), so that the first call's one-time
costs (lazy imports and initialisation, ~80 MB) are not counted (``--no-warmup`` counts them).
Models:

* ``mlp``: an NTK-parametrised MLP, 12 inputs -> W -> W -> 10 outputs, ReLU, weights and biases
  N(0, 1), every layer's output multiplied by 1/sqrt(fan_in) in forward (W=16384: 268.8 M
  parameters, 1.08 GB in float32), on N random normal inputs (``--widths``, ``--n``);
* ``resnet20_add``: the registry's ResNet-20 (BatchNorm statistics averaged over random data, as
  ``benchmarks/bench_ntk.py`` builds it) on N=256 random 3x32x32 inputs (``--resnet-n``).

The verdict column ``within budget + model`` asks: extra <= budget + the model's own bytes
(parameters x 4)? The target is extra <= budget; a copy of the model's parameters is allowed on
top. A method may refuse the budget with a :class:`UserError` before allocating anything large:
that is a pass, reported as ``refused`` with the message. Kernels of the methods that ran are
compared with the first one of layerwise, auto, jacobian, ntvp that ran (max |diff| / max |K|),
the Lanczos eigenvalues with that kernel's top eigenvalues (max relative difference).

A watchdog thread in the parent reads each worker's ``VmRSS`` from /proc/<pid>/status every
0.2 s and kills it above ``--kill-above-gib`` (reported as ``killed above X GiB``, with the
high-water mark at that moment), or after ``--timeout-s`` (``timeout``).

Part 2 (``--lanczos-n``, default 0 = skip): ``ntk_topk_lanczos(model, x, k=20, method="auto",
memory_budget_bytes=4 GiB)`` on N random normal 1x8x8 inputs (seeded) with ``resnet20_add`` and
``resnet20_mul`` built with 1 input channel: wall time, extra peak RSS, method, Krylov dimension,
passes over the data, convergence, top-3 eigenvalues. Target at N=60,000: within 30 minutes
and 4 GB per model.

    python benchmarks/ntk_memory.py [--widths 16384] [--n 12] [--budget-gib 4]
                                    [--models mlp resnet20_add] [--resnet-n 256]
                                    [--resnet-budget-gib 1] [--quick] [--kill-above-gib 12]
                                    [--lanczos-n 60000] [--device cpu|cuda|auto] [--json]

``--device cuda`` (or ``auto`` on a GPU machine) runs the calls on the GPU: ``extra`` is then the CUDA
allocator's peak above what was allocated before the call (``max_memory_allocated``, each worker a
fresh process), while the watchdog still guards the host's resident set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch import nn

from benchmarks._harness import (GIB, MIB, add_device_flag, environment, log, memory_unit, peak_memory_mib,
                                 pick_device, print_ready, print_result, reset_peak, run_watched, script_command,
                                 start_memory, status_kib, sync)

NTK_METHODS = ["auto", "jacobian", "layerwise", "ntvp"]
LANCZOS_METHODS = ["gram", "ntvp"]


# --- the models ----------------------------------------------------------------------------------


class NtkMLP(nn.Module):
    """MLP in the NTK parametrisation: weights and biases N(0, 1), each layer's output multiplied
    by 1/sqrt(fan_in); ReLU between layers."""

    def __init__(self, d_in: int, width: int, d_out: int, depth: int = 2):
        super().__init__()
        dims = [d_in] + [width] * depth + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.normal_()
                layer.bias.normal_()

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) * layer.in_features ** -0.5
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def build_mlp(width: int, n: int, seed: int = 0):
    """The 12 -> width -> width -> 10 NTK MLP (eval mode) and n random normal inputs (n, 12)."""
    torch.manual_seed(seed)
    model = NtkMLP(12, width, 10).eval()
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def build_resnet(name: str, n: int, size: int, in_chans: int = 3, seed: int = 0):
    """The registry's ``name`` in eval mode with BatchNorm running statistics averaged over 256
    random inputs, and n random normal inputs: ``benchmarks/bench_ntk.py``'s construction."""
    from benchmarks.bench_ntk import build as build_bench
    return build_bench(name, n, size, in_chans=in_chans, seed=seed)


def build(case: dict):
    if case["model"] == "mlp":
        model, x = build_mlp(case["width"], case["n"])
    else:
        model, x = build_resnet(case["model"], case["n"], case["size"], case["in_chans"])
    dev = case.get("device", "cpu")
    return model.to(dev), x.to(dev)


# --- the worker (one per subprocess) -------------------------------------------------------------


def _call(case: dict, model, x):
    from probe import empirical_ntk, ntk_topk_lanczos
    budget = int(case["budget_gib"] * GIB)
    if case["call"] == "ntk":
        return empirical_ntk(model, x, kind="trace", method=case["method"], memory_budget_bytes=budget)
    return ntk_topk_lanczos(model, x, k=case["k"], kind="trace", method=case["method"],
                            memory_budget_bytes=budget)


def _warm_up(case: dict) -> None:
    """The same call on a tiny model of the same family: the first call's one-time costs (lazy
    imports and initialisation, ~80 MB of RSS) then do not count as the method's memory."""
    from probe import UserError
    tiny = {**case, "n": 2, "k": 1, "budget_gib": 1.0}
    if case["model"] == "mlp":
        tiny["width"] = 16
    try:
        _call(tiny, *build(tiny))
    except UserError:
        pass


def worker(case: dict) -> dict:
    """Builds the case's model and data, then measures one call: peak RSS above the set-up."""
    import gc
    from probe import UserError

    if case.get("warmup", True):
        _warm_up(case)
    model, x = build(case)
    n_params = sum(p.numel() for p in model.parameters())
    gc.collect()
    base = status_kib("VmRSS")
    reset_peak()                                        # VmHWM := VmRSS
    print_ready({"rss_base_kib": base, "n_params": n_params})
    out = {"n_params": n_params, "model_bytes": 4 * n_params, "rss_base_kib": base}
    cuda = case.get("device", "cpu") != "cpu"
    if cuda:
        out["gpu_base_kib"] = int(start_memory(case["device"]) * 1024)
    t0 = time.perf_counter()
    try:
        res = _call(case, model, x)
        if case["call"] == "ntk":
            if case.get("save"):
                np.save(case["save"], res.kernel)
            out.update(method_used=res.method, schedule=res.schedule, notes=list(res.notes))
        else:
            out.update(method_used=res.method, subspace_dim=res.subspace_dim, n_passes=res.n_passes,
                       n_matvecs=res.n_matvecs, converged=bool(res.converged),
                       block_vectors=res.block_vectors, eigenvalues=res.eigenvalues.tolist(),
                       dtype=res.dtype, notes=list(res.notes))
        out.update(status="ok", planned_bytes=int(res.peak_memory_bytes))
    except UserError as e:
        out.update(status="refused", message=str(e))
    if cuda:
        sync(case["device"])
        out["gpu_peak_kib"] = int(peak_memory_mib(case["device"]) * 1024)
    out["wall_s"] = time.perf_counter() - t0
    out["rss_peak_kib"] = status_kib("VmHWM")
    return out


# --- the parent: spawn, watch, collect -----------------------------------------------------------


def spawn(case: dict, kill_above_gib: float, timeout_s: float) -> dict:
    """Runs ``case`` in a fresh subprocess under the RSS watchdog; returns its result row."""
    w = run_watched(script_command(__file__, "--worker", json.dumps(case)), cap_gib=kill_above_gib,
                    timeout_s=timeout_s, peak_after_ready=True)
    row = w.row(case)
    if row.get("gpu_peak_kib") is not None:                  # on CUDA: the allocator's peak above the start
        row["extra_bytes"] = (row["gpu_peak_kib"] - row["gpu_base_kib"]) * 1024
    elif row.get("rss_base_kib") is not None and row.get("rss_peak_kib"):
        row["extra_bytes"] = (row["rss_peak_kib"] - row["rss_base_kib"]) * 1024
    budget = int(row["budget_gib"] * GIB)
    model_bytes = row.get("model_bytes") or 4 * (row.get("n_params") or n_params_of(row))
    row["model_bytes"] = model_bytes
    if row["status"] == "ok":
        row["verdict"] = "yes" if row["extra_bytes"] <= budget + model_bytes else "NO"
        row["within_budget"] = row["extra_bytes"] <= budget
    else:
        row["verdict"] = row["status"]
    return row


def n_params_of(case: dict) -> int:
    """Parameter count of a case's model without building it (the MLP), else 0 (unknown)."""
    if case["model"] == "mlp":
        w = case["width"]
        return 12 * w + w + w * w + w + 10 * w + 10
    return 0


def _compare(rows: list[dict], tmp: str) -> None:
    """Max relative kernel difference of each ran ``empirical_ntk`` method against a reference
    (the first of layerwise, auto, jacobian, ntvp that ran), and of the Lanczos eigenvalues against
    that reference's top eigenvalues."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r.get("width"), r["n"]), []).append(r)
    for group in groups.values():
        ran = {r["method"]: r for r in group if r["call"] == "ntk" and r["status"] == "ok"}
        ref_name = next((m for m in ["layerwise", "auto", "jacobian", "ntvp"] if m in ran), None)
        if ref_name is None:
            continue
        K = np.load(ran[ref_name]["save"])
        ev = np.linalg.eigvalsh(0.5 * (K + K.T))[::-1]
        for r in group:
            if r["status"] != "ok":
                continue
            if r["call"] == "ntk":
                r["rel_diff"] = float(np.abs(np.load(r["save"]) - K).max() / np.abs(K).max())
            else:
                e = np.asarray(r["eigenvalues"])
                r["rel_diff"] = float(np.max(np.abs(e - ev[:e.size]) / np.abs(ev[:e.size])))
            r["rel_diff_vs"] = ref_name


# --- driver --------------------------------------------------------------------------------------


def _fmt_mib(b) -> str:
    return "-" if b is None else f"{b / MIB:.0f}"


def _print_part1(rows: list[dict]) -> None:
    print(f"{'model':<11} {'P (M)':>7} {'N':>4} {'budget':>7} {'call':<7} {'method':<9} {'used':<9} "
          f"{'wall s':>7} {'plan MiB':>8} {'extra MiB':>9} {'model MiB':>9} {'<=budget':>8} "
          f"{'<=budget+model':>14} {'rel diff':>8}  note")
    for r in rows:
        label = r["model"] if r["model"] != "mlp" else f"mlp W={r['width']}"
        p = r.get("n_params") or n_params_of(r)
        within = r.get("within_budget")
        note = r.get("message", "") if r["status"] != "ok" else r.get("schedule", "")
        if r["status"] == "ok" and r["call"] == "lanczos":
            note = (f"dim {r['subspace_dim']}, {r['n_passes']} passes, converged={r['converged']}")
        rd = r.get("rel_diff")
        print(f"{label:<11} {p / 1e6:>7.1f} {r['n']:>4} {r['budget_gib']:>5g}Gi {r['call']:<7} "
              f"{r['method']:<9} {r.get('method_used', '-'):<9} {r.get('wall_s', float('nan')):>7.1f} "
              f"{_fmt_mib(r.get('planned_bytes')):>8} {_fmt_mib(r.get('extra_bytes')):>9} "
              f"{_fmt_mib(r['model_bytes'] or None):>9} "
              f"{'-' if within is None else ('yes' if within else 'NO'):>8} {r['verdict']:>14} "
              f"{'-' if rd is None else f'{rd:.1e}':>8}  {note}")


def _print_part2(rows: list[dict]) -> None:
    for r in rows:
        head = f"{r['model']}: top-{r['k']} Lanczos, trace kernel, N={r['n']} 1x8x8, budget {r['budget_gib']:g} GiB: "
        if r["status"] != "ok":
            print(head + f"{r['status']}: {r.get('message', '')} (extra {_fmt_mib(r.get('extra_bytes'))} MiB)")
            continue
        ev = r["eigenvalues"]
        unit = "GPU allocated" if r.get("device", "cpu") != "cpu" else "RSS"
        print(head + f"{r['wall_s']:.0f} s ({r['wall_s'] / 60:.1f} min), extra peak {unit} "
              f"{_fmt_mib(r['extra_bytes'])} MiB (planned {_fmt_mib(r['planned_bytes'])}), method "
              f"{r['method_used']}, Krylov dim {r['subspace_dim']}, {r['n_passes']} passes "
              f"(blocks of {r['block_vectors']}), converged={r['converged']}, top-3 "
              + ", ".join(f"{e:.6g}" for e in ev[:3]) + f", {r['dtype']}")
        for note in r.get("notes", []):
            print(f"    note: {note}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mlp", "resnet20_add"], choices=["mlp", "resnet20_add"],
                    help="models of part 1")
    ap.add_argument("--widths", type=int, nargs="+", default=[16384], help="MLP hidden widths W")
    ap.add_argument("--n", type=int, default=12, help="MLP input samples N")
    ap.add_argument("--budget-gib", type=float, default=4.0, help="memory_budget_bytes for the MLP, GiB")
    ap.add_argument("--resnet-n", type=int, default=256, help="resnet20_add input samples N (3x32x32)")
    ap.add_argument("--resnet-budget-gib", type=float, default=1.0,
                    help="memory_budget_bytes for resnet20_add, GiB")
    ap.add_argument("--methods", nargs="*", default=NTK_METHODS, choices=NTK_METHODS,
                    help="empirical_ntk methods (trace kernel)")
    ap.add_argument("--lanczos-methods", nargs="*", default=LANCZOS_METHODS, choices=LANCZOS_METHODS,
                    help="ntk_topk_lanczos methods of part 1 (k=--k)")
    ap.add_argument("--k", type=int, default=5, help="eigenvalues of the part-1 Lanczos runs")
    ap.add_argument("--quick", action="store_true", help="W=4096 instead of --widths (development)")
    ap.add_argument("--kill-above-gib", type=float, default=12.0,
                    help="the watchdog kills a worker whose resident set exceeds this, GiB")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="the watchdog kills a worker after this many seconds")
    ap.add_argument("--lanczos-n", type=int, default=0, help="part 2: N of the top-20 Lanczos runs (0: skip)")
    ap.add_argument("--lanczos-models", nargs="+", default=["resnet20_add", "resnet20_mul"],
                    choices=["resnet20_add", "resnet20_mul"], help="models of part 2 (1x8x8 inputs)")
    ap.add_argument("--lanczos-budget-gib", type=float, default=4.0, help="memory_budget_bytes of part 2, GiB")
    ap.add_argument("--lanczos-k", type=int, default=20, help="eigenvalues of part 2")
    ap.add_argument("--no-warmup", action="store_true",
                    help="count the first call's one-time costs (no warm-up call on a tiny model)")
    ap.add_argument("--part2-only", action="store_true", help="skip part 1")
    ap.add_argument("--json", action="store_true", help="print one JSON report instead of the tables")
    add_device_flag(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print_result(worker(json.loads(args.worker)))
        return 0

    widths = [4096] if args.quick else args.widths
    env = environment(kill_above_gib=args.kill_above_gib)
    part1, part2 = [], []
    with tempfile.TemporaryDirectory() as tmp:
        dev = pick_device(args.device)
        cases, warm = [], {"warmup": not args.no_warmup} | ({"device": dev} if dev != "cpu" else {})
        if not args.part2_only:
            for name in args.models:
                for w in (widths if name == "mlp" else [None]):
                    base = ({"model": "mlp", "width": w, "n": args.n, "budget_gib": args.budget_gib}
                            if name == "mlp" else
                            {"model": name, "n": args.resnet_n, "size": 32, "in_chans": 3,
                             "budget_gib": args.resnet_budget_gib}) | warm
                    for m in args.methods:
                        save = os.path.join(tmp, f"{name}_{w}_{m}.npy")
                        cases.append({**base, "call": "ntk", "method": m, "save": save})
                    for m in args.lanczos_methods:
                        cases.append({**base, "call": "lanczos", "method": m, "k": args.k})
        for case in cases:
            log(f"{case['model']} {case.get('width') or ''} N={case['n']} {case['call']} {case['method']}")
            row = spawn(case, args.kill_above_gib, args.timeout_s)
            log("  " + json.dumps({k: v for k, v in row.items() if k not in ("eigenvalues", "save")}))
            part1.append(row)
        _compare(part1, tmp)
        for row in part1:
            row.pop("save", None)
        for name in args.lanczos_models if args.lanczos_n else []:
            case = {"model": name, "n": args.lanczos_n, "size": 8, "in_chans": 1, "call": "lanczos",
                    "method": "auto", "k": args.lanczos_k, "budget_gib": args.lanczos_budget_gib} | warm
            log(f"{name} Lanczos N={args.lanczos_n}")
            row = spawn(case, args.kill_above_gib, args.timeout_s)
            log("  " + json.dumps(row))
            part2.append(row)
    report = {"env": env, "part1": part1, "part2": part2}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"threads={env['threads']} cpus={env['cpus']} torch={env['torch']} "
          f"load avg at start={env['load_avg_start'][0]:.2f}; watchdog cap {args.kill_above_gib:g} GiB")
    if dev != "cpu":
        print(f"device {dev}: extra is the {memory_unit(dev)} peak above the allocation before the call")
    if part1:
        _print_part1(part1)
    if part2:
        _print_part2(part2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
