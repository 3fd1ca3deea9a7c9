"""Training with per-epoch checkpoints and exact resume.

:func:`train` runs a :class:`TrainConfig` into the run store: per epoch it logs train / test loss,
top-1, top-5, the learning rate and the epoch time, and saves a checkpoint holding everything
needed to continue *bit-for-bit* (model, optimizer, the data-order / augmentation generator, the
global torch RNG used by dropout, the mixup generator). A run killed at any point and resumed
with :func:`resume` ends with the same metrics and weights as an uninterrupted run (CPU; on GPU
up to cuDNN non-determinism). A non-finite loss stops the run, marks it ``failed`` and keeps the
last good checkpoint.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from probe.errors import UserError

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "PRESETS", "train", "resume", "lr_at",
           "parse_schedule", "build_model", "load_run_model", "resolve_device", "evaluate"]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the run is marked failed."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (stored with the run as its config)."""

    model: str
    data: str = "digits"
    data_root: str | None = None
    fusion: str | None = None               # canonical fusion name, seed id (fmm08), add or mul
    model_kwargs: dict = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"                # multistep:60,120,160:0.2 | step:30:0.1 | cosine | constant
    label_smoothing: float = 0.0
    mixup: float = 0.0                      # Beta(alpha, alpha) mixup; 0 = off
    crop_padding: int = 0                   # augmentation on the train split only
    hflip: bool = False
    rebuild_optimizer_each_epoch: bool = False  # the seed re-created SGD every epoch (momentum reset)
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    image_size: int | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    eval_batch_size: int = 512

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def validate(self) -> "TrainConfig":
        checks = [(self.epochs >= 1, "--epochs must be at least 1"),
                  (self.batch_size >= 1, "--batch-size must be at least 1"),
                  (self.lr > 0 and math.isfinite(self.lr), "--lr must be a positive number"),
                  (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
                  (self.weight_decay >= 0, "--weight-decay must be >= 0"),
                  (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
                  (self.mixup >= 0, "--mixup (alpha) must be >= 0"),
                  (self.crop_padding >= 0, "--crop-padding must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        parse_schedule(self.schedule)
        return self


# Presets reproduce the seed recipes (REFERENCES sections 1 and 2). CLI flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    "fmm-caltech101": dict(model="wrn16_10", data="caltech101", epochs=200, batch_size=64, lr=0.1,
                           momentum=0.9, weight_decay=5e-4, schedule="multistep:60,120,160:0.2",
                           model_kwargs={"dropout": 0.3}),
    "nku-cifar100": dict(model="resnet50", data="cifar100", epochs=50, batch_size=256, lr=0.1, momentum=0.9,
                         weight_decay=1e-4, schedule="step:30:0.1", seed=666, crop_padding=4, hflip=True,
                         model_kwargs={"attention": "triplet", "stem": "imagenet"}),
}


# --- learning-rate schedules -------------------------------------------------------------------


def parse_schedule(text: str) -> tuple[str, tuple]:
    """``multistep:M1,M2,...:GAMMA`` | ``step:EVERY:GAMMA`` | ``cosine`` | ``constant``."""
    parts = text.split(":")
    try:
        if parts[0] == "multistep" and len(parts) == 3:
            return "multistep", (tuple(int(m) for m in parts[1].split(",") if m), float(parts[2]))
        if parts[0] == "step" and len(parts) == 3 and int(parts[1]) > 0:
            return "step", (int(parts[1]), float(parts[2]))
        if parts[0] in ("cosine", "constant") and len(parts) == 1:
            return parts[0], ()
    except ValueError:
        pass
    raise UserError(f"schedule {text!r}: expected multistep:60,120,160:0.2, step:30:0.1, cosine or constant")


def lr_at(config: TrainConfig, epoch: int) -> float:
    """Learning rate for 0-based ``epoch`` (a pure function: nothing to checkpoint)."""
    kind, args = parse_schedule(config.schedule)
    if kind == "multistep":
        milestones, gamma = args
        return config.lr * gamma ** sum(epoch >= m for m in milestones)
    if kind == "step":
        every, gamma = args
        return config.lr * gamma ** (epoch // every)
    if kind == "cosine":
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return config.lr


# --- pieces ------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: expected auto, cpu or cuda[:N]") from None


def build_model(name: str, *, num_classes: int, in_chans: int, image_size: int | None = None,
                fusion: str | None = None, model_kwargs: dict | None = None) -> nn.Module:
    """``models.create_model`` with the data's classes / channels passed where the builder takes them."""
    import models

    kw = dict(model_kwargs or {})
    accepted = models.accepted_kwargs(name)
    extra = {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size}
    for key, value in extra.items():
        open_kw = accepted is None and key != "image_size"  # image_size only where named explicitly
        if value is not None and key not in kw and (open_kw or (accepted is not None and key in accepted)):
            kw[key] = value
    if fusion is not None:
        if accepted is not None and "fusion" not in accepted:
            raise UserError(f"model {name!r} has no fusion to set (--fusion applies to the residual families)")
        kw["fusion"] = fusion
    try:
        return models.create_model(name, **kw)
    except (models.ModelNameError, models.ModelConfigError, models.FusionSpecError) as e:
        raise UserError(str(e)) from None


def _top_k_correct(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5), check_finite: bool = False) -> list[torch.Tensor]:
    """Correct counts at each k (labels are unique per row, so a row hits at most once)."""
    k_max = min(max(ks), logits.shape[1])
    hit = logits.topk(k_max, dim=1).indices.eq(y[:, None])  # (B, k)
    if check_finite:
        hit &= torch.isfinite(logits).all(dim=1, keepdim=True)  # non-finite rows count as wrong
    return [hit[:, :min(k, k_max)].sum() for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512,
             device: torch.device | None = None) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) of ``model`` in eval mode. Restores the model's mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        c1 = torch.zeros((), dtype=torch.long, device=device)
        c5 = torch.zeros((), dtype=torch.long, device=device)
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(device, non_blocking=True)
            yb = y[i:i + batch_size].to(device, non_blocking=True)
            logits = model(xb).float()
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
            a, b = _top_k_correct(logits, yb, check_finite=True)
            c1 += a
            c5 += b
        n = max(int(x.shape[0]), 1)
        return {"loss": loss_sum.item() / n, "top1": 100.0 * c1.item() / n, "top5": 100.0 * c5.item() / n}
    finally:
        model.train(was_training)


def _make_optimizer(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.nesterov and config.momentum > 0)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    status: str
    epochs_done: int
    best_acc: float | None
    best_epoch: int | None
    final_acc: float | None
    train_time_s: float
    metrics: list[dict]
    runs_root: str

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("metrics")
        return d


def _rng_state(loader_gen: torch.Generator, mix_rng: np.random.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "loader": loader_gen.get_state()}
    bg = mix_rng.bit_generator.state  # PCG64: ints only
    state["mixup"] = {"state": str(bg["state"]["state"]), "inc": str(bg["state"]["inc"]),
                      "has_uint32": int(bg["has_uint32"]), "uinteger": int(bg["uinteger"])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, loader_gen: torch.Generator, mix_rng: np.random.Generator,
                   device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    loader_gen.set_state(state["loader"])
    m = state["mixup"]
    mix_rng.bit_generator.state = {"bit_generator": "PCG64",
                                   "state": {"state": int(m["state"]), "inc": int(m["inc"])},
                                   "has_uint32": m["has_uint32"], "uinteger": m["uinteger"]}
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _load_data(config: TrainConfig):
    from probe.data import load_data

    return load_data(config.data, config.data_root, image_size=config.image_size, seed=config.seed,
                     limit_train=config.limit_train, limit_test=config.limit_test)


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=quiet, file=sys.stderr, dynamic_ncols=True)


# --- the loop ----------------------------------------------------------------------------------


def train(config: TrainConfig, store=None, *, quiet: bool = False, run_id: str | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``config`` into ``store`` (a :class:`probe.store.RunStore`), a new run unless ``run_id``
    names one to continue (see :func:`resume`)."""
    from probe.data import Augment, make_loader
    from probe.store import RunStore

    config = config.validate()
    store = store if store is not None else RunStore()
    device = resolve_device(config.device)
    data = _load_data(config)
    torch.manual_seed(config.seed)  # model init
    model = build_model(config.model, num_classes=data.num_classes, in_chans=data.in_channels,
                        image_size=data.image_size[0], fusion=config.fusion,
                        model_kwargs=config.model_kwargs).to(device)
    loader_gen = torch.Generator().manual_seed(config.seed + 1)
    mix_rng = np.random.Generator(np.random.PCG64(config.seed + 2))
    opt = _make_optimizer(model, config, lr_at(config, 0))
    start_epoch, best = 0, (None, None)
    if run_id is None:
        cfg = config.to_dict()
        cfg["resolved"] = {"model": model.probe_config, "data": data.describe(), "device": str(device),
                           "torch": torch.__version__}
        run_id = store.new_run(config.model, config.data, cfg)
    else:
        last = store.latest_checkpoint(run_id)
        if last is not None:
            ckpt = store.load_checkpoint(run_id, last)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            _set_rng_state(ckpt["rng"], loader_gen, mix_rng, device)
            start_epoch = int(ckpt["epoch"])  # completed epochs
            best = (ckpt.get("best_acc"), ckpt.get("best_epoch"))
        else:
            torch.manual_seed(config.seed)
    store.update_run(run_id, status="running", error="")
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    augment = Augment(config.crop_padding, config.hflip)
    loader = make_loader(x_train, y_train, config.batch_size, shuffle=True, generator=loader_gen, augment=augment)
    use_amp = bool(config.amp)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and device.type == "cuda")
    prior = store.get_metrics(run_id)
    train_time = sum(m.get("epoch_time_s") or 0.0 for m in prior if m["epoch"] < start_epoch)
    best_acc, best_epoch = best
    final_acc = None
    for epoch in range(start_epoch, config.epochs):
        lr = lr_at(config, epoch)
        if config.rebuild_optimizer_each_epoch and epoch > start_epoch:
            opt = _make_optimizer(model, config, lr)
        _set_lr(opt, lr)
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        c1 = torch.zeros((), dtype=torch.long, device=device)
        c5 = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        bar = _progress(len(loader), f"{config.model} epoch {epoch + 1}/{config.epochs}", quiet)
        for step, (xb, yb) in enumerate(loader):
            if config.mixup > 0:
                lam = float(mix_rng.beta(config.mixup, config.mixup))
                perm = torch.randperm(xb.shape[0], generator=loader_gen).to(device)
                xb = lam * xb + (1.0 - lam) * xb[perm]
                yb2 = yb[perm]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=config.label_smoothing)
                if config.mixup > 0:
                    loss = lam * loss + (1.0 - lam) * F.cross_entropy(
                        logits.float(), yb2, label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            with torch.no_grad():
                loss_sum += loss.detach().double() * xb.shape[0]
                a, b = _top_k_correct(logits.detach(), yb)
                c1 += a
                c5 += b
            seen += xb.shape[0]
            if step % 50 == 49 or step == len(loader) - 1:
                if not torch.isfinite(loss_sum):
                    bar.close()
                    msg = (f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; run {run_id} "
                           f"marked failed, last good checkpoint: epoch {store.latest_checkpoint(run_id)}")
                    store.update_run(run_id, status="failed", error=msg)
                    raise TrainingDiverged(msg)
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")
            bar.update(1)
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        test = evaluate(model, x_test, y_test, config.eval_batch_size, device)
        row = {"train_loss": loss_sum.item() / seen, "train_top1": 100.0 * c1.item() / seen,
               "train_top5": 100.0 * c5.item() / seen, "test_loss": test["loss"], "test_top1": test["top1"],
               "test_top5": test["top5"], "lr": lr, "epoch_time_s": epoch_time}
        final_acc = test["top1"]
        if best_acc is None or test["top1"] > best_acc:
            best_acc, best_epoch = test["top1"], epoch + 1
        # metrics first, then the checkpoint: a resume re-runs at most this epoch and re-logs it
        store.log_epoch(run_id, epoch + 1, **row)
        store.save_checkpoint(run_id, epoch + 1, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
            "rng": _rng_state(loader_gen, mix_rng, device), "best_acc": best_acc, "best_epoch": best_epoch,
            "model_config": model.probe_config})
        store.update_run(run_id, summary={"best_acc": best_acc, "best_epoch": best_epoch, "final_acc": final_acc,
                                          "epochs_done": epoch + 1, "train_time_s": train_time})
        if on_epoch is not None:
            on_epoch({"epoch": epoch + 1, **row})
        if not quiet:
            print(f"[{run_id}] epoch {epoch + 1}/{config.epochs}  train loss {row['train_loss']:.4f} "
                  f"acc {row['train_top1']:.2f}  test loss {test['loss']:.4f} acc {test['top1']:.2f}  "
                  f"lr {lr:.4g}  {epoch_time:.1f}s", file=sys.stderr)
    metrics = store.get_metrics(run_id)
    if final_acc is None and metrics:
        final_acc = metrics[-1].get("test_top1")
    store.update_run(run_id, status="finished", summary={"best_acc": best_acc, "best_epoch": best_epoch,
                                                          "final_acc": final_acc, "epochs_done": config.epochs,
                                                          "train_time_s": train_time})
    return TrainResult(run_id, "finished", config.epochs, best_acc, best_epoch, final_acc, train_time, metrics,
                       str(store.root))


def resume(run_ref: str, store=None, *, quiet: bool = False, epochs: int | None = None) -> TrainResult:
    """Continue a run from its last checkpoint (optionally extending it to ``epochs``)."""
    from probe.store import RunStore

    store = store if store is not None else RunStore()
    run = store.get_run(run_ref)
    config = TrainConfig.from_dict(run["config"])
    if epochs is not None:
        config = replace(config, epochs=epochs)
    if run["status"] == "finished" and (epochs is None or epochs <= (run["summary"] or {}).get("epochs_done", 0)):
        metrics = store.get_metrics(run["run_id"])
        s = run["summary"] or {}
        return TrainResult(run["run_id"], "finished", s.get("epochs_done", len(metrics)), s.get("best_acc"),
                           s.get("best_epoch"), s.get("final_acc"), s.get("train_time_s", 0.0), metrics,
                           str(store.root))
    return train(config, store, quiet=quiet, run_id=run["run_id"])


def load_run_model(store, run_ref: str, epoch: int | str | None = "last",
                   device: str | torch.device = "cpu") -> tuple[nn.Module, dict, int | None]:
    """Rebuild a run's model and load a checkpoint (``"last"``, an epoch, or ``None``/``"init"`` for
    the seeded initialisation). Returns (model in eval mode, run dict, epoch loaded)."""
    run = store.get_run(run_ref)
    config = TrainConfig.from_dict(run["config"])
    data = (run["config"].get("resolved") or {}).get("data") or {}
    if not data:
        raise UserError(f"run {run['run_id']} has no resolved data description; it cannot rebuild its model")
    in_chans, num_classes = int(data["in_channels"]), int(data["num_classes"])
    image_size = int(data["image_size"][0])
    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                        fusion=config.fusion, model_kwargs=config.model_kwargs)
    loaded = None
    if epoch not in (None, "init", 0):
        ckpt = store.load_checkpoint(run["run_id"], epoch)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise UserError(f"checkpoint of run {run['run_id']} does not fit model {config.model!r}: "
                            f"{first[1].strip() if len(first) > 1 else first[0]}") from None
        loaded = int(ckpt["epoch"])
    return model.to(device).eval(), run, loaded

