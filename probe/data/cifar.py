"""CIFAR-10 and CIFAR-100 (``cifar10``, ``cifar100``; fine labels), binary or python format.

Binary: ``data_batch_{1..5}.bin`` and ``test_batch.bin`` (CIFAR-10), ``train.bin`` and ``test.bin``
(CIFAR-100).  Python: the pickled batches, read with the allow-list unpickler of
:mod:`probe.data.cifar_pickle`.  Every file is read size-capped (``MAX_CIFAR_BATCH_BYTES``,
``MAX_CIFAR_META_BYTES``); images are normalised with the data set's own per-channel mean and std.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probe.data.cifar_pickle import load_cifar_pickle
from probe.data.reading import read_capped
from probe.data.registry import register_dataset
from probe.data.search import search_data
from probe.data.splits import DataSplits, normalise_u8
from probe.errors import DataError, UserError

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
           "MAX_CIFAR_BATCH_BYTES", "MAX_CIFAR_META_BYTES", "load_cifar"]

# Per-channel statistics of the pixel values in [0, 1] (train splits).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


# Bounds on what the CIFAR readers accept, so that a hostile or corrupt file cannot exhaust memory or
# time.  Real files: a CIFAR-10 batch is ~31 MB (python) / 30.7 MB (binary), CIFAR-100 train ~155 MB /
# 153.7 MB, the meta files ~0.2-1.5 KB.  A Python 3 re-pickle of CIFAR-100 train at protocol 2 takes
# ~500k opcodes (~200k at protocol 5) and holds ~150k container elements two levels deep.
MAX_CIFAR_BATCH_BYTES = 2**28  # 256 MiB: one data batch file, binary or python
MAX_CIFAR_META_BYTES = 2**20  # 1 MiB: batches.meta, meta, batches.meta.txt, fine_label_names.txt


def _safe_unpickle(path: Path, layout: str, *, meta: bool = False) -> Any:
    """Unpickle a CIFAR python batch (or meta file) within the size, opcode and tree budgets."""
    if meta:
        blob = read_capped(path, MAX_CIFAR_META_BYTES, "a CIFAR meta file", "MAX_CIFAR_META_BYTES", layout)
    else:
        blob = read_capped(path, MAX_CIFAR_BATCH_BYTES, "a CIFAR batch", "MAX_CIFAR_BATCH_BYTES", layout)
    return load_cifar_pickle(blob, path, layout)


def _dict_get(d: Any, key: str) -> Any:
    if not isinstance(d, dict):
        return None
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _decode_names(names: Any) -> tuple[str, ...] | None:
    """Class names from a meta file: a list of bytes or str; anything else means no names."""
    if not isinstance(names, (list, tuple)) or not all(type(n) in (bytes, str) for n in names):
        return None
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def _int_labels(labels: Any) -> np.ndarray | None:
    """int64 ``(N,)`` from a flat list of integers or a 1-d integer array; None for anything else."""
    if isinstance(labels, np.ndarray):
        return labels.astype(np.int64) if labels.ndim == 1 and labels.dtype.kind in "iu" else None
    if not isinstance(labels, (list, tuple)):
        return None
    if not all(type(v) is int or isinstance(v, np.integer) for v in labels):
        return None
    try:
        return np.array(labels, dtype=np.int64).reshape(len(labels))
    except (OverflowError, ValueError, TypeError):
        return None


@dataclass(frozen=True)
class _CifarSpec:
    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bin_dir: str
    bin_train: tuple[str, ...]
    bin_test: str
    bin_meta: str
    label_bytes: int  # cifar100 records start with (coarse, fine)
    py_dir: str
    py_train: tuple[str, ...]
    py_test: str
    py_meta: str
    py_label_key: str
    py_names_key: str


_CIFAR = {
    "cifar10": _CifarSpec(
        "cifar10", 10, CIFAR10_MEAN, CIFAR10_STD,
        "cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin",
        "batches.meta.txt", 1,
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
        "batches.meta", "labels", "label_names",
    ),
    "cifar100": _CifarSpec(
        "cifar100", 100, CIFAR100_MEAN, CIFAR100_STD,
        "cifar-100-binary", ("train.bin",), "test.bin", "fine_label_names.txt", 2,
        "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names",
    ),
}


def _cifar_layout(spec: _CifarSpec) -> str:
    def files(names: tuple[str, ...]) -> str:
        return "{" + ",".join(names) + "}"

    return (
        f"either the binary layout <root>/{spec.bin_dir}/{files(spec.bin_train + (spec.bin_test,))} "
        f"or the python layout <root>/{spec.py_dir}/{files(spec.py_train + (spec.py_test, spec.py_meta))} "
        f"(root may also be that folder itself)"
    )


def _cifar_needed(spec: _CifarSpec, kind: str) -> tuple[str, ...]:
    return spec.bin_train + (spec.bin_test,) if kind == "binary" else spec.py_train + (spec.py_test,)


def _cifar_formats(fmt: str) -> tuple[str, ...]:
    return ("binary", "python") if fmt == "auto" else (fmt,)


def _locate_cifar(spec: _CifarSpec, base: Path, fmt: str) -> tuple[Path | None, list[str]]:
    notes = []
    for kind in _cifar_formats(fmt):
        needed = _cifar_needed(spec, kind)
        for folder in (base / (spec.bin_dir if kind == "binary" else spec.py_dir), base):
            if folder.is_dir():
                absent = [n for n in needed if not (folder / n).is_file()]
                if not absent:
                    return folder, []
                if len(absent) < len(needed):  # a partial copy: say what is missing
                    notes.append(f"{folder} lacks {', '.join(absent)}")
    return None, notes


def _find_cifar(spec: _CifarSpec, root: str | os.PathLike | None, fmt: str) -> tuple[str, Path]:
    folder = search_data(spec.name, root, lambda base: _locate_cifar(spec, base, fmt), _cifar_layout(spec))
    formats = _cifar_formats(fmt)
    kind = next((k for k in formats if all((folder / n).is_file() for n in _cifar_needed(spec, k))), formats[-1])
    return kind, folder


def _read_cifar_binary(spec: _CifarSpec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    record = spec.label_bytes + 3072
    layout = _cifar_layout(spec)
    raw = np.frombuffer(read_capped(path, MAX_CIFAR_BATCH_BYTES, "a CIFAR batch", "MAX_CIFAR_BATCH_BYTES", layout),
                        dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        label = "1 label byte" if spec.label_bytes == 1 else "coarse and fine label bytes"
        raise DataError(
            f"{path}: {raw.size} bytes is not a positive multiple of the {record}-byte record "
            f"({label} + 3072 pixel bytes): truncated or not a {spec.name} binary batch"
        )
    rec = raw.reshape(-1, record)
    labels = rec[:, spec.label_bytes - 1].astype(np.int64)  # the fine label for cifar100
    images = rec[:, spec.label_bytes:].reshape(-1, 3, 32, 32)
    return images, labels


def _read_cifar_python(spec: _CifarSpec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    layout = _cifar_layout(spec)
    batch = _safe_unpickle(path, layout)
    data = _dict_get(batch, "data")
    labels = _dict_get(batch, spec.py_label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}".strip()
        raise DataError(
            f"{path}: expected a dict with b'data' a uint8 array (N, 3072), got {got}. Expected {layout}"
        )
    if data.shape[0] == 0:
        raise DataError(
            f"{path}: has 0 images (b'data' is 0 x 3072); a CIFAR batch holds at least one. Expected {layout}"
        )
    y = _int_labels(labels)
    if y is None or y.shape != (data.shape[0],):
        got = f"{len(y)} labels" if y is not None else f"{type(labels).__name__}, not a flat list of integers"
        raise DataError(
            f"{path}: expected b'{spec.py_label_key}' with one integer label per image ({data.shape[0]}), "
            f"got {got}. Expected {layout}"
        )
    return data.reshape(-1, 3, 32, 32), y


def _cifar_class_names(spec: _CifarSpec, kind: str, folder: Path) -> tuple[str, ...]:
    names = None
    if kind == "binary":
        meta = folder / spec.bin_meta
        if meta.is_file():
            text = read_capped(
                meta, MAX_CIFAR_META_BYTES, "a CIFAR meta file", "MAX_CIFAR_META_BYTES",
                f"one class name per line; {_cifar_layout(spec)}",
            ).decode("utf-8", "replace")
            names = tuple(ln for ln in (ln.strip() for ln in text.splitlines()) if ln)
    else:
        meta = folder / spec.py_meta
        if meta.is_file():
            batch = _safe_unpickle(meta, _cifar_layout(spec), meta=True)
            names = _decode_names(_dict_get(batch, spec.py_names_key))
    if names is None or len(names) != spec.num_classes:
        names = CIFAR10_CLASSES if spec.name == "cifar10" else tuple(str(i) for i in range(spec.num_classes))
    return names


def load_cifar(key: str, *, root, image_size, seed, format="auto") -> DataSplits:
    spec = _CIFAR[key]
    if format not in ("auto", "binary", "python"):
        raise UserError(f"{key}: format must be auto, binary or python, got {format!r}")
    kind, folder = _find_cifar(spec, root, format)
    read = _read_cifar_binary if kind == "binary" else _read_cifar_python
    train_files = spec.bin_train if kind == "binary" else spec.py_train
    test_file = spec.bin_test if kind == "binary" else spec.py_test

    def read_all(files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [read(spec, folder / f) for f in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        bad = (y < 0) | (y >= spec.num_classes)
        if bad.any():
            raise DataError(
                f"{folder}: label {int(y[bad][0])} outside [0, {spec.num_classes}); "
                f"not a {spec.name} batch. Expected {_cifar_layout(spec)}"
            )
        return torch.from_numpy(x), torch.from_numpy(y)

    x_tr, y_tr = read_all(train_files)
    x_te, y_te = read_all((test_file,))
    return DataSplits(
        name=key,
        x_train=normalise_u8(x_tr, spec.mean, spec.std, image_size), y_train=y_tr,
        x_test=normalise_u8(x_te, spec.mean, spec.std, image_size), y_test=y_te,
        num_classes=spec.num_classes, class_names=_cifar_class_names(spec, kind, folder),
        mean=spec.mean, std=spec.std, source=f"{kind} format at {folder}",
    )


register_dataset("cifar10", partial(load_cifar, "cifar10"), aliases=("cifar-10",), options=("format",),
                 locate=partial(_locate_cifar, _CIFAR["cifar10"], fmt="auto"))
register_dataset("cifar100", partial(load_cifar, "cifar100"), aliases=("cifar-100",), options=("format",),
                 locate=partial(_locate_cifar, _CIFAR["cifar100"], fmt="auto"))
