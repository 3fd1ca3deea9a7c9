"""Training throughput: ``probe.train`` (what ``probe train`` runs) vs a plain PyTorch loop.

Both loops train the same model (same constructor, same seed), on the same data tensors, with the same
batch size and optimizer (SGD, momentum 0.9, weight decay 5e-4, constant lr 0.05, no augmentation), and
both evaluate on the test split after every epoch. They are measured side by side in one process:

* train-only throughput = train images * epochs / summed training-pass time. For ours that is the sum of
  the ``epoch_time_s`` metrics (the training pass only); the plain loop times its training pass the same
  way (timer started after ``model.train()``, stopped after the last optimizer step).
* end-to-end throughput = train images * epochs / wall time of the whole run. For ours that is the
  ``train()`` call: data loading, model construction, run registration, per-epoch evaluation, metric
  logging, checkpointing and catalog updates. For the plain loop: model construction, optimizer, moving
  the data to the device, training and per-epoch evaluation.

Each loop gets a one-epoch warm-up per model; the timed repeats are interleaved (ours, plain, ours,
plain, ...) and the tables report medians and the ratio of medians (ours / plain). The thread count is
left at torch's default. Both loops draw the batch order from ``torch.Generator().manual_seed(seed + 1)``,
so they should end with the same weights (bit for bit on CPU); the largest difference is printed as a
sanity check that both loops do the same work.

    python benchmarks/bench_train.py [--models add_resnet mul_resnet] [--data digits] [--batch-size 64]
                                     [--epochs 3] [--repeats 3] [--device cpu|cuda|auto] [--json]

On CUDA each run also records the CUDA allocator's peak (``max_memory_allocated``, counted from the
run's start), printed per model after the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks._harness import add_device_flag, peak_memory_mib, start_memory
from probe import load_data
from probe import UserError
from probe import RunStore
from probe import TrainConfig, TrainingDiverged, build_model, resolve_device, train

LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
SEED = 0
EVAL_BATCH_SIZE = 512  # TrainConfig's default evaluation batch, used by both loops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- ours ----------------------------------------------------------------------------------------


def run_ours(model: str, args, device: torch.device, root: Path, epochs: int, tag: str) -> dict:
    """One ``train()`` call into a fresh runs root under ``root``."""
    config = TrainConfig(model=model, data=args.data, epochs=epochs, batch_size=args.batch_size, lr=LR,
                         momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, schedule="constant", seed=SEED,
                         device=str(device), crop_padding=0, hflip=False, mixup=0.0)
    store = RunStore(root / tag)
    marks: list[float] = []
    try:
        start_memory(device)
        t0 = time.perf_counter()
        result = train(config, store, on_epoch=lambda _row: marks.append(time.perf_counter()))
        _sync(device)
        wall = time.perf_counter() - t0
        peak = peak_memory_mib(device) if device.type == "cuda" else None
    finally:
        store.close()
    train_s = sum(float(m["epoch_time_s"]) for m in result.metrics)
    return {"train_s": train_s, "wall_s": wall, "epoch_train_s": [float(m["epoch_time_s"]) for m in result.metrics],
            "epoch_marks_s": [m - t0 for m in marks], "final_top1": result.final_acc, "gpu_peak_mib": peak,
            "_checkpoint": (str(root / tag), result.run_id, result.epochs_done)}


def _ours_weights(ref: tuple[str, str, int]) -> dict[str, torch.Tensor]:
    root, run_id, epoch = ref
    store = RunStore(root)
    try:
        return store.load_checkpoint(run_id, epoch)["model"]
    finally:
        store.close()


def _max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float | None:
    """Largest absolute difference over the floating-point entries of two state dicts (NaN counts as
    equal to NaN); None when their keys or shapes differ."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return None
    worst = 0.0
    for k in a:
        if a[k].is_floating_point():
            x, y = a[k].detach().cpu().double(), b[k].detach().cpu().double()
            same_nan = torch.isnan(x) & torch.isnan(y)
            d = torch.where(same_nan, torch.zeros_like(x), (x - y).abs())
            worst = max(worst, float("inf") if torch.isnan(d).any() else float(d.max()) if d.numel() else 0.0)
        elif not torch.equal(a[k].cpu(), b[k].cpu()):
            worst = max(worst, float("inf"))
    return worst


# --- plain ---------------------------------------------------------------------------------------


@torch.no_grad()
def _plain_eval(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    net.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], EVAL_BATCH_SIZE):
        logits = net(x[i:i + EVAL_BATCH_SIZE])
        yb = y[i:i + EVAL_BATCH_SIZE]
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(1) == yb).sum()
    n = max(int(x.shape[0]), 1)
    return loss_sum.item() / n, 100.0 * correct.item() / n


def run_plain(model: str, data, device: torch.device, batch_size: int, epochs: int) -> dict:
    """A hand-written loop: randperm batches, forward, cross_entropy, zero_grad, backward, step; then a
    test-set evaluation per epoch in eval mode under no_grad."""
    start_memory(device)
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    net = build_model(model, num_classes=data.num_classes, in_chans=data.in_channels,
                      image_size=data.image_size[0]).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    gen = torch.Generator().manual_seed(SEED + 1)
    n = int(x_train.shape[0])
    epoch_train, marks, top1 = [], [], None
    setup = time.perf_counter() - t0
    for _ in range(epochs):
        net.train()
        te = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = x_train[idx], y_train[idx]
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        epoch_train.append(time.perf_counter() - te)
        _, top1 = _plain_eval(net, x_test, y_test)
        marks.append(time.perf_counter() - t0)
    _sync(device)
    wall = time.perf_counter() - t0
    return {"train_s": sum(epoch_train), "wall_s": wall, "epoch_train_s": epoch_train, "epoch_marks_s": marks,
            "setup_s": setup, "final_top1": top1, "_state": net.state_dict(),
            "gpu_peak_mib": peak_memory_mib(device) if device.type == "cuda" else None}


# --- driver --------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _outside_train(run: dict) -> list[float]:
    """Per epoch: wall time between two epoch ends minus that epoch's training pass, i.e. evaluation plus
    whatever else the loop does per epoch (logging, checkpointing, ...). Where the run's setup time is not
    known (ours), the first epoch is left out."""
    m, t = run["epoch_marks_s"], run["epoch_train_s"]
    if "setup_s" in run:
        m = [run["setup_s"], *m]
        t = [0.0, *t]
    return [m[i] - m[i - 1] - t[i] for i in range(1, len(m))]


def _fixed_per_call(run: dict, per_epoch_outside: float, epochs: int) -> float:
    """Wall time of one call not spent in epochs: measured for the plain loop; for ours estimated as
    wall - training passes - epochs * (median per-epoch work outside the training pass)."""
    if "setup_s" in run:
        return run["setup_s"] + run["wall_s"] - run["epoch_marks_s"][-1]
    return run["wall_s"] - run["train_s"] - epochs * per_epoch_outside


def bench_model(model: str, args, device: torch.device, data, root: Path, log) -> dict:
    n_train = int(data.x_train.shape[0])
    images = n_train * args.epochs
    out: dict = {"model": model, "train_images": n_train, "epochs": args.epochs, "ours": [], "plain": []}
    try:
        log(f"  {model}: warm-up")
        run_ours(model, args, device, root, 1, f"{model}-warmup")
        run_plain(model, data, device, args.batch_size, 1)
        for r in range(args.repeats):
            log(f"  {model}: repeat {r + 1}/{args.repeats}")
            out["ours"].append(run_ours(model, args, device, root, args.epochs, f"{model}-r{r}"))
            out["plain"].append(run_plain(model, data, device, args.batch_size, args.epochs))
    except TrainingDiverged as e:
        out["error"] = f"diverged: {e}"
        return out
    # Both loops see the same init and batch order, so their final weights should agree (exactly on CPU).
    diff = _max_weight_diff(_ours_weights(out["ours"][-1]["_checkpoint"]), out["plain"][-1]["_state"])
    for run in out["ours"]:
        run.pop("_checkpoint")
    for run in out["plain"]:
        run.pop("_state")

    def rates(runs: list[dict], key: str) -> list[float]:
        return [images / run[key] for run in runs]

    s = {
        "plain_train_ips": _median(rates(out["plain"], "train_s")),
        "ours_train_ips": _median(rates(out["ours"], "train_s")),
        "plain_e2e_ips": _median(rates(out["plain"], "wall_s")),
        "ours_e2e_ips": _median(rates(out["ours"], "wall_s")),
    }
    s["ratio_train"] = _ratio(s["ours_train_ips"], s["plain_train_ips"])
    s["ratio_e2e"] = _ratio(s["ours_e2e_ips"], s["plain_e2e_ips"])
    # Where the end-to-end difference goes: per-epoch work outside the training pass (steady epochs)
    # and the fixed cost of one call (setup and teardown), both as medians over repeats.
    for who in ("ours", "plain"):
        outside, fixed = [], []
        for run in out[who]:
            gaps = _outside_train(run)
            if gaps:
                outside.append(statistics.median(gaps))
                fixed.append(_fixed_per_call(run, outside[-1], args.epochs))
        s[f"{who}_per_epoch_outside_train_s"] = _median(outside)
        s[f"{who}_fixed_per_call_s"] = _median(fixed)
    # Best of repeats: contention from other processes only ever adds time, so the fastest repeat is
    # the least disturbed one (reported beside the medians, which are the headline numbers).
    b = {
        "plain_train_ips": max(rates(out["plain"], "train_s")),
        "ours_train_ips": max(rates(out["ours"], "train_s")),
        "plain_e2e_ips": max(rates(out["plain"], "wall_s")),
        "ours_e2e_ips": max(rates(out["ours"], "wall_s")),
    }
    b["ratio_train"] = _ratio(b["ours_train_ips"], b["plain_train_ips"])
    b["ratio_e2e"] = _ratio(b["ours_e2e_ips"], b["plain_e2e_ips"])
    out["best"] = b
    ours_acc = [run["final_top1"] for run in out["ours"]]
    plain_acc = [run["final_top1"] for run in out["plain"]]
    s["final_top1_ours"] = ours_acc[-1] if ours_acc else None
    s["final_top1_plain"] = plain_acc[-1] if plain_acc else None
    s["final_weights_max_abs_diff"] = diff
    out["summary"] = s
    return out


def _load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device), "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def print_report(report: dict) -> None:
    m, a = report["machine"], report["args"]
    print(f"torch {m['torch']}  python {m['python']}  device {m['device']}"
          + (f" ({m['gpu']}, CUDA {m['cuda']})" if "gpu" in m else ""))
    print(f"threads {m['num_threads']} (interop {m['num_interop_threads']}), cpu_count {m['cpu_count']}, "
          f"{m['platform']}")
    print(f"data {a['data']}, batch {a['batch_size']}, epochs {a['epochs']}, repeats {a['repeats']} "
          f"(medians; ratio = ours / plain); SGD lr {LR} momentum {MOMENTUM} wd {WEIGHT_DECAY}, constant lr")
    print()
    print("median of repeats:")
    _print_table(report["results"], "summary")
    print("\nbest of repeats (least disturbed by other load):")
    _print_table(report["results"], "best")
    print()
    for res in report["results"]:
        if "error" in res:
            continue
        s = res["summary"]
        print(f"{res['model']}: per epoch outside the training pass: ours "
              f"{_fmt(_ms(s['ours_per_epoch_outside_train_s']), '.1f')} ms, plain "
              f"{_fmt(_ms(s['plain_per_epoch_outside_train_s']), '.1f')} ms; fixed per call: ours "
              f"{_fmt(_ms(s['ours_fixed_per_call_s']), '.0f')} ms, plain {_fmt(_ms(s['plain_fixed_per_call_s']), '.0f')}"
              f" ms; final test top-1 ours {_fmt(s['final_top1_ours'], '.2f')} plain "
              f"{_fmt(s['final_top1_plain'], '.2f')}; final weights max |ours - plain| "
              f"{_fmt(s['final_weights_max_abs_diff'], '.3g')}")
    print(f"(ours' fixed cost includes load_data({a['data']!r}): {1000 * report['load_data_s']:.0f} ms when "
          f"warm; the plain loop reuses tensors loaded once)")
    load = report["load_avg_1min"]
    if load["before"] is not None:
        print(f"\n1-min load average before {load['before']:.2f}, after {load['after']:.2f} on "
              f"{m['cpu_count']} CPUs" + ("  (WARNING: other work competed for the CPUs; numbers are noisy)"
                                          if max(load["before"], load["after"]) > 0.5 * (m["cpu_count"] or 1) + 0.5
                                          and m["device"] == "cpu" else ""))
    print(f"total benchmark time {report['elapsed_s']:.1f} s")


def _print_table(results: list[dict], key: str) -> None:
    header = ["model", "plain img/s", "ours img/s", "ratio (train-only)", "plain e2e img/s", "ours e2e img/s",
              "ratio (e2e)"]
    rows = []
    for res in results:
        if "error" in res:
            rows.append([res["model"], res["error"], "", "", "", "", ""])
            continue
        s = res[key]
        rows.append([res["model"], _fmt(s["plain_train_ips"], ".0f"), _fmt(s["ours_train_ips"], ".0f"),
                     _fmt(s["ratio_train"], ".3f"), _fmt(s["plain_e2e_ips"], ".0f"), _fmt(s["ours_e2e_ips"], ".0f"),
                     _fmt(s["ratio_e2e"], ".3f")])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list) -> str:
        return " | ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    print(line(header))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def _ms(v: float | None) -> float | None:
    return None if v is None else 1000.0 * v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["add_resnet", "mul_resnet"])
    p.add_argument("--data", default="digits")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    add_device_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1 or args.batch_size < 1:
        p.error("--epochs, --repeats and --batch-size must be at least 1")

    started = time.perf_counter()
    load_before = _load_avg()
    try:
        device = resolve_device(args.device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.json else (lambda msg: None)
    data = load_data(args.data, None, seed=SEED)  # what train() loads for this config
    t0 = time.perf_counter()
    load_data(args.data, None, seed=SEED)
    load_data_s = time.perf_counter() - t0  # part of ours' fixed cost per call (plain reuses `data`)
    log(f"benchmarking {', '.join(args.models)} on {args.data} ({int(data.x_train.shape[0])} train images), "
        f"device {device}, {torch.get_num_threads()} threads")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_runs_") as tmp:
        for model in args.models:
            results.append(bench_model(model, args, device, data, Path(tmp), log))
    report = {"machine": machine_info(device), "args": vars(args), "results": results,
              "load_avg_1min": {"before": load_before, "after": _load_avg()}, "load_data_s": load_data_s,
              "elapsed_s": time.perf_counter() - started}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
        if device.type == "cuda":
            for r in results:
                peaks = [_median([x["gpu_peak_mib"] for x in r.get(k, []) if x.get("gpu_peak_mib") is not None])
                         for k in ("ours", "plain")]
                print(f"{r['model']}: peak CUDA allocated (median of runs) ours "
                      + " MiB, plain ".join("-" if v is None else f"{v:.0f}" for v in peaks) + " MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
