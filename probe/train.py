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
import time
from functools import partial
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from probe.checks import check_bool, check_int, check_number
from probe._train_state import one_line, restore, rng_state
from probe.errors import StoreError, UserError, first_line
from probe.probes.registry import Progress

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "PRESETS", "train", "resume", "lr_at",
           "parse_schedule", "build_model", "check_model", "model_name_for_run", "load_run_model",
           "check_device", "resolve_device", "evaluate"]


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
    sync_bn: bool = False                   # under torchrun: BatchNorm statistics over the global batch (CUDA)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise UserError(f"a training config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:  # e.g. a stored config without "model"
            raise UserError(f"training config is incomplete ({e})") from None

    def validate(self) -> "TrainConfig":
        """Check every field's type and range; raises :class:`UserError` naming the first bad one."""
        def int_in(name, lo, hi, optional=False):
            if not (optional and getattr(self, name) is None):
                check_int(name, getattr(self, name), lo, hi)

        def num_in(name, lo, hi, *, lo_open=False, hi_open=False):
            check_number(name, getattr(self, name), lo, hi, lo_open=lo_open, hi_open=hi_open)

        if not isinstance(self.model, str) or not self.model.strip():
            raise UserError(f"model must be a model name, got {self.model!r}")
        for name in ("data", "schedule", "device"):
            if not isinstance(getattr(self, name), str):
                raise UserError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("data_root", "fusion"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise UserError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.model_kwargs, dict) or not all(isinstance(k, str) for k in self.model_kwargs):
            raise UserError(f"model_kwargs must be a mapping of argument names, got {self.model_kwargs!r}")
        for name in ("nesterov", "hflip", "rebuild_optimizer_each_epoch", "amp", "sync_bn"):
            check_bool(name, getattr(self, name))
        int_in("epochs", 1, MAX_EPOCHS)
        int_in("batch_size", 1, MAX_BATCH)
        int_in("eval_batch_size", 1, MAX_BATCH)
        num_in("lr", 0, MAX_LR, lo_open=True)
        num_in("momentum", 0, 1, hi_open=True)
        num_in("weight_decay", 0, 1)
        num_in("label_smoothing", 0, 1, hi_open=True)
        num_in("mixup", 0, 100)
        int_in("crop_padding", 0, 64)
        int_in("seed", 0, MAX_SEED)
        int_in("image_size", 1, 1024, optional=True)
        int_in("limit_train", 1, 10 ** 9, optional=True)
        int_in("limit_test", 1, 10 ** 9, optional=True)
        parse_schedule(self.schedule)
        check_device(self.device)
        return self


#: Ranges accepted by :meth:`TrainConfig.validate`.
MAX_EPOCHS = 100_000
MAX_BATCH = 2 ** 20
MAX_LR = 1000.0
MAX_SEED = 2 ** 31 - 1


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
    """``multistep:M1,M2,...:GAMMA`` | ``step:EVERY:GAMMA`` | ``cosine`` | ``constant``.

    Milestones are non-negative and increasing, ``EVERY`` positive, ``GAMMA`` a finite number in (0, 10].
    """
    parts = str(text).split(":")
    try:
        if parts[0] == "multistep" and len(parts) == 3:
            milestones, gamma = tuple(int(m) for m in parts[1].split(",") if m), float(parts[2])
            if (all(m >= 0 for m in milestones) and list(milestones) == sorted(set(milestones))
                    and math.isfinite(gamma) and 0 < gamma <= 10):
                return "multistep", (milestones, gamma)
        if parts[0] == "step" and len(parts) == 3:
            every, gamma = int(parts[1]), float(parts[2])
            if 0 < every <= MAX_EPOCHS and math.isfinite(gamma) and 0 < gamma <= 10:
                return "step", (every, gamma)
        if parts[0] in ("cosine", "constant") and len(parts) == 1:
            return parts[0], ()
    except ValueError:
        pass
    raise UserError(f"schedule {text!r}: expected multistep:60,120,160:0.2 (increasing milestones), "
                    "step:30:0.1, cosine or constant, with a factor in (0, 10]")


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


def check_device(device: str) -> str:
    """``device`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; raises :class:`UserError` otherwise."""
    import re

    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", device):
        raise UserError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    return device


def resolve_device(device: str) -> torch.device:
    """The torch device for ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {device} was asked for but no CUDA device is available; use cpu or auto")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(device)


def build_model(name: str, *, num_classes: int, in_chans: int, image_size: int | None = None,
                fusion: str | None = None, model_kwargs: dict | None = None) -> nn.Module:
    """``models.create_model`` with the data's classes / channels passed where the builder takes them.

    A ``package.module:factory`` name imports and runs that module: pass only names the user gave
    (a stored run goes through :func:`model_name_for_run` first)."""
    import models

    kw = dict(model_kwargs or {})
    try:
        accepted = models.accepted_kwargs(name)
        extra = {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size}
        for key, value in extra.items():
            open_kw = accepted is None and key != "image_size"  # image_size only where named explicitly
            if value is not None and key not in kw and (open_kw or (accepted is not None and key in accepted)):
                kw[key] = value
        if fusion is not None:
            if accepted is not None and "fusion" not in accepted:
                raise UserError(f"model {name!r} has no fusion to set (a fusion applies to the residual families)")
            kw["fusion"] = fusion
        if not models.is_factory_name(name):  # sizes may come from a stored config: count them first
            with torch.device("meta"):
                size = sum(t.numel() for t in _tensors(models.create_model(name, **kw)))
            if size > MAX_MODEL_ELEMENTS:
                raise UserError(f"model {name!r} with {kw} would hold {size:.3g} parameter and buffer elements "
                                f"(more than {MAX_MODEL_ELEMENTS:.3g}); refused")
        return models.create_model(name, **kw)
    except (models.ModelNameError, models.ModelConfigError, models.FusionSpecError) as e:
        raise UserError(str(e)) from None


#: Most parameter and buffer elements a registered model may be built with (16 GiB of float32).
MAX_MODEL_ELEMENTS = 2 ** 32


def _tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


def check_model(model: nn.Module, x: torch.Tensor, num_classes: int, name: str = "model") -> None:
    """One forward on the probe batch ``x`` (eval mode, no gradients, RNG state kept) to check that
    ``model`` has trainable parameters and returns float logits of shape ``(B, num_classes)``.

    Raises :class:`UserError` naming what is wrong; the model is left as it was."""
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"model {name!r} has no trainable parameters")
    was_training = model.training
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            out = model(x)
    except Exception as e:  # a user model may raise anything
        first = first_line(e, default="")
        raise UserError(f"model {name!r} failed on a batch of shape {tuple(x.shape)}: "
                        f"{type(e).__name__}{': ' + first if first else ''}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise UserError(f"model {name!r} returned a {type(out).__name__}; it must return a tensor of "
                        f"logits (batch, {num_classes})")
    if tuple(out.shape) != (x.shape[0], num_classes):
        raise UserError(f"model {name!r} returned shape {tuple(out.shape)} for a batch of {x.shape[0]} "
                        f"inputs; expected ({x.shape[0]}, {num_classes}), one logit per class")
    if not out.is_floating_point():
        raise UserError(f"model {name!r} returned {out.dtype} logits; expected floating point")


def model_name_for_run(run: dict, factory: str | None = None, trust_factory: bool = False) -> str:
    """The model name to rebuild a stored run with, without trusting stored content.

    A run of a registered model is rebuilt by its stored name. A run whose model came from a user
    factory (``package.module:factory``) is rebuilt only with a factory the caller names again
    (``factory``), or with the stored name when ``trust_factory`` is set: a stored name is data and
    is never imported on its own."""
    from models import is_factory_name

    stored = (run.get("config") or {}).get("model")
    if not isinstance(stored, str) or not stored:
        raise UserError(f"run {run['run_id']} has no model name in its config")
    if factory is not None:
        if not is_factory_name(factory):
            raise UserError(f"factory {factory!r}: expected package.module:factory")
        if not is_factory_name(stored):
            raise UserError(f"run {run['run_id']} is a registered model ({stored!r}); a factory applies only "
                            "to runs built by a user factory")
        return factory
    if not is_factory_name(stored) or trust_factory:
        return stored
    raise UserError(f"run {run['run_id']} was built by the user factory {stored!r}; a name stored in a runs "
                    f"folder is never imported. If you trust that code, name the factory again (factory={stored!r}) "
                    "or trust the stored name (trust_factory)")


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


def _scaled_ce(logits: torch.Tensor, target: torch.Tensor, *, label_smoothing: float, scale: float) -> torch.Tensor:
    """``scale`` x the summed cross-entropy: a rank's share of the global batch's mean loss, so that
    DDP's average over ranks is that mean whatever the split."""
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="sum") * scale


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm replaced by :class:`torch.nn.SyncBatchNorm` (statistics over
    the global batch; CUDA only), sharing the parameters and buffers. A BN with a pinned
    (``fixed:v``) weight or bias has no synchronised form and is refused."""
    from models.fusion import PinnedBatchNorm2d

    def convert(module: nn.Module, name: str) -> nn.Module:
        if isinstance(module, PinnedBatchNorm2d) and (module.weight_mode.is_fixed or module.bias_mode.is_fixed):
            raise UserError(f"--sync-bn: {name or 'the model'} is a BatchNorm with a pinned weight or bias; "
                            "it has no synchronised form (train without --sync-bn)")
        if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, PinnedBatchNorm2d):
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)
        for child_name, child in list(module.named_children()):
            setattr(module, child_name, convert(child, f"{name}.{child_name}" if name else child_name))
        return module

    return convert(model, "")


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


def _load_data(config: TrainConfig):
    from probe.data import load_data

    return load_data(config.data, config.data_root, image_size=config.image_size, seed=config.seed,
                     limit_train=config.limit_train, limit_test=config.limit_test)


# --- the loop ----------------------------------------------------------------------------------


def train(config: TrainConfig, store=None, *, run_id: str | None = None,
          on_epoch: Callable[[dict], None] | None = None, progress: Progress | None = None,
          model_name: str | None = None) -> TrainResult:
    """Train ``config`` into ``store`` (a :class:`probe.store.RunStore`), a new run unless ``run_id``
    names one to continue (see :func:`resume`; ``model_name`` then overrides the stored model name,
    as checked by :func:`model_name_for_run`). ``on_epoch(row)`` gets each epoch's metrics (with
    ``run_id``, ``epoch`` and ``epochs``); ``progress(desc, step, steps)`` the steps of an epoch.

    The run's status ends ``finished``; ``failed`` with a one-line reason after a non-finite loss or
    weights (:class:`TrainingDiverged`), a full disk or any other error; ``interrupted`` after
    ``KeyboardInterrupt``. Every exception is re-raised after the status is recorded."""
    from probe.runtime.dist import setup
    from probe.store import RunStore

    config = config.validate()
    device = resolve_device(config.device)
    ddp = setup(device)
    store = store if store is not None else (RunStore() if ddp.main else None)
    device = ddp.device(device)
    resuming = run_id is not None
    threads = torch.get_num_threads()
    if resuming:  # the thread count of the original run: CPU reductions depend on it
        resolved = ddp.broadcast((store.get_run(run_id)["config"].get("resolved") or {}) if ddp.main else None)
        stored = resolved.get("num_threads")
        if isinstance(stored, int) and not isinstance(stored, bool) and 1 <= stored <= 4096:
            torch.set_num_threads(stored)
        world = resolved.get("world_size", 1)
        if world != ddp.world:
            raise UserError(f"run {run_id} was trained by {world} process(es); resume it with the same number "
                            f"(torchrun --nproc-per-node {world}, or probe train --resume RUN --nproc {world}), "
                            f"not {ddp.world}: each rank's batch share and random state are part of the run")
    if config.sync_bn and ddp.active and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices (torch's SyncBatchNorm is GPU-only); on CPU each rank "
                        "normalises its own part of the batch")
    try:
        return _train(config, store, device, ddp, run_id=run_id, on_epoch=on_epoch, progress=progress,
                      model_name=model_name or config.model)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, store, device: torch.device, ddp, *, run_id: str | None,
           on_epoch: Callable[[dict], None] | None, progress: Progress | None, model_name: str) -> TrainResult:
    """The loop. Under ``torchrun`` (``ddp.active``) every rank draws the same seeded global
    batches and trains on its contiguous part of each (gradients averaged by DDP, the loss scaled
    so that the average is the global batch's mean), the epoch's counts are summed over the ranks,
    and rank 0 alone evaluates, logs and writes checkpoints (holding every rank's RNG state)."""
    from probe.data import Augment, make_loader

    data = _load_data(config)
    torch.manual_seed(config.seed)  # model init
    model = build_model(model_name, num_classes=data.num_classes, in_chans=data.in_channels,
                        image_size=data.image_size[0], fusion=config.fusion,
                        model_kwargs=config.model_kwargs).to(device)
    check_model(model, data.x_train[:2].to(device), data.num_classes, model_name)
    loader_gen = torch.Generator().manual_seed(config.seed + 1)
    mix_rng = np.random.Generator(np.random.PCG64(config.seed + 2))
    if ddp.active:
        if config.sync_bn:
            model = sync_batchnorm(model)
        torch.manual_seed(config.seed + 7919 * (ddp.rank + 1))  # each rank its own dropout masks
    opt = _make_optimizer(model, config, lr_at(config, 0))
    start_epoch, best_acc, best_epoch = 0, None, None
    if run_id is None:
        if ddp.main:
            cfg = config.to_dict()
            cfg["resolved"] = {"model": model.probe_config, "data": data.describe(), "device": str(device),
                               "torch": torch.__version__, "num_threads": torch.get_num_threads(),
                               "world_size": ddp.world}
            run_id = store.new_run(config.model, config.data, cfg)
        run_id = ddp.broadcast(run_id)
    else:
        # Without a checkpoint the run restarts exactly as it began: the model was just built from
        # the same seed and the global RNG stands where a new run's would.
        last = ddp.broadcast(store.latest_checkpoint(run_id) if ddp.main else None)
        if last is not None:
            ckpt = ddp.broadcast(store.load_checkpoint(run_id, last) if ddp.main else None)
            start_epoch, best_acc, best_epoch = restore(ckpt, f"checkpoint epoch {last} of run {run_id}", model,
                                                         opt, loader_gen, mix_rng, device, ddp.rank)
    net = model
    if ddp.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    main = ddp.main
    epoch = start_epoch
    try:
        if main:
            store.update_run(run_id, status="running", error="")
        x_train, y_train = data.x_train.to(device), data.y_train.to(device)
        x_test, y_test = data.x_test.to(device), data.y_test.to(device)
        augment = Augment(config.crop_padding, config.hflip)
        loader = make_loader(x_train, y_train, config.batch_size, shuffle=True, generator=loader_gen,
                             augment=augment)
        use_amp = bool(config.amp)
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and device.type == "cuda")
        history = [m for m in store.get_metrics(run_id) if m["epoch"] <= start_epoch] if main else []
        train_time = sum(m.get("epoch_time_s") or 0.0 for m in history)  # the sum of its epochs
        final_acc = history[-1].get("test_top1") if history else None
        for epoch in range(start_epoch, config.epochs):
            lr = lr_at(config, epoch)
            if config.rebuild_optimizer_each_epoch and epoch > start_epoch:
                opt = _make_optimizer(model, config, lr)
            _set_lr(opt, lr)
            net.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            c1 = torch.zeros((), dtype=torch.long, device=device)
            c5 = torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            desc, steps = f"{config.model} epoch {epoch + 1}/{config.epochs}", len(loader)
            for step, (xb, yb) in enumerate(loader):
                if config.mixup > 0:
                    lam = float(mix_rng.beta(config.mixup, config.mixup))
                    perm = torch.randperm(xb.shape[0], generator=loader_gen).to(device)
                    xb = lam * xb + (1.0 - lam) * xb[perm]
                    yb2 = yb[perm]
                n_global, weight = xb.shape[0], 1.0
                if ddp.active:  # this rank's part of the global batch (a rank left without one repeats
                    part = ddp.shard(n_global)  # the first sample at weight 0, so every rank steps)
                    if part.start == part.stop:
                        part, weight = slice(0, 1), 0.0
                    xb, yb = xb[part], yb[part]
                    if config.mixup > 0:
                        yb2 = yb2[part]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    logits = net(xb)
                    ce = (partial(F.cross_entropy, label_smoothing=config.label_smoothing) if not ddp.active else
                          partial(_scaled_ce, label_smoothing=config.label_smoothing,
                                  scale=weight * ddp.world / n_global))
                    loss = ce(logits.float(), yb)
                    if config.mixup > 0:
                        loss = lam * loss + (1.0 - lam) * ce(logits.float(), yb2)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                with torch.no_grad():
                    # the global batch's mean loss is the sum of the ranks' scaled losses / world
                    loss_sum += loss.detach().double() * (n_global / ddp.world if ddp.active else n_global)
                    if weight:
                        a, b = _top_k_correct(logits.detach(), yb)
                        c1 += a
                        c5 += b
                seen += n_global
                if step % 50 == 49 or step == len(loader) - 1:
                    so_far = ddp.all_reduce_(loss_sum.clone())
                    what = (f"loss became {so_far.item()}" if not torch.isfinite(so_far)
                            else _nonfinite_weights(model, buffers=step == len(loader) - 1))
                    if what:
                        raise TrainingDiverged(
                            f"{what} at epoch {epoch + 1}, step {step + 1}; run {run_id} marked failed, "
                            f"last good checkpoint: epoch {store.latest_checkpoint(run_id)}")
                if progress is not None:
                    progress(desc, step + 1, steps)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            for total in (loss_sum, c1, c5):
                ddp.all_reduce_(total)
            epoch_time = time.perf_counter() - t0
            train_time += epoch_time
            rng = rng_state(loader_gen, mix_rng, device)
            if ddp.active:
                ranks = ddp.gather(torch.get_rng_state())
                if main:
                    rng["ranks"] = ranks
            if not main:
                continue
            test = evaluate(model, x_test, y_test, config.eval_batch_size, device)
            row = {"train_loss": loss_sum.item() / seen, "train_top1": 100.0 * c1.item() / seen,
                   "train_top5": 100.0 * c5.item() / seen, "test_loss": test["loss"], "test_top1": test["top1"],
                   "test_top5": test["top5"], "lr": lr, "epoch_time_s": epoch_time}
            final_acc = test["top1"]
            if best_acc is None or test["top1"] > best_acc:
                best_acc, best_epoch = test["top1"], epoch + 1
            history.append({"epoch": epoch + 1, **row})
            # metrics first, then the checkpoint: a resume re-runs at most this epoch and re-logs it
            store.log_epoch(run_id, epoch + 1, **row)
            store.save_checkpoint(run_id, epoch + 1, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                "rng": rng, "best_acc": best_acc, "best_epoch": best_epoch,
                "model_config": model.probe_config, "metrics": history, "train_time_s": train_time})
            store.update_run(run_id, summary={"best_acc": best_acc, "best_epoch": best_epoch,
                                              "final_acc": final_acc, "epochs_done": epoch + 1,
                                              "train_time_s": train_time})
            if on_epoch is not None:
                on_epoch({"run_id": run_id, "epoch": epoch + 1, "epochs": config.epochs, **row})
        if main:
            metrics = store.get_metrics(run_id)
            if final_acc is None and metrics:
                final_acc = metrics[-1].get("test_top1")
            store.update_run(run_id, status="finished", summary={"best_acc": best_acc, "best_epoch": best_epoch,
                                                                  "final_acc": final_acc, "epochs_done": config.epochs,
                                                                  "train_time_s": train_time})
            result = TrainResult(run_id, "finished", config.epochs, best_acc, best_epoch, final_acc, train_time,
                                 metrics, str(store.root))
        result = ddp.broadcast(result if main else None)
    except KeyboardInterrupt:
        if main:
            _mark(store, run_id, "interrupted", lambda: f"interrupted during epoch {epoch + 1}; it resumes from "
                                                        f"epoch {store.latest_checkpoint(run_id) or 0}")
        raise
    except BaseException as e:
        if main:
            _mark(store, run_id, "failed", one_line(e))
        raise
    return result


def _mark(store, run_id: str, status: str, error: str | Callable[[], str]) -> None:
    """Best effort: record why a run stopped (the disk may be full; the original error wins)."""
    try:
        store.record_stop(run_id, status, error() if callable(error) else error)
    except Exception:  # noqa: BLE001 - the caller re-raises the error that stopped the run
        pass


def _nonfinite_weights(model: nn.Module, buffers: bool = False) -> str | None:
    """``"weights became non-finite (first: NAME)"`` when a parameter (or a floating buffer) holds
    NaN or inf, else ``None``."""
    tensors = list(model.named_parameters())
    if buffers:
        tensors += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    for name, t in tensors:
        if not bool(torch.isfinite(t).all()):
            return f"weights became non-finite (first: {name})"
    return None


def resume(run_ref: str, store=None, *, epochs: int | None = None, factory: str | None = None,
           trust_factory: bool = False, device: str | None = None, data_root: str | None = None,
           on_epoch: Callable[[dict], None] | None = None, progress: Progress | None = None) -> TrainResult:
    """Continue a run from its last checkpoint (from the start when it has none), optionally
    extending it to ``epochs``, on another ``device`` or reading its data from another
    ``data_root``; everything else comes from the stored config. A run built by a user factory
    needs ``factory`` or ``trust_factory`` (see :func:`model_name_for_run`)."""
    from probe.runtime.dist import DistError, current, launched, setup

    ddp = setup(resolve_device(device or "auto")) if launched() else current()
    if not ddp.main:  # rank 0 reads the run and tells the others what to train
        what = ddp.broadcast(None)
        if what[0] == "error":
            raise DistError(f"rank {ddp.rank}: rank 0 could not resume run {run_ref} (rank 0 says why)")
        if what[0] == "done":
            return what[1]
        _, config, run_id, name = what
        return train(config, None, run_id=run_id, model_name=name, on_epoch=on_epoch, progress=progress)
    try:
        what = _resume_plan(run_ref, store, epochs, factory, trust_factory, device, data_root)
    except BaseException:
        ddp.broadcast(("error", None))   # the other ranks stop too (rank 0 reports why)
        raise
    ddp.broadcast(what)
    if what[0] == "done":
        return what[1]
    _, config, run_id, name = what
    return train(config, _store_or_default(store), run_id=run_id, model_name=name, on_epoch=on_epoch, progress=progress)


def _store_or_default(store):
    from probe.store import RunStore

    return store if store is not None else RunStore()


def _resume_plan(run_ref: str, store, epochs, factory, trust_factory, device, data_root) -> tuple:
    """``("done", TrainResult)`` for a finished run that needs no more epochs, else ``("train",
    config, run id, model name)``."""
    store = _store_or_default(store)
    run = store.get_run(run_ref)
    name = model_name_for_run(run, factory, trust_factory)
    config = TrainConfig.from_dict(run["config"]).validate()
    if device is not None:
        config = replace(config, device=check_device(device))
    if data_root is not None:
        config = replace(config, data_root=str(data_root))
    done = (run["summary"] or {}).get("epochs_done") or 0
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or not done <= epochs <= MAX_EPOCHS:
            raise UserError(f"epochs {epochs!r}: run {run['run_id']} has {done} epochs done; a resume can "
                            f"keep or extend that, up to {MAX_EPOCHS}")
        if epochs != config.epochs and parse_schedule(config.schedule)[0] == "cosine":
            raise UserError(f"run {run['run_id']} uses a cosine schedule over {config.epochs} epochs; changing "
                            "the number of epochs would change the learning rate of the epochs already trained")
        config = replace(config, epochs=epochs)
    if run["status"] == "finished" and config.epochs <= done:
        metrics = store.get_metrics(run["run_id"])
        s = run["summary"] or {}
        return ("done", TrainResult(run["run_id"], "finished", s.get("epochs_done", len(metrics)), s.get("best_acc"),
                                    s.get("best_epoch"), s.get("final_acc"), s.get("train_time_s", 0.0), metrics,
                                    str(store.root)))
    return ("train", config, run["run_id"], name)


def load_run_model(store, run_ref: str, epoch: int | str | None = "last",
                   device: str | torch.device = "cpu", *, factory: str | None = None,
                   trust_factory: bool = False, init_seed: int | None = None) -> tuple[nn.Module, dict, int | None]:
    """Rebuild a run's model and load a checkpoint (``"last"``, an epoch, or ``None``/``"init"`` for
    the seeded initialisation; ``init_seed`` replaces the run's seed for that initialisation).
    Returns (model in eval mode, run dict, epoch loaded).

    A run built by a user factory needs ``factory`` or ``trust_factory`` (see
    :func:`model_name_for_run`); a registered model is rebuilt by its stored name."""
    run = store.get_run(run_ref)
    name = model_name_for_run(run, factory, trust_factory)
    config = TrainConfig.from_dict(run["config"]).validate()
    data = (run["config"].get("resolved") or {}).get("data") or {}
    try:
        in_chans, num_classes = int(data["in_channels"]), int(data["num_classes"])
        image_size = int(data["image_size"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"run {run['run_id']} has no valid resolved data description; it cannot rebuild "
                        "its model") from None
    if not (1 <= in_chans <= 4096 and 1 <= num_classes <= 10 ** 6 and 1 <= image_size <= 4096):
        raise UserError(f"run {run['run_id']}: stored data shape out of range ({in_chans} channels, "
                        f"{num_classes} classes, size {image_size})")
    torch.manual_seed(config.seed if init_seed is None else init_seed)
    model = build_model(name, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                        fusion=config.fusion, model_kwargs=config.model_kwargs)
    loaded = None
    if epoch not in (None, "init", 0):
        if isinstance(epoch, str) and epoch.lower() in ("last", "latest"):
            epoch = store.latest_checkpoint(run["run_id"])
            if epoch is None:
                raise UserError(f"run {run['run_id']} has no checkpoints")
        ckpt = store.load_checkpoint(run["run_id"], epoch)
        where = f"checkpoint epoch {epoch} of run {run['run_id']}"
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise StoreError(f"{where} has no valid 'model' entry; it cannot be loaded")
        try:
            model.load_state_dict(ckpt["model"])
        except (RuntimeError, TypeError, KeyError, ValueError) as e:
            lines = str(e).strip().splitlines()
            detail = lines[1].strip() if len(lines) > 1 else lines[0] if lines else type(e).__name__
            raise UserError(f"{where} does not fit model {config.model!r}: {detail}") from None
        loaded = int(epoch)
    return model.to(device).eval(), run, loaded
