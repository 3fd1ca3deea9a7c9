"""How a run computes: the mixed-precision dtype and its loss scaler, deterministic algorithms or
cuDNN's kernel benchmarking for the run's duration, and the software and hardware a run was
trained on (recorded with the run, so that a resume elsewhere says what differs)."""
from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["AMP_DTYPES", "choose_amp_dtype", "make_scaler", "deterministic", "uses_cudnn_benchmark",
           "cudnn_benchmark", "environment", "environment_changes", "CUBLAS_DETERMINISTIC"]

#: What :attr:`TrainConfig.amp_dtype` may say.
AMP_DTYPES = ("auto", "bfloat16", "float16")

#: The cuBLAS workspace setting that makes its matrix products deterministic.
CUBLAS_DETERMINISTIC = ":4096:8"


def choose_amp_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of a run on ``device``: ``requested`` when it names one, else (``auto``)
    bfloat16 on a GPU that computes it natively (its range is float32's: activations cannot
    overflow, and it needs no loss scaler), float16 on other GPUs and bfloat16 on the CPU."""
    if requested == "bfloat16":
        return torch.bfloat16
    if requested == "float16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16


def make_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """The loss scaler of a run (float16 autocast needs one; disabled otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=enabled)


@contextlib.contextmanager
def deterministic(on: bool = True):
    """Within this block (when ``on``) torch uses deterministic algorithms only (an operation with
    none raises), cuDNN its deterministic kernels without benchmarking, and cuBLAS a fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG``, unless already set to a deterministic value; it must
    be set before the process's first cuBLAS call). Every setting is put back afterwards."""
    if not on:
        yield
        return
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if before[4] not in (":4096:8", ":16:8"):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]
        if before[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = before[4]


def uses_cudnn_benchmark(device: torch.device, deterministic: bool) -> bool:
    """Whether a run lets cuDNN benchmark its convolution kernels: on a CUDA device unless the run
    is deterministic (benchmarking picks kernels by timing them, which may pick others on the
    next run, and deterministic algorithms rule it out)."""
    return device.type == "cuda" and not deterministic


@contextlib.contextmanager
def cudnn_benchmark(on: bool):
    """Within this block (when ``on``) cuDNN times its convolution algorithms on the first call of
    each shape and keeps the fastest (``torch.backends.cudnn.benchmark``; a training run's batches
    all have the same shape but the last); put back afterwards."""
    if not on:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def environment(device: torch.device) -> dict:
    """What a run computes with: torch's version, cuDNN's and the GPU's name (both None on the CPU)."""
    cuda = device.type == "cuda"
    return {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "gpu": torch.cuda.get_device_name(device) if cuda else None}


def environment_changes(stored: dict, now: dict) -> list[str]:
    """``"torch 2.12.0 -> 2.13.0"`` for each entry of ``stored`` (a run's recorded
    :func:`environment`) that ``now`` has otherwise; nothing for a run that recorded none."""
    if not isinstance(stored, dict):
        return []
    return [f"{key} {stored[key]} -> {now.get(key)}" for key in ("torch", "cudnn", "gpu")
            if key in stored and stored[key] != now.get(key)]
