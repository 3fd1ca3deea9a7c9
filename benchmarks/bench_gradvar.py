"""Per-sample gradient variance: ``probe.probes.gradvar.per_sample_variance`` against two baselines.

Models: the registry's ``resnet20_add`` and ``resnet20_mul`` (ResNet-20, widths 16/32/64, BatchNorm,
~0.27 M parameters; ``create_model(name, in_chans=3, num_classes=10)``), float32, eval mode with
BatchNorm statistics averaged over the random data, on N random 3x32x32 inputs with random labels,
cross-entropy. Quantity: per parameter tensor, tr(Sigma_1) = 1/(N-1) sum_i |g_i - gbar|^2.

* ``ours``      ``per_sample_variance(model, x, y, chunk=--chunk)`` (method ``auto``): every
                Conv2d / BatchNorm / Linear parameter of these models by the closed form of
                ``probe.autodiff`` (one batched forward + backward per chunk), streamed float64
                moments (memory ~ chunk x P)
* ``ours_vmap`` the same with ``method="vmap"``: ``vmap(grad)`` over chunks of --chunk samples
* ``loop``      one ``torch.autograd.grad`` call per sample on the module, float64 running sums
                of g and |g|^2 per tensor (memory ~ P)
* ``vmap_all``  plain ``vmap(grad)`` over all N samples at once (the N x P per-sample gradients
                materialised), then the variance per tensor

Every method runs in a fresh subprocess: wall time of the computation (after a 2-sample warm-up of
the same code path; best of --repeats, since CPU time on a shared machine varies by several times
between identical calls) and peak resident memory (``getrusage`` ru_maxrss) with ``extra`` = peak
minus the resident size after imports, model and data. Results are checked against ``ours``
(max relative difference of the per-tensor variances). Ratios are ``method / ours``.

    python benchmarks/bench_gradvar.py [--quick] [--models resnet20_add resnet20_mul] [--n 256] [--chunk 64]
                                       [--methods ours ours_vmap loop vmap_all] [--threads T]
                                       [--repeats 3] [--device cpu|cuda|auto] [--json]

``--device cuda`` (``auto`` on a GPU machine) runs every method on the GPU; peak and extra are then the
CUDA allocator's (``max_memory_allocated`` from after the warm-up; extra above the allocation then).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks._harness import (add_device_flag, memory_unit, peak_memory_mib, peak_rss_mib, pick_device,
                                 print_result, rss_mib, run_worker, script_command, start_memory, sync)

METHODS = ("ours", "ours_vmap", "loop", "vmap_all")


def child(method: str, model_name: str, n: int, chunk: int, threads: int | None, repeats: int,
          device: str = "cpu") -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    from models import create_model
    from probe.probes.gradvar import per_sample_variance

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(model_name, in_chans=3, num_classes=10)
    x, y = torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
    with torch.no_grad():  # BN statistics averaged over the data (as the probe runner does at init)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        for s in range(0, n, 64):
            model(x[s:s + 64])
    model.eval().to(device)
    x, y = x.to(device), y.to(device)
    names = [k for k, p in model.named_parameters() if p.requires_grad]

    def ours(xs, ys):
        return per_sample_variance(model, xs, ys, chunk=chunk).variance

    def ours_vmap(xs, ys):
        return per_sample_variance(model, xs, ys, chunk=chunk, method="vmap").variance

    def loop(xs, ys):
        params = [dict(model.named_parameters())[k] for k in names]
        s1 = [torch.zeros(p.numel(), dtype=torch.float64, device=p.device) for p in params]
        s2 = [0.0] * len(params)
        for i in range(xs.shape[0]):
            gs = torch.autograd.grad(F.cross_entropy(model(xs[i:i + 1]), ys[i:i + 1]), params)
            for j, g in enumerate(gs):
                g = g.reshape(-1).double()
                s1[j] += g
                s2[j] += float(g @ g)
        k = xs.shape[0]
        return np.array([(s2[j] - float(s1[j] @ s1[j]) / k) / (k - 1) for j in range(len(params))])

    def vmap_all(xs, ys):
        params = {k: p.detach() for k, p in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def one(p, xi, yi):
            return F.cross_entropy(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

        g = vmap(grad(one), in_dims=(None, 0, 0))(params, xs, ys)     # name -> (N, *shape)
        out = []
        for k in names:
            gk = g[k].reshape(xs.shape[0], -1).double()
            out.append(float(((gk - gk.mean(0)) ** 2).sum() / (xs.shape[0] - 1)))
        return np.array(out)

    fn = {"ours": ours, "ours_vmap": ours_vmap, "loop": loop, "vmap_all": vmap_all}[method]
    fn(x[:2], y[:2])                                                   # warm-up
    cuda = device != "cpu"
    base = start_memory(device) if cuda else rss_mib()
    walls = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        var = fn(x, y)
        sync(device)
        walls.append(time.perf_counter() - t0)
    wall = min(walls)
    peak = peak_memory_mib(device) if cuda else peak_rss_mib()
    return {"method": method, "model": model_name, "n": n, "chunk": chunk, "wall_s": wall, "walls_s": walls,
            "peak_mib": peak, "base_mib": base, "extra_mib": max(peak - base, 0.0),
            "params": sum(model.get_parameter(k).numel() for k in names), "threads": torch.get_num_threads(),
            "variance": [float(v) for v in var]}


def run_child(method: str, model: str, n: int, chunk: int, threads: int | None, repeats: int,
              device: str = "cpu") -> dict:
    done = run_worker(script_command(__file__, "--child", method, model, str(n), str(chunk), str(threads or 0),
                                     str(repeats), "--device", device), cwd=ROOT)
    if not done.ok:
        return {"method": method, "model": model, "error": done.tail(1) or "?"}
    return done.result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller setting (n=64, chunk 16)")
    ap.add_argument("--models", nargs="+", default=["resnet20_add", "resnet20_mul"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--n", type=int, default=None, help="samples (default 256; --quick 64)")
    ap.add_argument("--chunk", type=int, default=None, help="our chunk size (default 64; --quick 16)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per subprocess")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per method (best is reported)")
    ap.add_argument("--json", action="store_true", help="also print the raw measurements as JSON")
    add_device_flag(ap)
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    if args.child:
        method, model, n, chunk, threads, repeats = args.child
        print_result(child(method, model, int(n), int(chunk), int(threads) or None, int(repeats), device))
        return 0
    n = args.n or (64 if args.quick else 256)
    chunk = args.chunk or (16 if args.quick else 64)
    import numpy as np

    rows = []
    for model in args.models:
        res = {m: run_child(m, model, n, chunk, args.threads, args.repeats, device) for m in args.methods}
        ref = res.get("ours")
        for m, r in res.items():
            if "error" in r:
                rows.append((model, m, r["error"]))
                continue
            row = dict(r)
            if ref and "error" not in ref:
                a, b = np.array(r["variance"]), np.array(ref["variance"])
                row["max_rel_diff"] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))
                row["time_ratio"] = r["wall_s"] / ref["wall_s"]
                row["extra_ratio"] = r["extra_mib"] / max(ref["extra_mib"], 1e-9)
                row["peak_ratio"] = r["peak_mib"] / ref["peak_mib"]
            rows.append((model, m, row))
    print(f"per-sample gradient variance, N={n} x 3x32x32, float32, ours chunk={chunk}, "
          f"torch threads {next((r['threads'] for _, _, r in rows if isinstance(r, dict)), '?')}, "
          f"best of {args.repeats}")
    if device != "cpu":
        print(f"device {device}: peak and extra are {memory_unit(device)} (MiB)")
    print(f"{'model':<11} {'method':<9} {'wall s':>8} {'x ours':>7} {'peak MiB':>9} {'x ours':>7} "
          f"{'extra MiB':>10} {'x ours':>7} {'max rel diff':>13}")
    for model, m, r in rows:
        if isinstance(r, str):
            print(f"{model:<11} {m:<9} failed: {r}")
            continue
        print(f"{model:<11} {m:<9} {r['wall_s']:>8.2f} {r.get('time_ratio', float('nan')):>7.2f} "
              f"{r['peak_mib']:>9.0f} {r.get('peak_ratio', float('nan')):>7.2f} {r['extra_mib']:>10.0f} "
              f"{r.get('extra_ratio', float('nan')):>7.2f} {r.get('max_rel_diff', float('nan')):>13.2e}")
    if args.json:
        print(json.dumps([r for _, _, r in rows if isinstance(r, dict)], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
