"""``digits``: scikit-learn's bundled 8x8 digits (1797 images, values 0..16 scaled to [0, 1]) with a
fixed stratified split, 25 % test, ``random_state=0`` (1347/450), normalised with the train split's
mean and std.  Reads no files."""
from __future__ import annotations

import numpy as np
import torch

from probe.data.registry import register_dataset
from probe.data.splits import DataSplits, normalise_, resize

__all__ = ["DIGITS_TEST_SIZE", "DIGITS_SPLIT_SEED", "load_digits"]

DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0


def load_digits(*, root, image_size, seed) -> DataSplits:
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    x = bunch.data.astype(np.float32).reshape(-1, 1, 8, 8) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    tr, te = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_SIZE, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    x_tr = resize(torch.from_numpy(x[tr]), image_size)
    x_te = resize(torch.from_numpy(x[te]), image_size)
    mean = (float(x_tr.mean()),)
    std = (float(x_tr.std(unbiased=False)),)
    return DataSplits(
        name="digits",
        x_train=normalise_(x_tr, mean, std), y_train=torch.from_numpy(y[tr]),
        x_test=normalise_(x_te, mean, std), y_test=torch.from_numpy(y[te]),
        num_classes=10, class_names=tuple(str(i) for i in range(10)), mean=mean, std=std,
        source=f"sklearn load_digits, stratified split test_size={DIGITS_TEST_SIZE} "
               f"random_state={DIGITS_SPLIT_SEED}",
    )


register_dataset("digits", load_digits, files="none")
