"""One prepared check of a GPU machine: the library's CUDA paths run end to end, with the headline
GPU numbers, in at most 8 minutes on one H100 / H200.

    PYTHONPATH=. python benchmarks/gpu_check.py            # or: make gpu-check
    DEVICE=cpu PYTHONPATH=. python benchmarks/gpu_check.py # dry run of every step that runs on CPU

Nothing is installed: the check uses the torch (and pytest) already on the machine. Every step
prints one line ``PASS <step>: <figure>``, ``FAIL <step>: <why>`` or ``SKIP <step>: <why>`` and the
check goes on after a failure; a step that starts a subprocess gives it a time limit of its own.
When ``OUT`` is set the summary is written to ``$OUT/gpu_check.json``. The exit status is 0 only
when no step failed.

Steps: ``pytest-gpu`` (``pytest -m gpu``), ``train-pair`` (``add_resnet`` and ``mul_resnet`` a few
epochs with AMP), ``kill-resume`` (a run killed after its first checkpoint and resumed, against an
uninterrupted run), ``probe/<name>`` (every registered probe on the device and on the CPU, in
float64 where the probe takes a dtype, within the tolerances printed), ``nccl-world1`` (a process
group of one, NCCL on CUDA, gloo on the CPU dry run; a short train and a probe under it) and
``headline/*`` (matmul peak, trace NTK, NTK Lanczos, Hessian, 51x51 surface against the per-point
loop: wall time, peak memory, share of the matmul peak where a flop count is known). On
``DEVICE=cpu`` the headline sizes are scaled down (printed with each line).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._harness import print_result, read_result, reset_peak, status_kib  # noqa: E402

RESULTS: list[dict] = []
#: the check's end (monotonic seconds): a subprocess's limit never reaches past it
DEADLINE = [float("inf")]
BUDGET_S = {"cuda": 450.0, "cpu": 900.0}


def limit(seconds: float) -> float:
    """A subprocess's time limit: ``seconds``, cut to what is left of the check's budget."""
    left = DEADLINE[0] - time.monotonic()
    if left < 15:
        raise Skip("no time left in the check's budget (7.5 minutes on CUDA, 15 on the CPU)")
    return min(seconds, left)


class Skip(Exception):
    """A step that does not apply on this machine (its message is the reason)."""


def say(status: str, step: str, text: str, **extra) -> None:
    RESULTS.append({"step": step, "status": status, "detail": text, **extra})
    print(f"{status} {step}: {text}", flush=True)


def step(name: str, fn, *args) -> None:
    """Run one step: PASS with the figure it returns, SKIP on :class:`Skip`, FAIL on anything else."""
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except Skip as e:
        say("SKIP", name, str(e), seconds=round(time.perf_counter() - t0, 2))
    except subprocess.TimeoutExpired as e:
        say("FAIL", name, f"timed out after {e.timeout:.0f} s", seconds=round(time.perf_counter() - t0, 2))
    except Exception as e:  # noqa: BLE001 -- the check goes on after any failure
        line = (str(e).strip().splitlines() or [""])[0][:300]
        say("FAIL", name, f"{type(e).__name__}: {line}", seconds=round(time.perf_counter() - t0, 2),
            traceback=traceback.format_exc()[-2000:])
    else:
        text, extra = out if isinstance(out, tuple) else (out, {})
        say("PASS", name, text, seconds=round(time.perf_counter() - t0, 2), data=extra)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _worker(name: str, device: str, timeout: float, *args: str) -> dict:
    """Run ``name`` in a fresh copy of this script (its own process, CUDA context and time limit)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--device", device, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit(timeout), env=_env(), cwd=str(ROOT))
    res = read_result(out.stdout)
    if out.returncode != 0 or res is None:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        raise RuntimeError(f"worker {name} exited {out.returncode}: {tail}")
    if "error" in res:
        raise RuntimeError(res["error"])
    if "skip" in res:
        raise Skip(res["skip"])
    return res


# --- shared helpers ----------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        from probe.runtime.memory import reset_peak_allocated

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        reset_peak_allocated(device)     # the probes' own memory meters leave this peak intact
    else:
        try:
            reset_peak()      # VmHWM := VmRSS (ru_maxrss would carry the parent's peak over exec)
        except OSError:
            pass


def _peak(device) -> str:
    """Peak GPU memory (allocator) since the last reset, or the process's peak RSS on the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        return f"peak {_peak_mib(device):.0f} MiB GPU"
    return f"peak RSS {_peak_mib(device):.0f} MiB"


def _peak_mib(device) -> float:
    import torch

    if torch.device(device).type == "cuda":
        from probe.runtime.memory import peak_allocated

        return peak_allocated(device) / 2**20
    return (status_kib("VmHWM") or 0) / 1024


def _model(name: str, **kwargs):
    """The registry's ``name`` built from a fixed seed: the headline figures (eigenvalues, traces) are
    the same from run to run."""
    import torch

    import probe

    torch.manual_seed(0)
    return probe.build_model(name, **kwargs)


def _config_fields() -> set[str]:
    import probe

    return {f.name for f in dataclasses.fields(probe.TrainConfig)}


# --- step 1: pytest -m gpu -----------------------------------------------------------------------------


def step_pytest(device: str) -> str:
    import torch

    if not torch.device(device).type == "cuda":
        raise Skip("no CUDA device (pytest -m gpu needs one)")
    try:
        import pytest  # noqa: F401
    except ImportError:
        raise Skip("pytest is not installed in this python (nothing is installed by the check)") from None
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                         capture_output=True, text=True, timeout=limit(150), env=_env(), cwd=str(ROOT))
    last = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
    if out.returncode not in (0, 5):
        raise RuntimeError(f"pytest exited {out.returncode}: {last}")
    return f"{last} ({time.perf_counter() - t0:.1f} s)"


# --- step 2: the pair with AMP -------------------------------------------------------------------------


def step_train_pair(device: str, small: bool) -> tuple:
    import probe

    if "amp" not in _config_fields():
        raise Skip("TrainConfig has no amp option")
    figures, extra = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        store = probe.RunStore(tmp)
        for name in ("add_resnet", "mul_resnet"):
            cfg = probe.TrainConfig(model=name, data="digits", epochs=2 if small else 5, amp=True, device=device,
                                    limit_train=100 if small else None, limit_test=50 if small else None, seed=0)
            t0 = time.perf_counter()
            r = probe.train(cfg, store)
            dt = time.perf_counter() - t0
            if r.status != "finished":
                raise RuntimeError(f"{name}: status {r.status}")
            figures.append(f"{name} {r.final_acc:.1f}% in {dt:.1f} s")
            extra[name] = {"final_acc": r.final_acc, "seconds": round(dt, 2), "epochs": cfg.epochs}
        store.close()
    size = "100/50 digits, 2 epochs" if small else "all digits, 5 epochs"
    return f"AMP on {device}, {size}: " + "; ".join(figures), extra


# --- step 3: kill and resume ---------------------------------------------------------------------------


def step_kill_resume(device: str, small: bool) -> tuple:
    import torch

    import probe

    model = "tiny_add" if small else "add_resnet"
    deterministic = "deterministic" in _config_fields()
    flags = ["--model", model, "--data", "digits", "--epochs", "3", "--batch-size", "16", "--limit-train",
             "300" if small else "1000", "--limit-test", "100", "--seed", "0", "--device", device, "--quiet", "--json"]
    if deterministic:
        flags.append("--deterministic")
    env = _env()
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    notes = [] if deterministic else ["train has no --deterministic flag"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        cmd = [sys.executable, "-m", "probe", "train", "--runs", str(runs), *flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=str(ROOT))
        deadline = time.monotonic() + limit(180)
        pattern = str(runs / "runs" / "*" / "checkpoints" / "epoch_0001.pt")
        while not glob.glob(pattern) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"run ended (exit {proc.returncode}) before its first checkpoint: "
                               f"{(err or [''])[-1][:200]}")
        if not glob.glob(pattern):
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(cmd, 180)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        run_dir = Path(glob.glob(pattern)[0]).parent.parent
        run_id = run_dir.name
        killed_at = sorted(p.name for p in (run_dir / "checkpoints").glob("epoch_*.pt"))
        if any(n.endswith("0003.pt") for n in killed_at):
            notes.append("the run had finished before the kill landed")
        out = subprocess.run([sys.executable, "-m", "probe", "train", "--runs", str(runs), "--resume", run_id,
                              "--quiet", "--json"], capture_output=True, text=True, timeout=limit(240), env=env,
                             cwd=str(ROOT))
        if out.returncode != 0:
            raise RuntimeError(f"--resume exited {out.returncode}: "
                               f"{(out.stderr.strip().splitlines() or [''])[-1][:200]}")
        ref = subprocess.run(cmd, capture_output=True, text=True, timeout=limit(240), env=env, cwd=str(ROOT))
        if ref.returncode != 0:
            raise RuntimeError(f"uninterrupted run exited {ref.returncode}: "
                               f"{(ref.stderr.strip().splitlines() or [''])[-1][:200]}")
        ref_id = json.loads(ref.stdout.strip().splitlines()[-1])["run_id"]
        store = probe.RunStore(runs)
        a, b = store.load_checkpoint(run_id), store.load_checkpoint(ref_id)
        ma, mb = store.get_metrics(run_id), store.get_metrics(ref_id)
        store.close()
    if a["epoch"] != 3 or b["epoch"] != 3:
        raise RuntimeError(f"last checkpoints at epochs {a['epoch']} (resumed) and {b['epoch']} (uninterrupted)")
    diff = max((x.double() - b["model"][k].double()).abs().max().item()
               for k, x in a["model"].items() if torch.is_tensor(x) and x.is_floating_point())
    same_metrics = _metric_rows(ma) == _metric_rows(mb)
    exact_expected = torch.device(device).type != "cuda" or deterministic
    fig = (f"{model}, killed after checkpoint 1 ({len(killed_at)} on disk), resumed to epoch 3: "
           f"max |dw| {diff:.3g}, metrics {'equal' if same_metrics else 'differ'}")
    if notes:
        fig += " (" + "; ".join(notes) + ")"
    extra = {"max_abs_weight_diff": diff, "metrics_equal": same_metrics, "deterministic_flag": deterministic}
    if exact_expected and (diff != 0.0 or not same_metrics):
        raise RuntimeError("not exact: " + fig)
    if not exact_expected and not math.isfinite(diff):
        raise RuntimeError(fig)
    return fig, extra


def _metric_rows(rows) -> list:
    keep = ("epoch", "train_loss", "train_top1", "test_loss", "test_top1")
    return [tuple(r.get(k) for k in keep) for r in rows]


# --- step 4: every probe, device against CPU -----------------------------------------------------------

PROBE_MODEL = "tiny_mul"   # BatchNorm and a multiplicative fusion, cheap for every probe
# saturation measures sigmoid gates, which tiny_mul has none of (its measure would be None)
PROBE_MODEL_FOR = {"saturation": "tiny_triplet"}
PROBE_N = {"cuda": 32, "cpu": 16}
SMALL = [False]


def _probe_n() -> int:
    return PROBE_N["cpu" if SMALL[0] else "cuda"]
# (rel, abs) per probe: float64 probes must agree to rounding; saturation (float32 only) counts
# gate logits above a threshold, so one logit may flip.
TOLERANCE = {"saturation": (1e-3, 0.01), "default": (1e-6, 1e-9)}
# the smoke grid has no point inside |a|, |b| <= 0.5 but the centre (its rise is 0): one ring more
PROBE_OVERRIDES = {"surface": {"grid": "-1:1:5"}}
# a measure that divides by a small eigenvalue (condition number) gets a looser relative bound
MEASURE_TOLERANCE = {"ntk_cond": (1e-3, 1e-9)}
# a random estimate whose probe vectors are drawn by the device's own generator on CUDA (other numbers
# than the CPU's for the same seed): the two estimates must agree within 4 combined standard errors
STOCHASTIC = {"hessian_trace": ("trace", "stderr")}


def _run_one(name: str, device: str):
    import probe

    spec = probe.get_probe(name)
    params = {**spec.smoke, **PROBE_OVERRIDES.get(name, {})}
    if "dtype" in {f.name for f in dataclasses.fields(spec.params)}:
        params["dtype"] = "float64"
    with tempfile.TemporaryDirectory() as tmp:
        store = probe.RunStore(tmp)
        try:
            out = probe.run_probe(store, name, params, model=PROBE_MODEL_FOR.get(name, PROBE_MODEL), n=_probe_n(), seed=0, device=device,
                                  save=False)[0]
        finally:
            store.close()
    if out.error is not None:
        raise RuntimeError(out.error)
    summary = out.result.summary()
    measures = {m.key: m.get(summary, out.result) for m in spec.measures}
    for key, path in STOCHASTIC.items():
        if key in measures:
            se = summary
            for part in path:
                se = se.get(part) if isinstance(se, dict) else None
            measures[f"{key}.stderr"] = se
    return measures, params.get("dtype", "float32")


def step_probe(name: str, device: str) -> tuple:
    t0 = time.perf_counter()
    dev, dtype = _run_one(name, device)
    t_dev = time.perf_counter() - t0
    t0 = time.perf_counter()
    cpu, _ = _run_one(name, "cpu")
    t_cpu = time.perf_counter() - t0
    parts, bad = [], []
    for key in [k for k in dev if not k.endswith(".stderr")]:
        rel, abs_ = MEASURE_TOLERANCE.get(key, TOLERANCE.get(name, TOLERANCE["default"]))
        a, b = dev[key], cpu[key]
        se = [dev.get(f"{key}.stderr"), cpu.get(f"{key}.stderr")]
        if device != "cpu" and a is not None and b is not None and None not in se:
            bound = max(4 * math.hypot(*se), abs_ + rel * abs(b))
            ok = abs(a - b) <= bound
            parts.append(f"{key} {a:.6g} vs {b:.6g} (4 combined standard errors: {bound:.3g})")
        elif a is None or b is None:
            ok = a is None and b is None
            parts.append(f"{key} {a} vs {b}")
        else:
            ok = abs(a - b) <= abs_ + rel * abs(b) or (math.isnan(a) and math.isnan(b))
            parts.append(f"{key} {a:.6g} vs {b:.6g} (rel {rel:g}, abs {abs_:g})")
        if not ok:
            bad.append(key)
    fig = (f"{PROBE_MODEL_FOR.get(name, PROBE_MODEL)} n={_probe_n()} {dtype}, {device} {t_dev:.1f} s vs cpu {t_cpu:.1f} s: " + "; ".join(parts))
    if bad:
        raise RuntimeError(f"{', '.join(bad)} outside tolerance: {fig}")
    return fig, {"device": dev, "cpu": cpu}


# --- step 5: a process group of one --------------------------------------------------------------------


def worker_nccl(device: str) -> dict:
    """A process group of one forced (``setup(force=True)``, as ``PROBE_DIST_FORCE=1`` does): NCCL
    init, DDP(device_ids), SyncBatchNorm and the NCCL object collectives of the training loop, and
    two probes through their distributed paths (moments merged over the group), against the same
    training and probes as a plain process (deterministic algorithms on CUDA)."""
    import numpy as np
    import torch

    import probe
    from probe.runtime.dist import current, setup, teardown

    cuda = torch.device(device).type == "cuda"
    probes = {"saturation": dict(probe.get_probe("saturation").smoke),
              "gradvar": {"batches": 2, "batch_size": 8, "seeds": 1, "chunk": 8, "dtype": "float64"}}

    def run(root: str):
        store = probe.RunStore(root)
        cfg = probe.TrainConfig(model="tiny_triplet", epochs=1, batch_size=32, limit_train=96, limit_test=48,
                                seed=4, device=device, deterministic=cuda, sync_bn=cuda)
        r = probe.train(cfg, store)
        weights = store.load_checkpoint(r.run_id, 1)
        outs = {}
        for name, params in probes.items():
            o = probe.run_probe(store, name, params, run=r.run_id, n=16, device=device, save=False)[0]
            if o.error is not None:
                raise RuntimeError(f"probe {name}: {o.error}")
            outs[name] = o.result
        store.close()
        return r, weights, outs

    with tempfile.TemporaryDirectory() as tmp:
        r1, c1, p1 = run(os.path.join(tmp, "plain"))
        ddp = setup(device, force=True)
        try:
            seen = current()
            if not (seen.active and seen.world == 1 and seen.backend == ("nccl" if cuda else "gloo")):
                raise RuntimeError(f"the forced group is not active: {seen}")
            r2, c2, p2 = run(os.path.join(tmp, "forced"))
        finally:
            teardown()
    diff = max(float((c1["model"][k].double() - c2["model"][k].double()).abs().max()) for k in c1["model"])
    if diff > (1e-6 if cuda else 0.0) or len(c2["rng"].get("ranks", ())) != 1:
        raise RuntimeError(f"the run in the group differs from the plain run: max |dw| {diff:.3g}, "
                           f"rank states {len(c2['rng'].get('ranks', ()))}")
    s1, s2 = p1["saturation"], p2["saturation"]
    g1, g2 = p1["gradvar"], p2["gradvar"]
    rel = max(float(np.nanmax(np.abs(getattr(b, k) - getattr(a, k)) / np.maximum(np.abs(getattr(a, k)), 1e-300)))
              for a, b, keys in ((s1, s2, ("mean", "std", "gain")), (g1, g2, ("grad_norm", "trace_cov", "per_sample_var")))
              for k in keys)
    if not (np.array_equal(s1.hist, s2.hist) and rel <= 1e-9 and any("shared out over 1 rank" in n for n in g2.notes)):
        raise RuntimeError(f"probes in the group differ from the plain process (max rel {rel:.3g})")
    return {"figure": f"{ddp.backend} world 1 forced (DDP{', SyncBatchNorm' if cuda else ''}): tiny_triplet 1 epoch "
                      f"{r2.final_acc:.1f}% vs plain {r1.final_acc:.1f}%, max |dw| {diff:.2g}; saturation and gradvar "
                      f"through the group, max rel diff {rel:.2g}"}


# --- step 6: headline numbers --------------------------------------------------------------------------


def worker_matmul(device: str) -> dict:
    import torch

    cuda = torch.device(device).type == "cuda"
    n = 8192 if cuda else 512
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    dt = (time.perf_counter() - t0) / reps
    tf32 = (torch.backends.cuda.matmul.allow_tf32 if cuda else False)
    return {"flops": 2 * n ** 3 / dt, "n": n, "tf32": bool(tf32)}


def _digits_like(n: int, size: int, channels: int, classes: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def worker_ntk_trace(device: str, small: bool, peak: float) -> dict:
    import torch

    import probe

    n = 32 if small else 1024
    model = _model("add_resnet", num_classes=10, in_chans=1).to(device).eval()
    x, _ = _digits_like(n, 8, 1, 10)
    x = x.to(device)
    P = sum(p.numel() for p in model.parameters())
    probe.empirical_ntk(model, x[:8], kind="trace", device=device)   # warm-up (kernels, workspaces)
    _reset_peak(device)
    t0 = time.perf_counter()
    r = probe.empirical_ntk(model, x, kind="trace", device=device)
    _sync(device)
    dt = time.perf_counter() - t0
    frac = 2.0 * n * n * P / dt / peak
    return {"figure": f"add_resnet N={n} ({P} params, {r.method}, {str(r.kernel.dtype)}): {dt:.2f} s, "
                      f"{_peak(device)}, {100 * frac:.1f}% of the float32 matmul peak (2N^2P flops)",
            "seconds": dt, "peak_mib": _peak_mib(device), "peak_fraction": frac, "n": n}


def worker_ntk_lanczos(device: str, small: bool, peak: float) -> dict:
    import probe

    name, n, k = ("tiny_add", 128, 3) if small else ("add_resnet", 60000, 20)
    model = _model(name, num_classes=10, in_chans=1).to(device).eval()
    x, _ = _digits_like(n, 8, 1, 10)
    x = x.to(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    r = probe.ntk_topk_lanczos(model, x, k=k, device=device)
    _sync(device)
    dt = time.perf_counter() - t0
    ev = [float(v) for v in getattr(r, "eigenvalues", [])][:3]
    return {"figure": f"{name} N={n} synthetic 8x8, top-{k}: {dt:.2f} s, {_peak(device)}, "
                      f"top eigenvalues {', '.join(f'{v:.4g}' for v in ev)}",
            "seconds": dt, "peak_mib": _peak_mib(device), "n": n, "k": k}


def worker_hessian(device: str, small: bool, peak: float) -> dict:
    import probe

    if small:
        name, size, n, k, probes, kwargs = "tiny_wrn", 8, 16, 2, 10, {}
    else:
        name, size, n, k, probes, kwargs = "wrn16_10", 64, 200, 5, 100, {}
    model = _model(name, num_classes=101, in_chans=3, image_size=size, model_kwargs=kwargs)
    model = model.to(device).eval()
    x, y = _digits_like(n, size, 3, 101)
    _reset_peak(device)
    t0 = time.perf_counter()
    r = probe.hessian_spectrum(model, x.to(device), y.to(device), k=k, trace="hutchinson", trace_matvecs=probes,
                               density=False, n_samples=n, device=device)
    _sync(device)
    dt = time.perf_counter() - t0
    lam = [float(v) for v in r.eigenvalues][:1]
    tr = getattr(r.trace, "estimate", None) if r.trace is not None else None
    return {"figure": f"{name} {size}x{size} n={n}, top-{k} + {probes}-probe trace: {dt:.2f} s, {_peak(device)}, "
                      f"l_max {lam[0] if lam else float('nan'):.4g}, trace {tr if tr is None else f'{tr:.4g}'}",
            "seconds": dt, "peak_mib": _peak_mib(device)}


def worker_surface(device: str, small: bool, peak: float) -> dict:
    import probe

    grid, n = ("-1:1:5", 32) if small else ("-1:1:51", 256)
    model = _model("add_resnet", num_classes=10, in_chans=1).to(device).eval()
    x, y = _digits_like(n, 8, 1, 10)
    x, y = x.to(device), y.to(device)
    dirs = probe.random_directions(model, 2)
    probe.loss_surface(model, x, y, dirs, "-1:1:2", device=device)     # warm-up
    out = {}
    for how in ("auto", "loop"):
        _reset_peak(device)
        t0 = time.perf_counter()
        s = probe.loss_surface(model, x, y, dirs, grid, vectorize=how, device=device)
        _sync(device)
        out[how] = (time.perf_counter() - t0, _peak(device), _peak_mib(device), s)
    (ta, pa, pma, sa), (tl, pl, _, sl) = out["auto"], out["loop"]
    import numpy as np

    la, ll = np.asarray(getattr(sa, "loss", np.nan)), np.asarray(getattr(sl, "loss", np.nan))
    agree = float(np.nanmax(np.abs(la - ll))) if la.shape == ll.shape else float("nan")
    side = grid.rsplit(":", 1)[1]
    return {"figure": f"add_resnet {side}x{side} n={n}: batched {ta:.2f} s ({pa}) vs per-point loop {tl:.2f} s "
                      f"({pl}): {tl / ta:.1f}x, max |dloss| {agree:.2g}",
            "seconds": ta, "loop_seconds": tl, "peak_mib": pma, "speedup": tl / ta}


WORKERS = {"nccl": worker_nccl, "matmul": worker_matmul, "ntk-trace": worker_ntk_trace,
           "ntk-lanczos": worker_ntk_lanczos, "hessian": worker_hessian, "surface": worker_surface}


def run_worker_main(name: str, device: str, small: bool, peak: float) -> None:
    try:
        fn = WORKERS[name]
        res = fn(device) if name in ("nccl", "matmul") else fn(device, small, peak)
    except Exception as e:  # noqa: BLE001 -- reported by the parent as the step's FAIL line
        line = (str(e).strip().splitlines() or [""])[0][:300]
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {line}"}
    print_result(res)


def headline(name: str, device: str, small: bool, peak: float, timeout: float) -> tuple:
    res = _worker(name, device, timeout, *(["--small"] if small else []), "--peak", repr(peak))
    return res.pop("figure"), res


# --- main ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=os.environ.get("DEVICE"),
                    help="cuda | cuda:N | cpu (default: $DEVICE, else cuda when available)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peak", type=float, default=1.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError as e:
        say("FAIL", "setup", f"{sys.executable} cannot import torch ({e}); run it with the python that has "
                             "the machine's torch (make gpu-check PYTHON=...)")
        return _finish({"python": sys.executable}, time.perf_counter())

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        run_worker_main(args.worker, device, args.small, args.peak)
        return 0
    small = torch.device(device).type != "cuda"
    cuda = not small
    SMALL[0] = small
    t_start = time.perf_counter()
    DEADLINE[0] = time.monotonic() + BUDGET_S["cuda" if cuda else "cpu"]
    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda and torch.cuda.is_available() else None,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    print(f"gpu_check on {device} ({info['gpu'] or 'no GPU'}), torch {info['torch']}; "
          f"{'full sizes' if cuda else 'CPU dry run, small sizes'}", flush=True)
    if cuda and not torch.cuda.is_available():
        say("FAIL", "setup", f"DEVICE={device} but torch {torch.__version__} sees no CUDA device")
        return _finish(info, t_start)

    step("pytest-gpu", step_pytest, device)
    step("train-pair", step_train_pair, device, small)
    step("kill-resume", step_kill_resume, device, small)
    import probe

    for name in probe.list_probes():
        step(f"probe/{name}", step_probe, name, device)

    def nccl():
        res = _worker("nccl", device, 240)
        return res["figure"]

    step("nccl-world1" if cuda else "nccl-world1 (gloo)", nccl)

    peak = [float("nan")]

    def matmul():
        res = _worker("matmul", device, 120)
        peak[0] = res["flops"]
        return (f"float32 {res['n']}x{res['n']} matmul: {res['flops'] / 1e12:.2f} TFLOP/s "
                f"(TF32 {'on' if res['tf32'] else 'off'})", res)

    step("headline/matmul-peak", matmul)
    budget = {"ntk-trace": 120, "ntk-lanczos": 240, "hessian": 240, "surface": 180}
    for name, seconds in budget.items():
        step(f"headline/{name}", headline, name, device, small, peak[0], seconds * (2 if small else 1))
    say("SKIP", "headline/pyhessian", "PyHessian is not installed here and nothing is installed by the check")
    return _finish(info, t_start)


def _finish(info: dict, t_start: float) -> int:
    failed = [r["step"] for r in RESULTS if r["status"] == "FAIL"]
    total = time.perf_counter() - t_start
    summary = {**info, "seconds": round(total, 1), "ok": not failed, "failed": failed, "steps": RESULTS}
    print(f"{'OK' if not failed else 'FAILED'}: {sum(r['status'] == 'PASS' for r in RESULTS)} passed, "
          f"{len(failed)} failed, {sum(r['status'] == 'SKIP' for r in RESULTS)} skipped in {total:.0f} s", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
