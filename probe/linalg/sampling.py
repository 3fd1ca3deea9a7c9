"""Random vectors for the stochastic estimators of :mod:`probe.linalg`, and their standard error.

On the CPU, vectors are drawn from a ``torch.Generator`` on the CPU in float64 and cast to the
operator's dtype. On a CUDA device they are drawn on the device itself, by a generator of that
device seeded with the same seed (:func:`vector_generator`), in the operator's dtype: a block of
probe vectors over millions of parameters is then neither drawn by the host nor copied over the
bus. The device's stream (Philox) is not the CPU's (Mersenne twister), so a stochastic estimate on
a GPU uses other vectors than the same call on the CPU: the same distribution, equal within the
estimate's standard error, not to rounding. Results on the CPU do not depend on this.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["random_vectors", "vector_generator", "draw_vectors", "standard_error"]


def vector_generator(seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """The generator of an estimator's vectors on ``device``: a CPU generator (any device but
    CUDA, where the vectors are drawn on the CPU and copied) or the CUDA device's own, seeded
    with ``seed``."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.Generator(device=device).manual_seed(int(seed))
    return torch.Generator().manual_seed(int(seed))


def random_vectors(size: int, c: int, gen: torch.Generator, dist: str) -> Tensor:
    """(size, c) float64 probe vectors on the generator's device: Rademacher (+-1) or standard
    Gaussian."""
    dev = gen.device
    if dist == "rademacher":
        return torch.randint(0, 2, (size, c), generator=gen, dtype=torch.int8, device=dev).to(torch.float64) * 2 - 1
    if dist == "gaussian":
        return torch.randn((size, c), generator=gen, dtype=torch.float64, device=dev)
    raise ValueError(f"unknown probe distribution {dist!r}; choose 'rademacher' or 'gaussian'")


def draw_vectors(shape: tuple[int, int], gen: torch.Generator, dist: str, *, dtype: torch.dtype,
                 device: torch.device, scale: float | None = None) -> Tensor:
    """A (rows, cols) array of random entries in ``dtype`` on ``device``, divided by ``scale``
    when given.

    With a CPU generator: drawn in float64 on the CPU (:func:`random_vectors`), scaled there, then
    cast and copied, exactly as the estimators always did. With a generator on ``device``: drawn
    there directly in ``dtype`` (Rademacher signs as int8, cast exactly)."""
    if gen.device.type == "cpu":
        v = random_vectors(shape[0], shape[1], gen, dist)
        if scale is not None:
            v = v / scale
        return v.to(device=device, dtype=dtype)
    if dist == "rademacher":
        v = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8, device=gen.device).to(dtype).mul_(2).sub_(1)
    elif dist == "gaussian":
        v = torch.randn(shape, generator=gen, dtype=dtype, device=gen.device)
    else:
        raise ValueError(f"unknown probe distribution {dist!r}; choose 'rademacher' or 'gaussian'")
    if scale is not None:
        v = v.div_(scale)
    return v.to(device=device)


def standard_error(vals: np.ndarray) -> float:
    """Sample standard deviation / sqrt(m); nan for a single sample."""
    return float(np.std(vals, ddof=1) / math.sqrt(vals.size)) if vals.size > 1 else float("nan")
