"""What defines a training run: :class:`TrainConfig` (stored with the run), its presets, the
learning-rate schedules and the device names a config may give."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from probe.checks import check_bool, check_int, check_number
from probe.errors import UserError
from probe.training.numerics import AMP_DTYPES

__all__ = ["TrainConfig", "PRESETS", "MAX_EPOCHS", "MAX_BATCH", "MAX_LR", "MAX_SEED", "parse_schedule", "lr_at",
           "check_device", "resolve_device"]


def _opt(default: Any, text: str, *, flag: bool = True):
    """A field with its default and its help (``flag=False``: no command-line flag of its own)."""
    return field(default=default, metadata={"help": text} if flag else {"help": text, "flag": False})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (stored with the run as its config).

    Every field carries ``metadata={"help": ...}``; ``probe train`` makes a flag of each one
    (``batch_size`` is ``--batch-size``, a bool field a switch) unless its metadata says
    ``"flag": False``."""

    model: str = field(metadata={"help": "registered model name or package.module:factory"})
    data: str = _opt("digits", "data set name (see probe.data)")
    data_root: str | None = _opt(None, "folder with the data set's files (None: $PROBE_DATA, ./data, "
                                       "/usr/share/datasets/<name>)")
    fusion: str | None = _opt(None, "fusion spec, seed row id (fmm01..fmm59), add or mul (default: the model's own)")
    model_kwargs: dict = field(default_factory=dict, metadata={"help": "extra arguments of the model builder",
                                                               "flag": False})
    epochs: int = _opt(10, "number of epochs")
    batch_size: int = _opt(64, "training batch size")
    lr: float = _opt(0.1, "peak learning rate")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(False, "Nesterov momentum")
    weight_decay: float = _opt(5e-4, "SGD weight decay")
    schedule: str = _opt("cosine", "multistep:60,120,160:0.2 | step:30:0.1 | cosine | constant")
    label_smoothing: float = _opt(0.0, "label smoothing in [0, 1)")
    mixup: float = _opt(0.0, "mixup Beta(alpha, alpha); 0 is off")
    crop_padding: int = _opt(0, "random-crop padding in pixels (train split)")
    hflip: bool = _opt(False, "random horizontal flips (train split)")
    rebuild_optimizer_each_epoch: bool = _opt(False, "re-create SGD every epoch as the seed code did (resets momentum)")
    seed: int = _opt(0, "seed of init, data order, augmentation")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    amp: bool = _opt(False, "mixed precision (see --amp-dtype)")
    amp_dtype: str = _opt("auto", "with --amp: auto (bfloat16 on a GPU that computes it natively and on the CPU, "
                                  "float16 with loss scaling on other GPUs) | bfloat16 | float16")
    image_size: int | None = _opt(None, "square input side (default: the data set's own)")
    limit_train: int | None = _opt(None, "class-balanced subset of the train split (default: all)")
    limit_test: int | None = _opt(None, "class-balanced subset of the test split (default: all)")
    eval_batch_size: int = _opt(512, "evaluation batch size", flag=False)
    sync_bn: bool = _opt(False, "under torchrun, BatchNorm statistics over the global batch (SyncBatchNorm, CUDA "
                                "only; default: each rank normalises its own part)")
    weights: str | None = _opt(None, "start from the weights in this file instead of the seeded initialisation: a "
                                     "state_dict saved by torch.save (read weights-only), a checkpoint dict holding "
                                     "one, or a .safetensors file; its name and sha256 are recorded "
                                     "(default: none)")
    weights_key: str | None = _opt(None, "with weights: the checkpoint entry holding the state_dict (default: the "
                                         "file itself, else the first of state_dict, model, model_state_dict)")
    deterministic: bool = _opt(False, "deterministic algorithms only (torch, cuDNN and cuBLAS settings for the run; "
                                      "an operation without one stops the run): exact resumes on CUDA, slower")

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
        for name in ("data_root", "fusion", "weights", "weights_key"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise UserError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.model_kwargs, dict) or not all(isinstance(k, str) for k in self.model_kwargs):
            raise UserError(f"model_kwargs must be a mapping of argument names, got {self.model_kwargs!r}")
        for name in ("nesterov", "hflip", "rebuild_optimizer_each_epoch", "amp", "sync_bn", "deterministic"):
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
        if self.amp_dtype not in AMP_DTYPES:
            raise UserError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {self.amp_dtype!r}")
        if self.amp_dtype != "auto" and not self.amp:
            raise UserError(f"amp_dtype {self.amp_dtype} applies to mixed precision: add --amp (amp=True)")
        if self.weights_key is not None and self.weights is None:
            raise UserError("weights_key selects an entry of a weights file; give the file too (weights)")
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


# --- devices -----------------------------------------------------------------------------------


def check_device(device: str) -> str:
    """``device`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; raises :class:`UserError` otherwise."""
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
