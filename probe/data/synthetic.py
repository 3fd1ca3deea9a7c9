"""``synthetic``: class prototypes (smooth random patterns) plus Gaussian noise, of any shape, drawn
from ``seed``; normalised with the train split's per-channel mean and std.  Reads no files."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from probe.data.registry import register_dataset
from probe.data.splits import DataSplits, normalise_
from probe.errors import UserError

__all__ = ["load_synthetic"]


def load_synthetic(
    *, root, image_size, seed, size=None, channels=3, num_classes=10, n_train=512, n_test=128,
    noise=1.0,
) -> DataSplits:
    """x = prototype[y] + noise * N(0, 1); prototypes are smooth random patterns of unit variance."""
    if image_size is None:
        image_size = 8 if size is None else size
    elif size is not None and size != image_size:
        raise UserError(f"synthetic: size={size} and image_size={image_size} disagree; give one")
    for label, v, lo in (("image_size", image_size, 1), ("channels", channels, 1),
                         ("num_classes", num_classes, 2), ("n_train", n_train, 1), ("n_test", n_test, 1)):
        if int(v) != v or v < lo:
            raise UserError(f"synthetic: {label} must be an integer >= {lo}, got {v!r}")
    if not noise >= 0:
        raise UserError(f"synthetic: noise must be >= 0, got {noise!r}")
    h = int(image_size)
    g = torch.Generator().manual_seed(int(seed))
    low = max(1, (h + 1) // 2)
    coarse = torch.randn(num_classes, channels, low, low, generator=g)
    protos = F.interpolate(coarse, size=(h, h), mode="bilinear", align_corners=False)
    protos = (protos - protos.mean()) / protos.std().clamp_min(1e-6)  # (K, C, H, W)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        x = protos[y] + float(noise) * torch.randn(n, channels, h, h, generator=g)
        return x, y

    x_tr, y_tr = draw(int(n_train))
    x_te, y_te = draw(int(n_test))
    mean = tuple(float(v) for v in x_tr.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in x_tr.std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6))
    return DataSplits(
        name="synthetic",
        x_train=normalise_(x_tr, mean, std), y_train=y_tr,
        x_test=normalise_(x_te, mean, std), y_test=y_te,
        num_classes=int(num_classes), class_names=tuple(str(i) for i in range(num_classes)),
        mean=mean, std=std,
        source=f"synthetic prototypes+noise seed={seed} noise={noise}",
    )


register_dataset("synthetic", load_synthetic, files="none",
                 options=("size", "channels", "num_classes", "n_train", "n_test", "noise"))
