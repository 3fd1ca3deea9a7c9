"""The result of every loader, :class:`DataSplits`, and the pixel helpers loaders share: the
class-balanced subset, conversion of uint8 images to normalised float32, resizing."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DataSplits", "balanced_subset", "normalise_u8", "normalise_", "resize"]


@dataclass(frozen=True, eq=False)
class DataSplits:
    """A train and a test split held in memory.

    ``x_*`` are float32 ``(N, C, H, W)`` already normalised with ``mean`` / ``std`` (per channel, on
    pixel values in [0, 1]: ``x = (pixel - mean[c]) / std[c]``); ``y_*`` are int64 ``(N,)`` in
    ``[0, num_classes)``.  ``source`` says which files / rule produced the data.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of images (N, C, H, W); (1, 1) for inputs of another shape (an (N, D) table)."""
        if self.x_train.ndim != 4:
            return 1, 1
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    def describe(self) -> dict:
        """A JSON-able summary (sizes, shapes, classes, normalisation, per-class counts)."""
        k = self.num_classes
        return {
            "name": self.name,
            "source": self.source,
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "in_channels": self.in_channels,
            "image_size": list(self.image_size),
            "num_classes": k,
            "class_names": list(self.class_names),
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "train_class_counts": torch.bincount(self.y_train, minlength=k).tolist(),
            "test_class_counts": torch.bincount(self.y_test, minlength=k).tolist(),
        }


def balanced_subset(y: torch.Tensor, limit: int | None) -> torch.Tensor | slice:
    """Indices of a deterministic, class-balanced subset of at most ``limit`` samples with labels ``y``:
    the first samples of each class in order, taken round-robin over classes, in their original order
    (``slice(None)``, all of them, when ``limit`` is None or not below ``len(y)``)."""
    n = int(y.shape[0])
    if limit is None or limit >= n:
        return slice(None)
    yn = y.numpy()
    order = np.argsort(yn, kind="stable")
    sorted_y = yn[order]
    first = np.searchsorted(sorted_y, sorted_y, side="left")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - first  # position of each sample within its class
    keep = np.sort(np.argsort(rank * n + np.arange(n), kind="stable")[:limit])
    return torch.from_numpy(keep)


def normalise_u8(
    x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], size: int | None
) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 normalised, optionally resized to ``size x size``."""
    out = x.to(torch.float32).div_(255.0)
    out = resize(out, size)
    return normalise_(out, mean, std)


def resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """``x`` resized bilinearly to ``size x size`` (antialiased when shrinking); unchanged for None."""
    if size is None or tuple(x.shape[-2:]) == (size, size) or x.shape[0] == 0:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def normalise_(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean[c]) / std[c]`` per channel, in place."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)
