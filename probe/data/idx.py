"""MNIST and Fashion-MNIST (``mnist``, ``fashion-mnist``): the four idx files, each optionally ``.gz``.

An idx header is checked before its payload (``MAX_IDX_BYTES``) and a gzip stream is decompressed only as
far as the header says.  Debian's ``dataset-fashion-mnist`` installs Fashion-MNIST under
``/usr/share/datasets/fashion-mnist``; images are normalised with the data set's own mean and std.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import torch

from probe.data.reading import read_upto
from probe.data.registry import register_dataset
from probe.data.search import search_data
from probe.data.splits import DataSplits, normalise_u8
from probe.errors import DataError

__all__ = ["MNIST_MEAN", "MNIST_STD", "FASHION_MEAN", "FASHION_STD", "FASHION_CLASSES", "MAX_IDX_BYTES",
           "load_idx"]

# Per-channel statistics of the pixel values in [0, 1] (train splits).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# Largest payload an idx header may declare: 2 GiB (MNIST train images are 47 MB, EMNIST byclass
# 547 MB); the float32 copy the loader makes is four times as large.
MAX_IDX_BYTES = 2**31
_IDX_SUBDIRS = {"mnist": ("MNIST/raw", "mnist", "raw"), "fashion-mnist": ("FashionMNIST/raw", "fashion-mnist", "raw")}


def _idx_layout(key: str) -> str:
    names = ",".join(_IDX_FILES.values())
    return (
        f"<root>/{{{names}}} (each optionally .gz; <root> may also hold them under "
        f"{' or '.join(_IDX_SUBDIRS[key][:2])})"
    )


def _idx_files(folder: Path) -> dict[str, Path]:
    """role -> file for the idx files ``folder`` holds (all four roles when complete)."""
    found = {}
    for role, name in _IDX_FILES.items():
        dotted = name.replace("-idx", ".idx")  # some copies name them train-images.idx3-ubyte
        for cand in (name, name + ".gz", dotted, dotted + ".gz"):
            if (folder / cand).is_file():
                found[role] = folder / cand
                break
    return found


def _locate_idx(key: str, base: Path) -> tuple[Path | None, list[str]]:
    best: tuple[Path, dict[str, Path]] | None = None
    for folder in [base] + [base / s for s in _IDX_SUBDIRS[key]]:
        found = _idx_files(folder) if folder.is_dir() else {}
        if len(found) == len(_IDX_FILES):
            return folder, []
        if found and (best is None or len(found) > len(best[1])):
            best = folder, found
    if best is None:
        return None, []
    missing = [_IDX_FILES[r] for r in _IDX_FILES if r not in best[1]]
    return None, [f"{best[0]} lacks {', '.join(missing)}"]


def _find_idx(key: str, root: str | os.PathLike | None) -> dict[str, Path]:
    return _idx_files(search_data(key, root, lambda base: _locate_idx(key, base), _idx_layout(key)))


def _read_idx(path: Path, ndim: int, key: str) -> np.ndarray:
    """Read an unsigned-byte idx file with ``ndim`` dimensions (3 for images, 1 for labels).

    The header (4-byte magic ``0x0800 + ndim``, then one big-endian uint32 per dimension) is read and
    checked first, from the decompressed stream for ``.gz``.  The payload is then read only up to one
    byte past its declared size, in chunks, so neither a gzip bomb nor a header that declares more than
    the file holds can make memory grow beyond the data actually present; an uncompressed file's size
    is checked against its header before anything is read.
    """
    gz = path.suffix == ".gz"
    what = "decompressed " if gz else ""
    layout = _idx_layout(key)
    expected_magic = 0x0800 + ndim
    header = 4 + 4 * ndim
    noun = "images" if ndim == 3 else "labels"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = read_upto(f, header)
            if len(head) < 4:
                raise DataError(f"{path}: truncated: {len(head)} {what}bytes, too short for an idx header")
            magic = int.from_bytes(head[:4], "big")
            if magic != expected_magic:
                raise DataError(
                    f"{path}: bad magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                    f"(an idx{ndim} unsigned-byte file). Expected {layout}"
                )
            if len(head) < header:
                raise DataError(
                    f"{path}: truncated: {len(head)} {what}bytes, the idx{ndim} header alone is {header}"
                )
            dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
            shape = " x ".join(map(str, dims))
            if dims[0] == 0:
                raise DataError(
                    f"{path}: has 0 {noun}; its header says {shape}, an idx{ndim} {noun} file needs at "
                    f"least one. Expected {layout}"
                )
            if ndim == 3 and 0 in dims:
                raise DataError(
                    f"{path}: images of {dims[1]} x {dims[2]} pixels (header {shape}); expected at least "
                    f"1 x 1, 28 x 28 for {key}. Expected {layout}"
                )
            payload = math.prod(dims)
            if payload > MAX_IDX_BYTES:
                raise DataError(
                    f"{path}: header declares {shape} = {payload} bytes of {noun}, above the "
                    f"{MAX_IDX_BYTES}-byte limit for an idx file (MAX_IDX_BYTES); refused without reading "
                    f"it. Expected an idx{ndim} file of at most that size ({key} train: 60000 x 28 x 28 "
                    f"images) in {layout}"
                )
            expected = header + payload
            if gz:
                body = read_upto(f, payload + 1)  # one byte more means longer than its header says
                n = header + len(body)
            else:
                n = os.fstat(f.fileno()).st_size  # checked before reading: then the payload is there
                body = f.read(payload) if n == expected else b""
                if n == expected:
                    n = header + len(body)  # shorter only if the file shrank meanwhile
    except (OSError, gzip.BadGzipFile, EOFError, zlib.error, MemoryError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}). Expected {layout}") from None
    if n != expected:
        state = "truncated" if n < expected else "longer than its header says"
        found = f"at least {n}" if gz and n > expected else n  # the rest of a stream is never read
        raise DataError(
            f"{path}: {state}: expected {expected} {what}bytes ({header}-byte header + {shape}), found {found}"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)  # (N, H, W) or (N,)


def load_idx(key: str, *, root, image_size, seed) -> DataSplits:
    files = _find_idx(key, root)
    mean, std = (MNIST_MEAN, MNIST_STD) if key == "mnist" else (FASHION_MEAN, FASHION_STD)

    def split(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = _read_idx(files[prefix + "_x"], 3, key)
        y = _read_idx(files[prefix + "_y"], 1, key)
        if len(x) != len(y):
            raise DataError(
                f"{files[prefix + '_x']} has {len(x)} images but {files[prefix + '_y']} has {len(y)} labels"
            )
        if y.size and y.max() >= 10:
            raise DataError(f"{files[prefix + '_y']}: label {int(y.max())} outside [0, 10)")
        return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))

    x_tr, y_tr = split("train")
    x_te, y_te = split("test")
    if image_size is None and x_tr.shape[2:] != x_te.shape[2:]:
        raise DataError(
            f"{files['test_x']}: images of {x_te.shape[2]} x {x_te.shape[3]} pixels but {files['train_x']} "
            f"has {x_tr.shape[2]} x {x_tr.shape[3]}; both splits need one size (28 x 28 for {key}), or "
            f"give image_size to resize both"
        )
    names = tuple(str(i) for i in range(10)) if key == "mnist" else FASHION_CLASSES
    return DataSplits(
        name=key,
        x_train=normalise_u8(x_tr, mean, std, image_size), y_train=y_tr,
        x_test=normalise_u8(x_te, mean, std, image_size), y_test=y_te,
        num_classes=10, class_names=names, mean=mean, std=std,
        source=f"idx files at {files['train_x'].parent}",
    )


register_dataset("mnist", partial(load_idx, "mnist"), locate=partial(_locate_idx, "mnist"))
register_dataset("fashion-mnist", partial(load_idx, "fashion-mnist"), aliases=("fashionmnist",),
                 locate=partial(_locate_idx, "fashion-mnist"), system_package="dataset-fashion-mnist")
