"""Loss surface: ``probe.probes.surface.loss_surface`` against ``loss-landscapes`` and a per-point
``load_state_dict`` loop, with the pure-inference lower bound measured in the same run.

One model, one subset for every method: the registry's ``resnet20_add`` (ResNet-20, widths 16/32/64,
BatchNorm, ``create_model("resnet20_add", in_chans=3, num_classes=10)``), float32, eval mode with
BatchNorm running statistics averaged over 256 random inputs (``bench_ntk.build``, imported), on
``--n`` seeded random 3x``--size``x``--size`` inputs with seeded random labels, mean
cross-entropy. The plane is ``--steps`` x ``--steps`` points.

Methods (one process, one after the other, the same threads):

* ``ours``      ``loss_surface(model, x, y, random_directions(model, 2), "-1:1:S")``: Li et al.'s
                filter-normalised Gaussian directions (seed 123, biases and BatchNorm parameters
                held fixed), the subset on the device, chunks of points by ``vmap`` or a loop by
                its own rule (``vectorize auto``).
* ``loop``      Li et al.'s scheme, one point at a time: theta0 + a d1 + b d2 written into the
                model with ``load_state_dict``, then one inference pass over the subset in batches
                of ``--loop-batch`` (Li et al.: 128) under ``no_grad``; the same directions and
                grid as ``ours``, so the values must agree (float32 rounding: ~1e-5 relative).
* ``loss-landscapes``  3.0.6 (installed for the run only with ``pip install --no-deps --target``,
                never a project dependency): ``random_plane(model, Loss(cross_entropy, x, y),
                distance=1, steps=S, normalization="filter", deepcopy_model=True)``, falling back
                to ``normalization="layer"`` where its filter normalisation fails. Its definitions
                differ from Li et al.'s (directions drawn from Uniform[0, 1], rescaled to a fixed
                fraction of the model norm, odd rows shifted by one step), so only its wall time
                and its metric at the unperturbed model (which must equal our centre loss) are
                compared.
* ``bound``     the pure-inference lower bound: grid points x the best time of one forward pass
                over the subset (``--bound-repeats`` timed passes, in ours' samples per pass and in
                ``--loop-batch``, the faster taken), no parameter updates at all.

Printed: wall time per method, seconds per point, ``x bound`` (target for ours on CPU: at most
1.15) and ``x ours`` (the per-point loop's ratio is the speed-up; target at least 3 on a GPU), the
largest difference between ours and the loop, and the centre losses.

    python benchmarks/bench_surface.py [--n 1000] [--size 32] [--steps 21] [--loop-batch 128]
        [--methods ours loop loss-landscapes] [--lib-dir DIR --skip-install] [--device cpu|cuda|auto] [--json]

``--device cuda`` puts the model and the subset on the GPU for every method and adds each method's
peak of the CUDA allocator (``max_memory_allocated`` above the allocation before it) to its notes.
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

from benchmarks._harness import (add_device_flag, environment, log, peak_memory_mib, pick_device, pip_install,
                                 start_memory, sync)

METHODS = ["ours", "loop", "loss-landscapes"]
PACKAGE = "loss-landscapes==3.0.6"


def make_point(n: int, size: int, seed: int, device: str = "cpu"):
    import torch
    from benchmarks.bench_ntk import build

    model, x = build("resnet20_add", n, size, in_chans=3, seed=seed, device=device)
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed + 3))
    return model, x, y.to(device)


def mean_loss(model, x, y, batch: int) -> float:
    import torch
    import torch.nn.functional as F

    total = 0.0
    with torch.no_grad():
        for lo in range(0, x.shape[0], batch):
            out = model(x[lo:lo + batch]).double()
            total += float(F.cross_entropy(out, y[lo:lo + batch], reduction="sum"))
    return total / x.shape[0]


def run_ours(model, x, y, dirs, grid: str):
    from probe import loss_surface

    t0 = time.perf_counter()
    res = loss_surface(model, x, y, dirs, grid)
    sync(x.device)
    return time.perf_counter() - t0, res


def run_loop(model, x, y, dirs, alpha, beta, batch: int):
    """Li et al.'s scheme: write each point's weights with load_state_dict, one inference pass."""
    import numpy as np
    import torch

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shapes = [base[n].shape for n in names]

    def split(v):
        out, off = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[off:off + s.numel()].reshape(s).to(base[n].dtype)
            off += s.numel()
        return out

    d1, d2 = (split(v.to(torch.float32)) for v in dirs.vectors)
    theta = {n: base[n] for n in names}
    loss = np.empty((alpha.size, beta.size))
    t0 = time.perf_counter()
    for i, a in enumerate(alpha):
        for j, b in enumerate(beta):
            state = dict(base)
            for n in names:
                state[n] = theta[n] + float(a) * d1[n] + float(b) * d2[n]
            model.load_state_dict(state)
            loss[i, j] = mean_loss(model, x, y, batch)
    wall = time.perf_counter() - t0
    model.load_state_dict(base)
    return wall, loss


def run_loss_landscapes(model, x, y, steps: int, lib_dir: str):
    import numpy as np
    import torch.nn.functional as F

    sys.path.insert(0, lib_dir)
    import loss_landscapes
    import loss_landscapes.metrics

    metric = loss_landscapes.metrics.Loss(F.cross_entropy, x, y)
    from loss_landscapes.model_interface.model_wrapper import wrap_model
    import copy

    centre = float(metric(wrap_model(copy.deepcopy(model))))
    used, error = "filter", None
    t0 = time.perf_counter()
    try:
        vals = loss_landscapes.random_plane(model, metric, distance=1, steps=steps, normalization="filter",
                                            deepcopy_model=True)
        if not np.isfinite(vals).all():
            raise FloatingPointError(f"{int((~np.isfinite(vals)).sum())} non-finite values")
    except Exception as exc:                  # its failure is what is measured; the layer run follows
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        used = "layer"
        t0 = time.perf_counter()
        vals = loss_landscapes.random_plane(model, metric, distance=1, steps=steps, normalization="layer",
                                            deepcopy_model=True)
    return time.perf_counter() - t0, np.asarray(vals, dtype=np.float64), centre, used, error


def forward_time(model, x, batch: int, repeats: int) -> float:
    import torch

    with torch.no_grad():
        model(x[:batch])                      # warm-up
        best = float("inf")
        for _ in range(repeats):
            sync(x.device)
            t0 = time.perf_counter()
            for lo in range(0, x.shape[0], batch):
                model(x[lo:lo + batch])
            sync(x.device)
            best = min(best, time.perf_counter() - t0)
    return best


def install(where: str) -> bool:
    log("installing " + PACKAGE)
    why = pip_install([PACKAGE], where)
    if why is not None:
        log("  install failed: " + why)
        return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="samples in the subset")
    ap.add_argument("--size", type=int, default=32, help="input height/width (3 channels)")
    ap.add_argument("--steps", type=int, default=21, help="grid points per axis")
    ap.add_argument("--seed", type=int, default=0, help="seed of model, inputs and labels")
    ap.add_argument("--loop-batch", type=int, default=128, help="samples per pass of the per-point loop")
    ap.add_argument("--bound-repeats", type=int, default=5, help="timed forward passes for the bound")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="what to run besides the bound")
    ap.add_argument("--lib-dir", default=None, help="install loss-landscapes here (default: a temporary directory)")
    ap.add_argument("--skip-install", action="store_true", help="use loss-landscapes already in --lib-dir")
    ap.add_argument("--json", action="store_true", help="print one JSON report instead of the table")
    add_device_flag(ap)
    args = ap.parse_args(argv)
    if args.skip_install and not args.lib_dir:
        ap.error("--skip-install needs --lib-dir")

    import numpy as np
    from probe import random_directions

    env = environment()
    dev = pick_device(args.device)
    model, x, y = make_point(args.n, args.size, args.seed, dev)
    S = args.steps
    grid = f"-1:1:{S}"
    dirs = random_directions(model, 2)
    alpha = np.linspace(-1, 1, S)
    points = S * S
    rep = {"env": env, "args": vars(args), "points": points, "methods": {}}

    log(f"bound: {args.bound_repeats} timed forward passes over {args.n} samples")
    t_full = forward_time(model, x, args.n, args.bound_repeats)
    t_batch = forward_time(model, x, args.loop_batch, args.bound_repeats)
    per_pass = min(t_full, t_batch)
    rep["bound"] = {"pass_s_full_batch": t_full, f"pass_s_batch_{args.loop_batch}": t_batch,
                    "wall_s": per_pass * points}
    ours = None
    if "ours" in args.methods:
        log(f"ours: {S}x{S} grid")
        base = start_memory(dev)
        wall, res = run_ours(model, x, y, dirs, grid)
        ours = res
        rep["methods"]["ours"] = {"wall_s": wall, "centre_loss": res.centre_loss, "plan": res.plan.__dict__,
                                  "loss_min": float(np.nanmin(res.loss)), "loss_max": float(np.nanmax(res.loss))}
        if dev != "cpu":
            rep["methods"]["ours"]["gpu_extra_mib"] = peak_memory_mib(dev) - base
    if "loop" in args.methods:
        log(f"loop: {points} points, load_state_dict + inference in batches of {args.loop_batch}")
        base = start_memory(dev)
        wall, loss = run_loop(model, x, y, dirs, alpha, alpha, args.loop_batch)
        r = {"wall_s": wall, "centre_loss": float(loss[S // 2, S // 2]) if S % 2 else None}
        if dev != "cpu":
            r["gpu_extra_mib"] = peak_memory_mib(dev) - base
        if ours is not None:
            diff = np.abs(loss - ours.loss)
            r["max_abs_diff_vs_ours"] = float(diff.max())
            r["max_rel_diff_vs_ours"] = float((diff / np.abs(ours.loss)).max())
        rep["methods"]["loop"] = r
    if "loss-landscapes" in args.methods:
        tmp = None
        lib = args.lib_dir
        if lib is None:
            tmp = tempfile.TemporaryDirectory()
            lib = tmp.name
        ok = True if args.skip_install else install(lib)
        if ok:
            log(f"loss-landscapes: random_plane steps={S}")
            base = start_memory(dev)
            wall, vals, centre, used, error = run_loss_landscapes(model, x, y, S, lib)
            rep["methods"]["loss-landscapes"] = {"wall_s": wall, "centre_loss": centre, "normalization": used,
                                                 "filter_error": error, "shape": list(vals.shape),
                                                 "loss_min": float(np.nanmin(vals)), "loss_max": float(np.nanmax(vals))}
            if dev != "cpu":
                rep["methods"]["loss-landscapes"]["gpu_extra_mib"] = peak_memory_mib(dev) - base
        else:
            rep["methods"]["loss-landscapes"] = {"status": "install failed"}
        if tmp is not None:
            tmp.cleanup()
    rep["env"]["load_avg_end"] = os.getloadavg()
    if args.json:
        print(json.dumps(rep, indent=1, default=str))
        return 0
    bound = rep["bound"]["wall_s"]
    ours_wall = rep["methods"].get("ours", {}).get("wall_s")
    print(f"loss surface, resnet20_add 3x{args.size}x{args.size}, {args.n} samples, {S}x{S} = {points} points, "
          f"{env['threads']} threads, torch {env['torch']}, load {env['load_avg_start'][0]:.2f} -> "
          f"{env['load_avg_end'][0]:.2f}")
    print(f"inference bound: one pass {per_pass:.3f} s (full batch {t_full:.3f} s, batches of {args.loop_batch} "
          f"{t_batch:.3f} s) x {points} points = {bound:.1f} s")
    print(f"{'method':<18}{'wall s':>9}{'s/point':>9}{'x bound':>9}{'x ours':>9}  notes")
    for name, r in rep["methods"].items():
        if "wall_s" not in r:
            print(f"{name:<18}{'-':>9}  {r.get('status')}")
            continue
        w = r["wall_s"]
        notes = []
        if name == "ours":
            p = r["plan"]
            notes.append(f"{'vmap' if p['vmap'] else 'loop'}, {p['sample_batch']} samples/pass, "
                         f"centre {r['centre_loss']:.6f}")
        if name == "loop" and "max_rel_diff_vs_ours" in r:
            notes.append(f"max |diff| vs ours {r['max_abs_diff_vs_ours']:.2e} "
                         f"(rel {r['max_rel_diff_vs_ours']:.2e})")
        if name == "loss-landscapes":
            notes.append(f"{r['normalization']} normalisation"
                         + (f" (filter failed: {r['filter_error']})" if r["filter_error"] else "")
                         + f"; its metric at the model {r['centre_loss']:.6f}")
        if "gpu_extra_mib" in r:
            notes.append(f"{dev}: peak {r['gpu_extra_mib']:.0f} MiB CUDA allocated above its start")
        xo = f"{w / ours_wall:.2f}" if ours_wall else "-"
        print(f"{name:<18}{w:>9.1f}{w / points:>9.3f}{w / bound:>9.2f}{xo:>9}  {'; '.join(notes)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
