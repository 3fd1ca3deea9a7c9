"""Empirical NTK: ``probe.probes.ntk`` against its baselines, wall time, peak memory and FLOP rate.

Models: the registry's ``resnet20_add`` and ``resnet20_mul`` (ResNet-20, 3 stages x 3 basic blocks,
widths 16/32/64, BatchNorm, global pool, linear head, O=10 outputs, ~0.27 M parameters;
``resnet20_mul`` fuses ``bn(r) * bn_s(s)`` with both BN biases initialised at 1), float32, eval
mode with BatchNorm statistics averaged over random data, on random 3x32x32 inputs. Kernel: the trace NTK (N x N) of x with itself. Methods:

* ``ours``          ``empirical_ntk(model, x, kind="trace", method=--method, memory_budget_bytes=--budget)``
* ``naive``         (a) one ``torch.autograd.grad`` call per (sample, output) filling J (N*O x P), then
                    K = sum_o J_o J_o^T
* ``vmap_jacrev``   (b) the full-Jacobian contraction of the PyTorch ``torch.func`` NTK tutorial:
                    per-sample Jacobians of x1 and of x2 by ``vmap(jacrev(f))`` (called with x2 = x1,
                    as the tutorial's function is used), then per parameter
                    ``einsum('Naf,Maf->NM')`` summed
* ``vmap_jacrev_once``  (b) with the Jacobian of x computed once and reused for x2 (a fairer
                    variant of the same algorithm): the headline baseline ("J-once"); every row
                    reports its speed relative to it
* ``nngeometry``    the PyTorch library nngeometry 0.4: its exact Gram matrix in function space,
                    ``FMatDense(TorchHooksJacobianBackend(model, layer_collection=...), examples=...)``
                    (what ``nngeometry.gram.GramMatrix`` builds: per-layer hooks and closed-form
                    per-sample gradients, O x O backward passes per pair of batches, the full
                    (O, N, O, N) kernel), traced over the outputs. Installed for the run only
                    (``pip install --no-deps --target <tmp> nngeometry==0.4``; it needs nothing
                    beyond torch), never a project dependency; when the install fails it is skipped
                    with a message. Its layer collection is built by hand because it knows modules
                    by class name only (the models' ``PinnedBatchNorm2d`` is a ``BatchNorm2d``).
                    About 10x slower than ``vmap_jacrev``, so by default it runs at N=64 only
                    (``--nngeometry-n``), and its FLOPs are not counted.

Every measurement runs in a fresh subprocess: wall time and CPU time of the kernel computation,
peak resident memory (``getrusage`` ru_maxrss) and the same after imports, model and data
(``base``); ``extra`` = peak - base is what the method itself needed. FLOPs are counted with the formulas of
``torch.utils.flop_counter`` (matmul/conv-type ops) at N=4, 8 and 16 in a separate subprocess
and extrapolated as c + a*N + b*N^2 (set-up, per-sample Jacobian work, pairwise contraction;
exact for these methods, whose operations do not depend on the data). Those formulas count the
backward of a grouped convolution as if it were dense, and both ``vmap(jacrev)`` and ``ours``
compute per-sample weight gradients as a convolution backward with the batch as groups, so
their counts are inflated; the rate column therefore divides the same useful work -- the count of ``naive`` (plain per-sample backward passes plus the
contraction) -- by each method's wall time, and compares it with a measured float32 GEMM peak
(2048 x 2048, best of 5) on the same threads. Kernels are checked against ``ours`` (max relative
difference).

The ``--lanczos-n`` part runs ``ntk_topk_lanczos`` (top-20 eigenvalues of the trace kernel,
``method="gram"``, the model's float32 unless its outputs put the kernel beyond float32's range
(then float64, as the library decides), tol 1e-5 * lambda_max in float32 and 1e-8 in float64,
memory budget ``--lanczos-budget-gib``, default 3) on N random 1x8x8 inputs with each model
(1 input channel) and reports time, peak memory, vectors and passes over the data;
next to it, the baseline ``method="ntvp"`` (VJP/JVP products, the library's previous operator):
its measured seconds per Lanczos vector at the same N, times the vectors it needs (from the
``--lanczos-compare-n`` run, else 40). ``--lanczos-compare-n`` runs both end to end at a smaller N
and checks that their eigenvalues agree.

Targets: the trace kernel at N=256 at least 3x faster than the J-once recipe
(``vmap_jacrev_once``) and at 50% of the measured float32 matmul peak (the ``%peak`` column), with
at most 25% of ``vmap_jacrev``'s extra memory; top-20 Lanczos eigenvalues at N=10,000 within 15
minutes and 4 GB. ``--warmup`` first runs each method on 2 samples in the same worker (first-call costs
such as lazy imports are then not timed; off by default, as the targets were set cold).

    python benchmarks/bench_ntk.py [--models resnet20_add resnet20_mul] [--n 64 256]
                                   [--methods ours naive vmap_jacrev vmap_jacrev_once nngeometry]
                                   [--nngeometry-n 64] [--warmup]
                                   [--budget-gib 2] [--repeats 1] [--lanczos-n 10000]
                                   [--lanczos-models resnet20_add resnet20_mul] [--lanczos-budget-gib 3]
                                   [--lanczos-compare-n 500] [--device cpu|cuda|auto] [--json]

``--device cuda`` runs every worker's model and inputs on the GPU; memory is then the CUDA
allocator's peak (``max_memory_allocated``, each worker a fresh process) and the GEMM peak the GPU's.
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

from benchmarks._harness import (add_device_flag, environment, log, memory_unit, peak_memory_mib, pick_device,
                                 pip_install, print_result, run_worker, script_command, start_memory, sync)

METHODS = ["ours", "naive", "vmap_jacrev", "vmap_jacrev_once", "nngeometry"]
HEADLINE = "vmap_jacrev_once"                  # the baseline the targets are stated against
NNGEOMETRY = "nngeometry==0.4"


# --- the model -----------------------------------------------------------------------------------


def build(name: str, n: int, size: int, in_chans: int = 3, seed: int = 0, device: str = "cpu"):
    """The registry's ``name`` (``resnet20_add`` / ``resnet20_mul``: ResNet-20, widths 16/32/64, O=10)
    in eval mode, with BatchNorm running statistics averaged over 256 random inputs (as ``probe
    ntk`` does for a model at init; with PyTorch's (0, 1) defaults a multiplicative net's eval
    outputs overflow float32)."""
    from models import create_model
    from probe import calibrate_batchnorm
    torch.manual_seed(seed)
    model = create_model(name, in_chans=in_chans, num_classes=10)
    calib = torch.randn(256, in_chans, size, size, generator=torch.Generator().manual_seed(seed + 2))
    model = calibrate_batchnorm(model, calib).eval()
    x = torch.randn(n, in_chans, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model.to(device), x.to(device)


# --- the methods ---------------------------------------------------------------------------------


def run_ours(model, x, args):
    from probe import empirical_ntk
    res = empirical_ntk(model, x, kind="trace", method=args.method,
                        memory_budget_bytes=int(args.budget_gib * 2 ** 30))
    return res.kernel, {"method_used": res.method, "schedule": res.schedule,
                        "planned_peak_mb": res.peak_memory_bytes / 2 ** 20}


def run_naive(model, x, args):
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    N = x.shape[0]
    O = model(x[:1]).shape[1]
    J = torch.empty(N, O, P, device=x.device)
    for i in range(N):
        y = model(x[i:i + 1])[0]
        for o in range(O):
            gs = torch.autograd.grad(y[o], params, retain_graph=o < O - 1)
            J[i, o] = torch.cat([g.reshape(-1) for g in gs])
    Jf = J.reshape(N, O * P)
    return (Jf @ Jf.T).double().cpu().numpy(), {}


def _functional(model):
    from torch.func import functional_call
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def f_single(p, xi):
        return functional_call(model, (p, buffers), (xi.unsqueeze(0),)).squeeze(0)
    return f_single, params


def _jacobians(f_single, params, x):
    from torch.func import jacrev, vmap
    jac = vmap(jacrev(f_single), (None, 0))(params, x)
    return [j.flatten(2) for j in jac.values()]                     # [(N, O, p)]


def run_vmap_jacrev(model, x, args, reuse: bool = False):
    f_single, params = _functional(model)
    j1 = _jacobians(f_single, params, x)
    j2 = j1 if reuse else _jacobians(f_single, params, x)
    K = torch.stack([torch.einsum("Naf,Maf->NM", a, b) for a, b in zip(j1, j2)]).sum(0)
    return K.double().cpu().numpy(), {}


def run_nngeometry(model, x, args):
    """nngeometry's exact Gram matrix (O, N, O, N) of the model's outputs, traced over outputs."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.layercollection import BatchNorm2dLayer, LayerCollection
    from nngeometry.object import FMatDense
    lc = LayerCollection()
    for name, mod in model.named_modules():
        if not any(True for _ in mod.parameters(recurse=False)):
            continue
        if isinstance(mod, nn.BatchNorm2d):            # nngeometry matches class names only
            layer = BatchNorm2dLayer(num_features=mod.num_features)
        else:
            layer = LayerCollection._module_to_layer(mod)
        lc.add_layer(name, layer)
    backend = TorchHooksJacobianBackend(model=model, function=lambda *d: model(d[0]), layer_collection=lc)
    G = FMatDense(generator=backend, examples=DataLoader(TensorDataset(x), batch_size=x.shape[0]))
    return torch.einsum("aiaj->ij", G.data).double().cpu().numpy(), {}


RUNNERS = {"ours": run_ours, "naive": run_naive, "vmap_jacrev": run_vmap_jacrev,
           "vmap_jacrev_once": lambda m, x, a: run_vmap_jacrev(m, x, a, reuse=True),
           "nngeometry": run_nngeometry}


def install_nngeometry(where: str) -> str | None:
    """``pip install --no-deps --target where nngeometry==0.4``; the path, or None (with the reason
    printed) when it fails."""
    why = pip_install([NNGEOMETRY], where, timeout=300)
    if why is not None:
        log(f"nngeometry: pip install {NNGEOMETRY} failed ({why}); skipped")
        return None
    return where


# --- workers (one per subprocess) ----------------------------------------------------------------


def worker_time(args) -> dict:
    dev = pick_device(args.device)
    if args.warmup:                                  # first-call costs, not timed
        RUNNERS[args.worker](*build(args.model, 2, args.size, device=dev), args)
    model, x = build(args.model, args.n, args.size, device=dev)
    base = start_memory(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    K, info = RUNNERS[args.worker](model, x, args)
    sync(dev)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if args.save:
        np.save(args.save, K)
    return {"wall_s": wall, "cpu_s": cpu, "rss_base_mb": base, "rss_peak_mb": peak_memory_mib(dev), **info}


def _flop_counter():
    """Counts FLOPs with FlopCounterMode's formulas but without its module tracking (whose
    backward hooks do not support ``autograd.grad`` with explicit inputs)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += formula(*args, **kwargs, out_val=out)
            return out
    return Count


def worker_flops(args) -> dict:
    ns = (4, 8, 16)
    counts = []
    for n in ns:
        model, x = build(args.model, n, args.size)
        counter = _flop_counter()
        with counter():
            RUNNERS[args.worker](model, x, args)
        counts.append(float(counter.total))
    # flops(N) = c + a N + b N^2: fixed set-up work, per-sample Jacobians, pairwise contraction
    c, a, b = np.linalg.solve(np.array([[1.0, n, n * n] for n in ns]), np.array(counts))
    return {"c": c, "a": a, "b": b, "counted": dict(zip(ns, counts))}


def worker_matmul(args) -> dict:
    dev = pick_device(args.device)
    n = 2048 if dev == "cpu" else 8192
    A, B = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    A @ B
    best = float("inf")
    for _ in range(5):
        sync(dev)
        t = time.perf_counter()
        A @ B
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return {"gflops": 2 * n ** 3 / best / 1e9}


def worker_lanczos(args) -> dict:
    """One full top-20 run of ``ntk_topk_lanczos`` with ``--lanczos-method``."""
    from probe import ntk_topk_lanczos
    dev = pick_device(args.device)
    model, x = build(args.model, args.n, 8, in_chans=1, device=dev)
    base = start_memory(dev)
    t0 = time.perf_counter()
    res = ntk_topk_lanczos(model, x, k=20, kind="trace", method=args.lanczos_method,
                           memory_budget_bytes=int(args.budget_gib * 2 ** 30),
                           block_vectors=args.block_vectors, tol=args.tol)
    sync(dev)
    return {"method": res.method, "wall_s": time.perf_counter() - t0, "rss_base_mb": base,
            "rss_peak_mb": peak_memory_mib(dev), "n_matvecs": res.n_matvecs, "n_passes": res.n_passes,
            "block_vectors": res.block_vectors, "converged": res.converged,
            "subspace_dim": res.subspace_dim, "eigenvalues": res.eigenvalues.tolist(),
            "max_rel_residual": float(res.residuals.max() / res.eigenvalues[0]),
            "planned_peak_mb": res.peak_memory_bytes / 2 ** 20, "dtype": res.dtype,
            "notes": list(res.notes)}


def worker_matvec(args) -> dict:
    """Seconds per Lanczos vector of the VJP/JVP operator (``ntvp``) at N: one product K v, in the
    dtype ``ntk_topk_lanczos`` would run in."""
    from probe import ntk_operator
    dev = pick_device(args.device)
    model, x = build(args.model, args.n, 8, in_chans=1, device=dev)
    op = ntk_operator(model, x, "trace")
    v = np.random.default_rng(0).standard_normal((args.n, 1))
    v = v if dev == "cpu" else torch.as_tensor(v, device=dev)
    t0 = time.perf_counter()
    op.matmat(v)
    sync(dev)
    return {"s_per_vector": time.perf_counter() - t0, "dtype": str(op.fm.dtype)}


def spawn(argv: list[str], fatal: bool = True) -> dict | None:
    """The result of this script run as a worker with ``argv``; a failure ends the benchmark
    (``fatal``) or is reported and gives None."""
    done = run_worker(script_command(__file__, *argv))
    if not done.ok:
        msg = f"worker {' '.join(argv)} failed (exit {done.returncode}):\n{done.tail()}"
        if fatal:
            raise SystemExit(msg)
        log(msg)
        return None
    return done.result


# --- driver --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet20_add", "resnet20_mul"])
    ap.add_argument("--n", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--nngeometry-n", type=int, nargs="+", default=[64],
                    help="the N at which the nngeometry baseline runs (default: 64; it is slow)")
    ap.add_argument("--warmup", action="store_true",
                    help="run each method once on 2 samples in its worker before timing it")
    ap.add_argument("--size", type=int, default=32, help="input height/width")
    ap.add_argument("--method", default="auto", help="probe.probes.ntk method for 'ours'")
    ap.add_argument("--budget-gib", type=float, default=2.0,
                    help="memory_budget_bytes for ours, GiB (default: the library's, 2 GiB)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--lanczos-n", type=int, default=0, help="N for the top-20 Lanczos run (0: skip)")
    ap.add_argument("--lanczos-budget-gib", type=float, default=3.0,
                    help="memory_budget_bytes of the Lanczos runs, GiB (target: under 4 GB in all)")
    ap.add_argument("--lanczos-models", nargs="+", default=None,
                    help="models for the Lanczos runs (default: --models)")
    ap.add_argument("--block-vectors", type=int, default=None,
                    help="Lanczos block size (default: the library's per method)")
    ap.add_argument("--lanczos-compare-n", type=int, default=0,
                    help="also run both Lanczos operators end to end at this N (0: skip)")
    ap.add_argument("--lanczos-only", action="store_true", help="skip the kernel comparison")
    ap.add_argument("--lanczos-method", default="gram", help=argparse.SUPPRESS)
    ap.add_argument("--tol", type=float, default=None, help="Lanczos tolerance (default: the library's)")
    ap.add_argument("--json", action="store_true")
    add_device_flag(ap)
    ap.add_argument("--worker", choices=METHODS + ["matmul", "lanczos", "matvec"], help=argparse.SUPPRESS)
    ap.add_argument("--model", default="resnet20_add", help=argparse.SUPPRESS)
    ap.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--nngeometry-path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        if args.nngeometry_path:
            sys.path.insert(0, args.nngeometry_path)
        args.n = args.n[0]
        if args.worker == "matmul":
            out = worker_matmul(args)
        elif args.worker == "lanczos":
            out = worker_lanczos(args)
        elif args.worker == "matvec":
            out = worker_matvec(args)
        elif args.flops:
            out = worker_flops(args)
        else:
            out = worker_time(args)
        print_result(out)
        return 0

    common = ["--size", str(args.size), "--method", args.method, "--budget-gib", str(args.budget_gib),
              "--device", args.device]
    if args.warmup:
        common.append("--warmup")
    env = environment()
    peak = spawn(["--worker", "matmul", "--device", args.device])["gflops"]
    ns = [] if args.lanczos_only else args.n
    methods = list(args.methods)
    rows, summary = [], []
    say = (lambda *a: None) if args.json else log
    with tempfile.TemporaryDirectory() as tmp:
        if "nngeometry" in methods and ns and not set(ns).isdisjoint(args.nngeometry_n):
            where = install_nngeometry(os.path.join(tmp, "nngeometry"))
            if where is None:
                methods.remove("nngeometry")
            else:
                common += ["--nngeometry-path", where]
        # nngeometry's O^2 backward passes make its count slow, and the rate column needs only naive's
        flop_methods = sorted((set(methods) - {"nngeometry"}) | {"naive"})
        for name in args.models if ns else []:
            mc = common + ["--model", name]
            flop_fit = {}
            if not args.no_flops:
                for m in flop_methods:
                    fit = spawn(["--worker", m, "--flops"] + mc, fatal=m != "nngeometry")
                    if fit is not None:
                        flop_fit[m] = fit
            for n in ns:
                kernels = {}
                run_here = [m for m in methods if m != "nngeometry" or n in args.nngeometry_n]
                for rep in range(args.repeats):
                    for m in run_here:                # interleaved repeats
                        say(f"{name} N={n} {m} (repeat {rep})")
                        path = os.path.join(tmp, f"{name}_{m}_{n}.npy")
                        r = spawn(["--worker", m, "--n", str(n), "--save", path] + mc,
                                  fatal=m != "nngeometry")
                        if r is None:
                            continue
                        r.update(model=name, method=m, n=n, repeat=rep,
                                 extra_mb=r["rss_peak_mb"] - r["rss_base_mb"])
                        if "naive" in flop_fit:
                            own, ref = flop_fit.get(m), flop_fit["naive"]
                            if own is not None:
                                r["gflop_counted"] = (own["c"] + own["a"] * n + own["b"] * n * n) / 1e9
                            r["gflop"] = (ref["c"] + ref["a"] * n + ref["b"] * n * n) / 1e9
                            r["gflops_rate"] = r["gflop"] / r["wall_s"]
                            r["pct_of_matmul_peak"] = 100 * r["gflops_rate"] / peak
                        kernels[m] = np.load(path)
                        rows.append(r)
                ref = kernels.get("ours")
                for r in rows:
                    if r["n"] == n and r["model"] == name and ref is not None:
                        K = kernels[r["method"]]
                        r["max_rel_diff_vs_ours"] = float(np.abs(K - ref).max() / np.abs(ref).max())
                here = [r for r in rows if r["model"] == name and r["n"] == n]
                best = {m: min((r for r in here if r["method"] == m), key=lambda r: r["wall_s"])
                        for m in run_here if any(r["method"] == m for r in here)}
                if HEADLINE in best:
                    for r in here:
                        r["speed_vs_j_once"] = best[HEADLINE]["wall_s"] / r["wall_s"]
                # the headline baseline first
                for m in sorted(best, key=lambda m: m != HEADLINE):
                    if m == "ours" or "ours" not in best:
                        continue
                    summary.append({"model": name, "n": n, "baseline": m,
                                    "speedup": best[m]["wall_s"] / best["ours"]["wall_s"],
                                    "cpu_speedup": best[m]["cpu_s"] / best["ours"]["cpu_s"],
                                    "memory_ratio": best["ours"]["extra_mb"] / max(best[m]["extra_mb"], 1e-9),
                                    "pct_of_matmul_peak": best["ours"].get("pct_of_matmul_peak")})
    lanczos = None
    if args.lanczos_n or args.lanczos_compare_n:
        lanczos = {"runs": [], "compare": [], "baseline_at_n": []}

        def lz(name, n, method):
            say(f"{name} Lanczos N={n} {method}")
            argv = ["--worker", "lanczos", "--model", name, "--n", str(n), "--budget-gib",
                    str(args.lanczos_budget_gib), "--json",
                    "--lanczos-method", method, "--device", args.device]
            if args.block_vectors:
                argv += ["--block-vectors", str(args.block_vectors)]
            if args.tol is not None:
                argv += ["--tol", str(args.tol)]
            r = spawn(argv)
            r.update(model=name, n=n)
            lanczos["runs"].append(r)
            say(json.dumps(r))                   # kept even if a later worker fails
            return r
        for name in args.lanczos_models or args.models:
            if args.lanczos_compare_n:           # both operators end to end, same N, same inputs
                a, b = lz(name, args.lanczos_compare_n, "gram"), lz(name, args.lanczos_compare_n, "ntvp")
                ea, eb = np.array(a["eigenvalues"]), np.array(b["eigenvalues"])
                lanczos["compare"].append({"model": name, "n": args.lanczos_compare_n,
                                           "speedup": b["wall_s"] / a["wall_s"],
                                           "max_rel_eig_diff": float(np.max(np.abs(ea - eb) / np.abs(eb)))})
            if args.lanczos_n:
                ours = lz(name, args.lanczos_n, "gram")
                per_vec = spawn(["--worker", "matvec", "--model", name, "--n", str(args.lanczos_n),
                                 "--json", "--device", args.device])["s_per_vector"]
                # the baseline needs as many vectors as in the end-to-end comparison (or 40, the count
                # measured for it at N=10,000 before) -- an estimate, labelled as such
                count = next((r["n_matvecs"] for r in lanczos["runs"]
                              if r["method"] == "ntvp" and r["model"] == name), 40)
                lanczos["baseline_at_n"].append({"model": name, "n": args.lanczos_n, "s_per_vector": per_vec,
                                                 "vectors": count, "estimated_wall_s": per_vec * count,
                                                 "estimated_speedup": per_vec * count / ours["wall_s"]})
    report = {"env": env, "matmul_peak_gflops": peak, "rows": rows, "summary": summary,
              "lanczos": lanczos}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"threads={env['threads']} cpus={env['cpus']} torch={env['torch']} "
          f"load avg at start={env['load_avg_start'][0]:.2f}; float32 GEMM peak {peak:.1f} GFLOP/s")
    if pick_device(args.device) != "cpu":
        print(f"device {pick_device(args.device)}: memory columns are the {memory_unit(pick_device(args.device))} "
              f"peak (MB), the GEMM peak the device's")
    print(f"{'model':<11} {'N':>5} {'method':<17} {'x J-once':>8} {'wall s':>8} {'cpu s':>8} {'peak MB':>8} "
          f"{'extra MB':>9} {'counted':>8} {'GFLOP/s':>8} {'%peak':>6} {'rel diff':>9}  notes")
    print(f"{'':<11} {'':>5} {'':<17} {'speed':>8} {'':>8} {'':>8} {'':>8} {'':>9} {'GFLOP':>8} {'useful':>8}")
    nan = float("nan")
    for r in rows:
        print(f"{r['model']:<11} {r['n']:>5} {r['method']:<17} {r.get('speed_vs_j_once', nan):>8.2f} "
              f"{r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} "
              f"{r['rss_peak_mb']:>8.0f} {r['extra_mb']:>9.0f} {r.get('gflop_counted', nan):>8.1f} "
              f"{r.get('gflops_rate', nan):>8.1f} {r.get('pct_of_matmul_peak', nan):>6.1f} "
              f"{r.get('max_rel_diff_vs_ours', nan):>9.1e}  {r.get('schedule', '')}")
    for s in summary:
        line = (f"{s['model']} N={s['n']}: ours vs {s['baseline']}: {s['speedup']:.2f}x faster (wall), "
                f"{s['cpu_speedup']:.2f}x (CPU time), {100 * s['memory_ratio']:.0f}% of its extra memory")
        if s["baseline"] == HEADLINE:
            pct = s.get("pct_of_matmul_peak")
            line += (f" [targets: 3x J-once {'met' if s['speedup'] >= 3 else 'not met'}"
                     + ("" if pct is None else
                        f", 50% of matmul peak {'met' if pct >= 50 else 'not met'} ({pct:.0f}%)") + "]")
        print(line)
    if lanczos:
        unit = "RSS" if pick_device(args.device) == "cpu" else memory_unit(pick_device(args.device))
        for r in lanczos["runs"]:
            print(f"{r['model']}: Lanczos top-20 trace eigenvalues, {r['method']:>4}, N={r['n']} 1x8x8 inputs: "
                  f"{r['wall_s']:.0f} s ({r['wall_s'] / 60:.1f} min), peak {unit} {r['rss_peak_mb']:.0f} MB "
                  f"(extra {r['rss_peak_mb'] - r['rss_base_mb']:.0f}), {r['n_matvecs']} vectors in "
                  f"{r['n_passes']} passes over the data (blocks of {r['block_vectors']}), "
                  f"converged={r['converged']}, max residual/lambda_1 {r['max_rel_residual']:.1e}, "
                  f"lambda_1 {r['eigenvalues'][0]:.4g}, lambda_20 {r['eigenvalues'][-1]:.4g}, {r['dtype']}")
            for note in r["notes"]:
                print(f"    note: {note}")
        for c in lanczos["compare"]:
            print(f"{c['model']} N={c['n']}: gram vs ntvp end to end: {c['speedup']:.2f}x faster; eigenvalues "
                  f"agree to {c['max_rel_eig_diff']:.1e} (max relative difference)")
        for bl in lanczos["baseline_at_n"]:
            print(f"{bl['model']} N={bl['n']}: ntvp baseline measured {bl['s_per_vector']:.1f} s per vector; x "
                  f"{bl['vectors']} vectors = {bl['estimated_wall_s'] / 60:.1f} min estimated, "
                  f"{bl['estimated_speedup']:.1f}x the time of gram (estimate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
