"""The training loop, with per-epoch checkpoints and exact resume.

:func:`train` runs a :class:`TrainConfig` into the run store: per epoch it logs train / test loss,
top-1, top-5, the learning rate and the epoch time, and saves a checkpoint holding everything
needed to continue *bit-for-bit* (model, optimizer, the data-order / augmentation generator, the
global and CUDA RNGs used by dropout, the mixup generator, the loss scaler). A run killed at any
point and resumed with :func:`~probe.training.resume` ends with the same metrics and weights as an
uninterrupted run (CPU; on CUDA with ``deterministic`` on the same GPU and software, which the run
records: a resume elsewhere warns). A non-finite loss stops the run, marks it ``failed`` and keeps
the last good checkpoint.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from probe.errors import UserError, first_line
from probe.probes.registry import Progress
from probe.training.build import build_model, check_model, sync_batchnorm
from probe.training.config import TrainConfig, lr_at, resolve_device
from probe.training.numerics import (choose_amp_dtype, cudnn_benchmark, deterministic, environment, environment_changes,
                                     make_scaler, uses_cudnn_benchmark)
from probe.training.state import one_line, per_rank_states, rank_rng_state, restore, rng_state

__all__ = ["TrainingDiverged", "TrainResult", "train", "evaluate"]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the run is marked failed."""


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


def _make_optimizer(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.nesterov and config.momentum > 0)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _load_data(config: TrainConfig):
    from probe.data import load_data

    return load_data(config.data, config.data_root, image_size=config.image_size, seed=config.seed,
                     limit_train=config.limit_train, limit_test=config.limit_test)


# --- the loop ----------------------------------------------------------------------------------


def train(config: TrainConfig, store=None, *, run_id: str | None = None,
          on_epoch: Callable[[dict], None] | None = None, progress: Progress | None = None,
          model_name: str | None = None) -> TrainResult:
    """Train ``config`` into ``store`` (a :class:`probe.store.RunStore`), a new run unless ``run_id``
    names one to continue (see :func:`~probe.training.resume`; ``model_name`` then overrides the
    stored model name, as checked by :func:`~probe.training.build.model_name_for_run`).
    ``on_epoch(row)`` gets each epoch's metrics (with ``run_id``, ``epoch`` and ``epochs``);
    ``progress(desc, step, steps)`` the steps of an epoch.

    The run's status ends ``finished``; ``failed`` with a one-line reason after a non-finite loss or
    weights (:class:`TrainingDiverged`), a full disk or any other error; ``interrupted`` after
    ``KeyboardInterrupt``. Every exception is re-raised after the status is recorded.

    With ``config.amp`` the autocast dtype is :func:`~probe.training.numerics.choose_amp_dtype`'s
    (float16 with a loss scaler); ``config.deterministic`` sets deterministic algorithms for the
    run (:func:`~probe.training.numerics.deterministic`, restored afterwards); on a CUDA device
    without it cuDNN benchmarks its kernels (:func:`~probe.training.numerics.cudnn_benchmark`,
    recorded as ``cudnn_benchmark``). These, and the
    :func:`~probe.training.numerics.environment`, are recorded in the config's ``resolved``; a
    resume on other software or another GPU warns (``warnings.warn``) naming what differs."""
    from probe.runtime.dist import setup
    from probe.store import RunStore

    config = config.validate()
    device = resolve_device(config.device)
    ddp = setup(device)
    store = store if store is not None else (RunStore() if ddp.main else None)
    device = ddp.device(device)
    resuming = run_id is not None
    threads = torch.get_num_threads()
    amp_dtype = choose_amp_dtype(config.amp_dtype, device) if config.amp else None
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
        if ddp.main:
            _warn_if_elsewhere(run_id, resolved, device, amp_dtype)
    if config.sync_bn and ddp.active and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices (torch's SyncBatchNorm is GPU-only); on CPU each rank "
                        "normalises its own part of the batch")
    try:
        with deterministic(config.deterministic), cudnn_benchmark(uses_cudnn_benchmark(device, config.deterministic)):
            return _train(config, store, device, ddp, run_id=run_id, on_epoch=on_epoch, progress=progress,
                          model_name=model_name or config.model, amp_dtype=amp_dtype)
    except RuntimeError as e:
        if config.deterministic and "use_deterministic_algorithms" in str(e):
            raise UserError(f"--deterministic: {first_line(e)[:300]} (train without --deterministic, or with "
                            "other layers)") from None
        raise
    finally:
        torch.set_num_threads(threads)


def _warn_if_elsewhere(run_id: str, resolved: dict, device: torch.device, amp_dtype: torch.dtype | None) -> None:
    """Warn when a resume runs on other software, another GPU or in another AMP dtype than the run
    recorded (a run older than the record: its torch version alone)."""
    stored = resolved.get("environment") or {k: resolved[k] for k in ("torch",) if k in resolved}
    changes = environment_changes(stored, environment(device))
    now = _dtype_name(amp_dtype)
    if "amp_dtype" in resolved and resolved["amp_dtype"] != now:
        changes.append(f"amp dtype {resolved['amp_dtype']} -> {now}")
    if changes:
        warnings.warn(f"run {run_id} was trained with other software or hardware than it resumes on "
                      f"({'; '.join(changes)}): the continued run may differ from an uninterrupted one",
                      RuntimeWarning, stacklevel=3)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _train(config: TrainConfig, store, device: torch.device, ddp, *, run_id: str | None,
           on_epoch: Callable[[dict], None] | None, progress: Progress | None, model_name: str,
           amp_dtype: torch.dtype | None) -> TrainResult:
    """The loop. Under ``torchrun`` (``ddp.active``) every rank draws the same seeded global
    batches and trains on its contiguous part of each (gradients averaged by DDP, the loss scaled
    so that the average is the global batch's mean), the epoch's counts are summed over the ranks,
    and rank 0 alone evaluates, logs and writes checkpoints (holding every rank's RNG states).
    A forced group of one (``PROBE_DIST_FORCE=1``) takes the same path through DDP and the
    collectives with the whole batch, the plain loss and the single process's random draws, so
    it trains the run a single process trains.
    ``amp_dtype``: the autocast dtype (None: no mixed precision)."""
    from probe.data import Augment, make_loader
    from probe.data.batches import to_device

    data = _load_data(config)
    torch.manual_seed(config.seed)  # model init
    model = build_model(model_name, num_classes=data.num_classes, in_chans=data.in_channels,
                        image_size=data.image_size[0], fusion=config.fusion,
                        model_kwargs=config.model_kwargs).to(device)
    weights = None
    if config.weights is not None and (run_id is None or ddp.broadcast(
            store.latest_checkpoint(run_id) is None if ddp.main else None)):  # a checkpoint replaces them
        weights = _start_weights(model, config, store if ddp.main else None, run_id)
    check_model(model, data.x_train[:2].to(device), data.num_classes, model_name)
    loader_gen = torch.Generator().manual_seed(config.seed + 1)
    mix_rng = np.random.Generator(np.random.PCG64(config.seed + 2))
    if ddp.active:
        if config.sync_bn:
            model = sync_batchnorm(model)
        if ddp.world > 1:   # each rank its own dropout masks (a forced world of one draws as one process)
            torch.manual_seed(config.seed + 7919 * (ddp.rank + 1))
    opt = _make_optimizer(model, config, lr_at(config, 0))
    use_amp = amp_dtype is not None
    scaler = make_scaler(device, enabled=amp_dtype == torch.float16)
    start_epoch, best_acc, best_epoch = 0, None, None
    if run_id is None:
        if ddp.main:
            cfg = config.to_dict()
            cfg["resolved"] = {"model": model.probe_config, "data": data.describe(), "device": str(device),
                               "torch": torch.__version__, "num_threads": torch.get_num_threads(),
                               "world_size": ddp.world, "amp_dtype": _dtype_name(amp_dtype),
                               "cudnn_benchmark": uses_cudnn_benchmark(device, config.deterministic),
                               "environment": environment(device)}
            if weights is not None:
                cfg["resolved"]["weights"] = {k: weights[k] for k in ("file", "sha256", "key")}
            run_id = store.new_run(config.model, config.data, cfg)
        run_id = ddp.broadcast(run_id)
    else:
        # Without a checkpoint the run restarts exactly as it began: the model was just built from
        # the same seed and the global RNG stands where a new run's would.
        last = ddp.broadcast(store.latest_checkpoint(run_id) if ddp.main else None)
        if last is not None:
            ckpt = ddp.broadcast(store.load_checkpoint(run_id, last) if ddp.main else None)
            start_epoch, best_acc, best_epoch = restore(ckpt, f"checkpoint epoch {last} of run {run_id}", model,
                                                         opt, loader_gen, mix_rng, device, ddp.rank, scaler)
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
                    perm = to_device(torch.randperm(xb.shape[0], generator=loader_gen), device)
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
                    ce = (partial(F.cross_entropy, label_smoothing=config.label_smoothing) if ddp.world == 1 else
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
                ranks = ddp.gather(rank_rng_state(device))
                if main:
                    rng.update(per_rank_states(ranks))
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
            ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                    "rng": rng, "best_acc": best_acc, "best_epoch": best_epoch,
                    "model_config": model.probe_config, "metrics": history, "train_time_s": train_time}
            if scaler.is_enabled():   # plain numbers: the loss scale and its growth counter
                ckpt["scaler"] = scaler.state_dict()
            store.save_checkpoint(run_id, epoch + 1, ckpt)
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


def _start_weights(model: nn.Module, config: TrainConfig, store, run_id: str | None) -> dict:
    """Load ``config.weights`` into a new run's model (or a run restarted without a checkpoint,
    whose file must still be the one recorded: same sha256)."""
    from probe.training.weights import load_weights

    info = load_weights(model, config.weights, config.weights_key)
    if run_id is not None and store is not None:
        recorded = ((store.get_run(run_id)["config"].get("resolved") or {}).get("weights") or {}).get("sha256")
        if recorded is not None and recorded != info["sha256"]:
            raise UserError(f"run {run_id} started from weights with sha256 {recorded[:12]}; {config.weights} now "
                            f"has sha256 {info['sha256'][:12]}: restore the original file to resume it")
    return info

