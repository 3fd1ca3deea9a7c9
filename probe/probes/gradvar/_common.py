"""Shared pieces of the gradient-variance probe: the loss, the parameters, BatchNorm modes and
the functional forward."""
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from probe import functional as _fn

from probe.checks import check_bool, check_choice, check_int, check_number
from probe.errors import UserError
from probe.probes.registry import Progress



#: ``loss(outputs (B, ...), targets (B, ...)) -> (B,)`` per-sample losses (a batch's loss is their mean).
LossFn = Callable[[Tensor, Tensor], Tensor]

_BN = nn.modules.batchnorm._BatchNorm
_BN_MODES = ("eval", "train")
_DTYPES = ("float32", "float64")


def cross_entropy_per_sample(out: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy of logits ``out`` (B, C) against labels ``y`` (B,): (B,)."""
    return F.cross_entropy(out, y, reduction="none")


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GradVarParams:
    """Options of the gradient-variance probe."""

    batches: int = field(default=8, metadata={
        "help": "number K of mini-batches (drawn without replacement; K * batch_size <= n); at least 2"})
    batch_size: int = field(default=32, metadata={"help": "mini-batch size B"})
    lr: float = field(default=0.1, metadata={
        "help": "learning rate for the relative update size |lr g| / |w| when the run does not give one"})
    per_sample: bool = field(default=True, metadata={
        "help": "also compute the per-sample gradient variance over all n samples (vmap)"})
    chunk: int = field(default=64, metadata={
        "help": "samples per vmap call for per-sample gradients (bounds memory to ~chunk x parameters)"})
    seeds: int = field(default=3, metadata={
        "help": "initialisations averaged for the signal-propagation depth curves"})
    signal: bool = field(default=True, metadata={
        "help": "compute the signal-propagation depth curves (activation variance, gradient norm per block)"})
    dtype: str = field(default="float32", metadata={"help": "compute dtype", "choices": _DTYPES})
    bn: str = field(default="eval", metadata={
        "help": "BatchNorm: eval = running statistics; train = batch statistics, running statistics not "
                "updated", "choices": _BN_MODES})

    def __post_init__(self):
        check_int("batches", self.batches, 2, 10 ** 6)
        check_int("batch_size", self.batch_size, 1, 10 ** 7)
        object.__setattr__(self, "lr", check_number("lr", self.lr, 0, math.inf, lo_open=True))
        check_bool("per_sample", self.per_sample)
        check_int("chunk", self.chunk, 1, 10 ** 7)
        check_int("seeds", self.seeds, 1, 1000)
        check_bool("signal", self.signal)
        check_choice("dtype", self.dtype, _DTYPES)
        check_choice("bn", self.bn, _BN_MODES)


# ------------------------------------------------------------------------------------------------
# Functional evaluation with a BatchNorm mode
# ------------------------------------------------------------------------------------------------

@contextmanager
def bn_mode(model: nn.Module, bn: str = "eval") -> Iterator[set[str]]:
    """Every module in eval mode for the duration; with ``bn="train"`` the BatchNorm modules use
    batch statistics and their running statistics are detached (set to None) so they are neither
    read nor updated. Yields the buffer names to leave out of a ``functional_call`` (the detached
    running statistics). Every flag and buffer is put back afterwards, also when the body raises.
    """
    check_choice("bn", bn, _BN_MODES)
    with _fn.eval_mode(model):
        if bn == "eval":
            yield set()
            return
        saved, skip = [], set()
        try:
            for name, m in model.named_modules():
                if isinstance(m, _BN):
                    saved.append((m, m.training, m.track_running_stats, m.running_mean, m.running_var))
                    prefix = f"{name}." if name else ""
                    skip.update({prefix + "running_mean", prefix + "running_var"})
                    m.training, m.track_running_stats = True, False
                    if m.running_mean is not None:
                        m.running_mean = None
                    if m.running_var is not None:
                        m.running_var = None
            yield skip
        finally:
            for m, training, track, mean, var in saved:
                m.training, m.track_running_stats = training, track
                if mean is not None:
                    m.running_mean = mean
                if var is not None:
                    m.running_var = var


class _Fwd:
    """``fwd(params, x)``: the model as a pure function (detached parameter/buffer copies)."""

    def __init__(self, model: nn.Module, dtype: str | torch.dtype | None, device, skip: set[str],
                 output: _fn.OutputSelector = None):
        self.fm = _fn.functionalize(model, dtype=dtype, device=device, output=output)
        self.model = model
        self.params = self.fm.params
        self.buffers = {k: v for k, v in self.fm.buffers.items() if k not in skip}

    def __call__(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(self.model, ({**self.fm.fixed, **params}, self.buffers), (x,))
        return _fn.select_output(out, self.fm.output)

    def prepare(self, t: Tensor) -> Tensor:
        return self.fm.prepare(t)


def _check_data(x, y, min_n: int = 1) -> tuple[Tensor, Tensor]:
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
        raise UserError(f"inputs and targets must have the same number of samples, got shapes "
                        f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < min_n:
        raise UserError(f"need at least {min_n} samples, got {x.shape[0]}")
    return x, y


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _progress(progress: Progress | None, desc: str, done: int, total: int) -> None:
    if progress is not None:
        progress(desc, done, total)


def _norm64(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach().to(torch.float64)))
