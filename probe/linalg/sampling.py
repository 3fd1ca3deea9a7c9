"""Random vectors for the stochastic estimators of :mod:`probe.linalg`, and their standard error.

Vectors are drawn from a ``torch.Generator`` on the CPU in float64 (the caller casts them to the
operator's dtype and device), so that results do not depend on the device's random stream.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["random_vectors", "standard_error"]


def random_vectors(size: int, c: int, gen: torch.Generator, dist: str) -> Tensor:
    """(size, c) float64 probe vectors on the CPU: Rademacher (+-1) or standard Gaussian."""
    if dist == "rademacher":
        return torch.randint(0, 2, (size, c), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    if dist == "gaussian":
        return torch.randn((size, c), generator=gen, dtype=torch.float64)
    raise ValueError(f"unknown probe distribution {dist!r}; choose 'rademacher' or 'gaussian'")


def standard_error(vals: np.ndarray) -> float:
    """Sample standard deviation / sqrt(m); nan for a single sample."""
    return float(np.std(vals, ddof=1) / math.sqrt(vals.size)) if vals.size > 1 else float("nan")
