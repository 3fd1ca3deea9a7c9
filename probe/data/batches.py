"""Training batches over in-memory tensors: the seeded epoch iterator and its augmentation
(exported by :mod:`probe.data`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from probe.errors import UserError

__all__ = ["Augment", "Loader", "make_loader", "to_device"]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor (random draws, indices) on ``device``: on a CUDA device copied from pinned
    memory without making the host wait for the copy (the caching host allocator keeps the
    pinned block until the copy is done); elsewhere ``t.to(device)`` (itself on the CPU)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class Augment:
    """Per-batch training augmentation on normalised tensors ``(B, C, H, W)``.

    ``crop_padding=p``: pad every side with ``p`` zeros (zero in normalised units, i.e. the data mean)
    and crop back to ``H x W`` at an offset drawn uniformly from ``{0..2p}^2`` per image.
    ``hflip``: mirror each image horizontally with probability 1/2.  Random draws come from the given
    ``torch.Generator`` (crop rows, crop columns, then flips), so a batch is reproducible from the
    generator state.  Use on the train split only.
    """

    crop_padding: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        if int(self.crop_padding) != self.crop_padding or self.crop_padding < 0:
            raise UserError(f"crop_padding must be a non-negative integer, got {self.crop_padding!r}")

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The augmented batch. The draws are made on the CPU (the generator's stream does not
        depend on where ``x`` is) and reach ``x``'s device in one copy (:func:`to_device`)."""
        b, _, h, w = x.shape
        p = int(self.crop_padding)
        draws = []
        if p > 0:
            draws.append(torch.randint(0, 2 * p + 1, (b,), generator=generator))   # crop rows
            draws.append(torch.randint(0, 2 * p + 1, (b,), generator=generator))   # crop columns
        if self.hflip:
            draws.append((torch.rand(b, generator=generator) < 0.5).long())
        if not draws:
            return x.contiguous()
        drawn = to_device(torch.stack(draws), x.device)                           # (draws, B)
        if p > 0:
            padded = F.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p)
            oy, ox = drawn[0], drawn[1]
            rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
            cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
            bi = torch.arange(b, device=x.device)[:, None, None]
            x = padded[bi, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)
        if self.hflip:
            flip = drawn[-1].bool()
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x.contiguous()


class Loader:
    """Batches ``(xb, yb)`` over in-memory tensors; see :func:`make_loader`."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool,
        generator: torch.Generator | None = None, augment: Augment | None = None, drop_last: bool = False,
    ):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.generator = generator
        self.augment = augment if augment is not None and augment.active else None
        self.drop_last = bool(drop_last)

    def __len__(self) -> int:
        n = int(self.x.shape[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The permutation is drawn here, when the epoch starts, not on the first next().
        # On a GPU the epoch's order is copied once, not a batch's indices per step.
        order = torch.randperm(int(self.x.shape[0]), generator=self.generator) if self.shuffle else None
        return self._batches(None if order is None else to_device(order, self.x.device))

    def _batches(self, order: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.batch_size
        for k in range(len(self)):
            if order is None:
                xb, yb = self.x[k * bs:(k + 1) * bs], self.y[k * bs:(k + 1) * bs]
            else:
                idx = order[k * bs:(k + 1) * bs]
                xb, yb = self.x[idx], self.y[idx.to(self.y.device)]
            if self.augment is not None:
                xb = self.augment(xb, self.generator)
            yield xb, yb


def make_loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool,
    generator: torch.Generator | None = None, augment: Augment | None = None, drop_last: bool = False,
) -> Loader:
    """An epoch iterator of ``(xb, yb)`` batches over tensors ``x (N, ...)`` and ``y (N,)``.

    With ``shuffle`` each ``iter()`` draws ``torch.randperm(N, generator=generator)``; augmentation
    draws from the same generator.  Saving ``generator.get_state()`` before an epoch and restoring it
    reproduces that epoch's batches exactly (the global RNG is used when ``generator`` is None).
    ``len(loader)`` is the number of batches; the last one is short unless ``drop_last``.
    """
    return Loader(x, y, batch_size, shuffle=shuffle, generator=generator, augment=augment, drop_last=drop_last)
