"""Hessian probe: ``probe.probes.hessian`` against PyHessian, curvlinops and hessian-eigenthings.

One model, one batch, one loss for everyone: the registry's ``resnet20_add`` (ResNet-20, widths
16/32/64, BatchNorm, O=10 outputs, ~0.27 M parameters; ``create_model("resnet20_add", in_chans=3,
num_classes=10)``), float32, eval mode with BatchNorm running statistics averaged over 256 random
inputs (``benchmarks/bench_ntk.py``'s ``build``, imported, not copied), ``--n`` seeded random
3x``--size``x``--size`` inputs and seeded random labels, mean cross-entropy. Every worker rebuilds
that point from the seed and reports the loss there (the fingerprint); the parent checks that all
fingerprints agree before comparing anything.

Libraries (each in its own process, installed for the run only with
``pip install --no-deps --target <dir>``, put on the ``sys.path`` of that worker only, never a
project dependency; one that fails to install or import is reported and skipped):

* ``ours``         ``curvature_operator`` / ``hessian_spectrum`` / ``hutchpp_trace`` /
                   ``hutchinson_trace`` / ``slq_density`` of ``probe.probes.hessian``
* ``pyhessian``    PyHessian 0.1: ``hessian(model, criterion, data=(x, y), cuda=False)`` (it builds
                   the gradient graph once and reuses it for every product), ``.eigenvalues``
                   (power iteration with deflation), ``.trace(maxIter=m, tol=-inf)`` (its default
                   tol stops early), ``.density`` (calls ``torch.eig``, removed from torch: shimmed
                   onto ``torch.linalg.eigh`` inside that worker only)
* ``curvlinops``   curvlinops-for-pytorch 3.0.1: ``HessianLinearOperator`` (``jvp(jacrev)``
                   products, vmapped over all columns of a matrix), ``scipy.sparse.linalg.eigsh``
                   on ``.to_scipy()``, ``hutchinson_trace`` / ``hutchpp_trace`` as shipped (all
                   probes in one vmapped product) and through a duck-typed wrapper that feeds the
                   same operator ``--curvlinops-chunk`` columns at a time, and
                   ``lanczos_approximate_spectrum`` (Papyan's SLQ; boundaries by ``eigsh``)
* ``eigenthings``  hessian-eigenthings 1.0.0a5: ``HessianOperator`` (double backward per product),
                   ``lanczos(which="LA", reorthogonalize=True)``, ``hutchinson``,
                   ``hutch_plus_plus``, ``spectral_density``
* ``floor_jvp`` / ``floor_dbl``  hand-written single products: ``jvp(grad(loss), (params,), (v,))``
                   over ``functional_call``, and ``autograd.grad`` of a gradient graph built once
                   (PyHessian's scheme; building it is its set-up)

Quantities (tables in this order):

1. one HVP: best and median of ``--hvp-repeats`` products after one warm-up product, for every
   library and both floors; ``ours / floor`` with floor the faster floor (target <= 1.3). Each
   worker also reports v^T H v for the same seeded v (checked against ``floor_jvp``).
2. top-1 and top-``--k`` eigenvalues against a converged reference (``ours`` with
   ``--ref-tol``, Krylov dimension up to 400, k + 3 eigenpairs, ``--ref-dtype``; run once in its
   own worker and cached as JSON under ``--cache-dir``, recomputed with ``--reference``). Per
   library a short ladder of settings (tolerance or Lanczos steps), cheapest first; the first
   rung whose largest relative eigenvalue error is <= ``--rel-acc`` is reported, else the best
   rung reached (flagged); the ladder stops early when its rungs have used ``--ladder-cap-s``.
3. trace. (a) On the registry's ``tiny_add`` (ResNet-8 width 4, 5.2 k parameters, ``--small-n``
   random 3x8x8 inputs) the exact trace of the dense Hessian (``torch.func.hessian`` in float64,
   summed over single samples), and for every estimator ``--small-seeds`` estimates with
   ``--trace-matvecs`` products each: RMS relative error, mean reported standard error, the
   spread of the estimates over seeds, and the RMS of error / reported stderr (about 1 when the
   reported stderr is honest). (b) On ``resnet20_add``: wall time of one estimate with a budget of
   ``--trace-matvecs`` products (Hutch++ budgets are rounded down to a multiple of 3 where a
   library requires it), the estimate and its reported stderr.
4. density: stochastic Lanczos quadrature with ``--slq-probes`` probes x ``--slq-steps`` steps
   (or the closest each library allows): wall time, products, and the largest Ritz node against
   the reference lambda_1 where the library returns its nodes.

Every worker is a fresh subprocess under a watchdog (``--timeout-s``; ``--mem-cap-gib`` on its
resident set, read from /proc/<pid>/status every 0.2 s) so a baseline that hangs or blows up is
reported (``timeout`` / ``killed``), not fatal. Peak memory: the worker resets its high-water mark
after imports, model and data (``5`` written to /proc/self/clear_refs) and reports ``VmHWM``
(``peak``) and ``VmHWM - VmRSS`` before the call (``extra``); with ``--device cuda`` (``auto`` on a
GPU machine) the point lives on the GPU and both are the CUDA allocator's peak instead
(``max_memory_allocated``, counted from the same moment). Wall times include each library's
set-up (building its operator or graph; shown separately). ``x ours`` = wall / ours' wall; the
targets: one HVP within 1.3x of the floor, and the top-k / trace / density at least 2x faster than
the fastest of the three libraries at equal accuracy (same budget for trace and density).

    python benchmarks/bench_hessian.py [--n 200] [--size 32] [--k 5] [--trace-matvecs 100]
        [--libraries pyhessian curvlinops eigenthings] [--parts hvp topk trace density]
        [--lib-dir DIR --skip-install] [--reference] [--timeout-s 2400] [--mem-cap-gib 10] [--json]

Layout: this file runs the comparison (workers under the watchdog of ``benchmarks/_harness.py``);
``_hessian_baselines.py`` holds the libraries' adapters and top-k ladders, ``_hessian_tasks.py``
the tasks a worker runs, ``_hessian_report.py`` the summary and the tables.
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

from benchmarks._harness import (add_device_flag, environment, log, pick_device, pip_install, print_result,
                                 run_watched, script_command)
from benchmarks._hessian_baselines import LIBRARIES, PACKAGES, ladder
from benchmarks._hessian_report import fmt_setting, ok, print_report, rel_err, summarise
from benchmarks._hessian_tasks import worker

PARTS = ["hvp", "topk", "trace", "density"]


# --- the parent: spawn under a watchdog ----------------------------------------------------------


def spawn(case: dict, args) -> dict:
    """Runs ``case`` in a fresh subprocess under the watchdog; returns its result row."""
    w = run_watched(script_command(__file__, "--worker", json.dumps(case)), cap_gib=args.mem_cap_gib,
                    timeout_s=args.timeout_s)
    row = w.row({k: v for k, v in case.items() if k not in ("lib_dir",)}, message_chars=400)
    if row.get("gpu_peak_mib") is not None:              # on CUDA: the allocator's peak, above the set-up
        row["extra_mb"] = row["gpu_peak_mib"] - row["gpu_base_mib"]
        row["peak_mb"] = row["gpu_peak_mib"]
    else:
        if row.get("rss_base_kib") is not None and row.get("rss_peak_kib"):
            row["extra_mb"] = (row["rss_peak_kib"] - row["rss_base_kib"]) / 1024
        if row.get("rss_peak_kib"):
            row["peak_mb"] = row["rss_peak_kib"] / 1024
    brief = {k: v for k, v in row.items() if k not in ("eigenvalues", "residuals", "estimates", "stderrs",
                                                       "times_s", "notes")}
    log("  " + json.dumps(brief))
    return row


def install(where: str) -> str | None:
    """``pip install --no-deps --target where`` the baselines; None (with the reason) on failure."""
    log("installing " + " ".join(PACKAGES) + f" into {where}")
    why = pip_install(PACKAGES, where, timeout=900)
    if why is not None:
        log(f"install failed ({why}); the baselines are skipped")
        return None
    return where


# --- the driver ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="samples in the batch (resnet20_add)")
    ap.add_argument("--size", type=int, default=32, help="input height/width (3 channels)")
    ap.add_argument("--seed", type=int, default=0, help="seed of model, inputs, labels and probes")
    ap.add_argument("--k", type=int, default=5, help="top-k eigenvalues (top-1 is always done too)")
    ap.add_argument("--rel-acc", type=float, default=1e-3, help="relative eigenvalue accuracy to reach")
    ap.add_argument("--trace-matvecs", type=int, default=100, help="products per trace estimate")
    ap.add_argument("--ours-trace-budgets", type=int, nargs="*", default=[30, 60],
                    help="smaller Hutch++ budgets for ours (the trace at an equal standard error)")
    ap.add_argument("--slq-probes", type=int, default=3, help="SLQ probe vectors")
    ap.add_argument("--slq-steps", type=int, default=50, help="Lanczos steps per SLQ probe")
    ap.add_argument("--hvp-repeats", type=int, default=3, help="timed products per library (after 1 warm-up)")
    ap.add_argument("--libraries", nargs="*", default=LIBRARIES, choices=LIBRARIES, help="baselines")
    ap.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS, help="quantities to compare")
    ap.add_argument("--small-n", type=int, default=16, help="samples of the small model's trace check")
    ap.add_argument("--small-seeds", type=int, default=10, help="estimates per estimator on the small model")
    ap.add_argument("--curvlinops-chunk", type=int, default=4,
                    help="columns per curvlinops product in its chunked trace runs")
    ap.add_argument("--no-unchunked", action="store_true",
                    help="skip curvlinops' trace estimators as shipped (all probes in one product)")
    ap.add_argument("--ladder-cap-s", type=float, default=900.0,
                    help="stop a library's top-k ladder once its rungs have used this many seconds")
    ap.add_argument("--ref-tol", type=float, default=1e-6, help="Lanczos tolerance of the reference")
    ap.add_argument("--ref-dtype", default="float32", choices=["float32", "float64"],
                    help="dtype of the reference eigenvalues")
    ap.add_argument("--reference", action="store_true",
                    help="recompute the cached references (eigenvalues, small-model exact trace)")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "landscape_probe_bench_hessian"),
                    help="where the references are cached (JSON)")
    ap.add_argument("--lib-dir", default=None,
                    help="install the baselines here (default: a temporary directory removed at exit)")
    ap.add_argument("--skip-install", action="store_true",
                    help="use the baselines already installed in --lib-dir")
    ap.add_argument("--timeout-s", type=float, default=2400.0, help="watchdog: kill a worker after this")
    ap.add_argument("--mem-cap-gib", type=float, default=10.0,
                    help="watchdog: kill a worker whose resident set exceeds this")
    ap.add_argument("--json", action="store_true", help="print one JSON report instead of the tables")
    add_device_flag(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print_result(worker(json.loads(args.worker)))
        return 0

    import torch

    if args.skip_install and not args.lib_dir:
        ap.error("--skip-install needs --lib-dir")
    t_start = time.monotonic()
    env = environment(python=sys.version.split()[0])
    point = {"model": "resnet20_add", "n": args.n, "size": args.size, "seed": args.seed}
    if pick_device(args.device) != "cpu":
        point["device"] = pick_device(args.device)
    report = {"env": env, "args": {k: v for k, v in vars(args).items() if k != "worker"}, "libraries": {},
              "hvp": [], "reference": None, "topk": [], "trace_small": [], "exact_small": None, "trace": [],
              "density": [], "summary": [], "fingerprints_agree": None}
    tmp = tempfile.TemporaryDirectory()
    libs = list(args.libraries)
    lib_dir = None
    if libs:
        lib_dir = args.lib_dir or os.path.join(tmp.name, "libs")
        if not args.skip_install and install(lib_dir) is None:
            libs = []
    for lib in list(libs):
        log(f"import {lib}")
        r = spawn({"task": "import", "lib": lib, "seed": 0, "lib_dir": lib_dir}, args)
        if ok(r):
            report["libraries"][lib] = {"version": r["version"], "file": r["file"]}
        else:
            log(f"{lib}: import failed ({r.get('message')}); skipped")
            report["libraries"][lib] = {"error": r.get("message")}
            libs.remove(lib)

    def run(case, **kw):
        return spawn({**point, **case, **kw, "lib_dir": lib_dir}, args)

    # 1. one HVP
    if "hvp" in args.parts:
        for lib in ["ours", "ours_block4", "floor_jvp", "floor_dbl"] + libs:
            log(f"HVP {lib}")
            real, block = ("ours", 4) if lib == "ours_block4" else (lib, 1)
            r = run({"task": "hvp", "lib": real, "repeats": args.hvp_repeats, "block": block})
            r["name"] = lib
            report["hvp"].append(r)

    # 2. reference and top-k ladders
    ref = None
    if "topk" in args.parts or "density" in args.parts:
        kref = args.k + 3
        key = f"resnet20_add_n{args.n}_s{args.size}_seed{args.seed}_k{kref}_{args.ref_dtype}_tol{args.ref_tol:g}_torch{torch.__version__}"
        path = Path(args.cache_dir) / f"bench_hessian_ref_{key}.json"
        if path.exists() and not args.reference:
            ref = json.loads(path.read_text())
            log(f"reference from cache {path}")
        else:
            log(f"reference: top-{kref}, tol {args.ref_tol:g}, {args.ref_dtype}")
            r = run({"task": "topk", "lib": "reference", "k": kref,
                     "setting": {"tol": args.ref_tol, "max_dim": 400, "dtype": args.ref_dtype}})
            if not ok(r):
                raise SystemExit(f"the reference failed: {r.get('message')}")
            ref = {k: r[k] for k in ("eigenvalues", "residuals", "converged", "n_hvps", "wall_s", "fingerprint",
                                     "dim", "notes")}
            ref["key"] = key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(ref))
        report["reference"] = ref
    if "topk" in args.parts:
        for k in sorted({1, args.k}):
            want = ref["eigenvalues"][:k]
            for lib in ["ours"] + libs:
                spent, rungs, chosen = 0.0, [], None
                for s in ladder(lib, k):
                    if spent > args.ladder_cap_s:
                        log(f"top-{k} {lib}: ladder cap {args.ladder_cap_s:g} s reached")
                        break
                    log(f"top-{k} {lib} {fmt_setting(s)}")
                    r = run({"task": "topk", "lib": lib, "k": k, "setting": s})
                    spent += r.get("wall_s", 0.0) or 0.0
                    r["err"] = rel_err(r.get("eigenvalues"), want) if ok(r) else float("inf")
                    rungs.append(r)
                    if r["err"] <= args.rel_acc:
                        chosen = r
                        break
                met = chosen is not None
                if chosen is None:
                    okr = [r for r in rungs if ok(r)]
                    chosen = min(okr, key=lambda r: r["err"]) if okr else rungs[-1]
                chosen = dict(chosen, met=met, rungs=[{"setting": r["setting"], "err": r["err"],
                                                       "wall_s": r.get("wall_s"), "n_hvps": r.get("n_hvps"),
                                                       "status": r["status"]} for r in rungs])
                report["topk"].append(chosen)

    # 3. trace: small model (exact) and resnet20_add (fixed budget)
    trace_methods = [("ours", "hutch++", None), ("ours", "hutchinson", None)]
    if "pyhessian" in libs:
        trace_methods.append(("pyhessian", "hutchinson", None))
    if "eigenthings" in libs:
        trace_methods += [("eigenthings", "hutchinson", None), ("eigenthings", "hutch++", None)]
    if "curvlinops" in libs:
        trace_methods += [("curvlinops", "hutchinson", None), ("curvlinops", "hutch++", None),
                          ("curvlinops", "hutchinson", args.curvlinops_chunk),
                          ("curvlinops", "hutch++", args.curvlinops_chunk)]
    if "trace" in args.parts:
        small = {"model": "tiny_add", "n": args.small_n, "size": 8, "seed": args.seed, "lib_dir": lib_dir}
        key = f"tiny_add_n{args.small_n}_s8_seed{args.seed}_torch{torch.__version__}"
        path = Path(args.cache_dir) / f"bench_hessian_exact_{key}.json"
        if path.exists() and not args.reference:
            ex = json.loads(path.read_text())
            log(f"exact small-model trace from cache {path}")
        else:
            log("exact trace of the small model (dense float64 Hessian)")
            ex = spawn({**small, "task": "exact_small", "lib": "exact"}, args)
            if ok(ex):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(ex))
        report["exact_small"] = ex
        for lib, method, chunk in trace_methods:
            if chunk is not None:
                continue                                       # the small model fits unchunked
            log(f"small-model trace {lib} {method}")
            r = spawn({**small, "task": "trace_small", "lib": lib, "method": method, "chunk": None,
                       "matvecs": args.trace_matvecs, "seeds": args.small_seeds}, args)
            r["name"] = f"{lib} {method}"
            if ok(r) and ok(ex):
                import numpy as np
                t = ex["trace"]
                e = np.asarray(r["estimates"])
                r["rms_rel_err"] = float(np.sqrt(np.mean((e - t) ** 2)) / abs(t))
                r["sd_rel"] = float(e.std(ddof=1) / abs(t)) if e.size > 1 else float("nan")
                r["bias_rel"] = float((e.mean() - t) / abs(t))
                if all(s is not None for s in r["stderrs"]):
                    s = np.asarray(r["stderrs"])
                    r["mean_stderr_rel"] = float(s.mean() / abs(t))
                    r["rms_z"] = float(np.sqrt(np.mean(((e - t) / s) ** 2)))
                    r["within_2se"] = float(np.mean(np.abs(e - t) <= 2 * s))
            report["trace_small"].append(r)
        for lib, method, chunk in trace_methods:
            if lib == "curvlinops" and chunk is None and args.no_unchunked:
                continue
            name = f"{lib} {method}" + (f" (chunks of {chunk})" if chunk else "")
            log(f"trace {name}")
            r = run({"task": "trace", "lib": lib, "method": method, "chunk": chunk, "matvecs": args.trace_matvecs,
                     "seed_trace": args.seed + 1})
            r["name"] = name
            report["trace"].append(r)
        for m in args.ours_trace_budgets:                      # ours at smaller budgets: equal stderr
            if m >= args.trace_matvecs:
                continue
            name = f"ours hutch++ ({m} products)"
            log(f"trace {name}")
            r = run({"task": "trace", "lib": "ours", "method": "hutch++", "chunk": None, "matvecs": m,
                     "seed_trace": args.seed + 1})
            r["name"] = name
            r["budget"] = m
            report["trace"].append(r)

    # 4. density
    if "density" in args.parts:
        for lib in ["ours"] + libs:
            log(f"density {lib}")
            r = run({"task": "density", "lib": lib, "probes": args.slq_probes, "steps": args.slq_steps, "chunk": None})
            r["name"] = lib
            if ok(r) and ref and r.get("top_node") is not None:
                r["top_node_rel_err"] = abs(r["top_node"] - ref["eigenvalues"][0]) / abs(ref["eigenvalues"][0])
            report["density"].append(r)

    # fingerprints
    fps = [r["fingerprint"] for part in ("hvp", "topk", "trace", "density") for r in report[part]
           if r.get("fingerprint") is not None]
    if ref:
        fps.append(ref["fingerprint"])
    report["fingerprints_agree"] = bool(fps) and max(fps) - min(fps) <= 1e-6 * abs(fps[0])
    report["fingerprint"] = fps[0] if fps else None
    summarise(report, args)
    report["total_s"] = time.monotonic() - t_start
    tmp.cleanup()
    if args.json:
        print(json.dumps(report))
        return 0
    if pick_device(args.device) != "cpu":
        print(f"device {pick_device(args.device)}: peak / extra MB are the CUDA allocator's (max_memory_allocated; "
              f"extra above the set-up)")
    print_report(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
