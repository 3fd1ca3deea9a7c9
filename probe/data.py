"""Data sets held in memory as tensors, and a small deterministic batch loader.

:func:`load_data` returns a :class:`DataSplits`: normalised float32 images ``(N, C, H, W)`` and int64
labels ``(N,)`` for a train and a test split.  Nothing is downloaded; real data sets are read from local
files, looked for in the folders :func:`data_roots` lists (:func:`find_data` says where a data set's files
are without reading them):

=================================  ============================================================================
folder, in search order            searched
=================================  ============================================================================
``root`` (``--data-root``)         when given, and then alone
``$PROBE_DATA``                    when set
``./data``                         always (relative to the working directory)
``$PROBE_SYSTEM_DATA/<name>``      always; data sets installed as system packages.  The base defaults to
                                   ``/usr/share/datasets``: Debian's ``dataset-fashion-mnist`` installs
                                   ``/usr/share/datasets/fashion-mnist``
=================================  ============================================================================

The first folder holding a complete copy wins.  ``imagefolder`` reads only ``root``; ``digits`` and
``synthetic`` read no files.

=================  ==========================================================================  ==========
name               source and split                                                            mean / std
=================  ==========================================================================  ==========
``digits``         scikit-learn's bundled 8x8 digits (1797 images, values 0..16 scaled to      train split
                   [0, 1]); fixed stratified split, 25 % test, ``random_state=0`` (1347/450)
``synthetic``      class prototypes (smooth random patterns) plus Gaussian noise; any shape    train split
``cifar10``        binary (``data_batch_{1..5}.bin``, ``test_batch.bin``) or python format     CIFAR-10
``cifar100``       binary (``train.bin``, ``test.bin``; fine labels) or python format          CIFAR-100
``mnist``          idx files, optionally ``.gz``                                               MNIST
``fashion-mnist``  idx files, optionally ``.gz``; Debian package ``dataset-fashion-mnist``     F-MNIST
``imagefolder``    ``root/{train,test}/<class>/<image>`` or ``root/<class>/<image>`` split     ImageNet
                   stratified (``test_fraction=0.2``, ``split_seed=42``)
``caltech101``     ``101_ObjectCategories`` without ``BACKGROUND_Google``, stratified 80/20    ImageNet
                   split with ``random_state=42``, resized to 64x64 ignoring the aspect ratio
=================  ==========================================================================  ==========

Splits of real data sets never depend on ``seed``; ``seed`` only drives ``synthetic``.  The CIFAR python
format is a pickle: it is read with an allow-list unpickler that refuses anything a CIFAR batch does not
need, without running it.  Every missing, truncated or malformed file raises :class:`DataError` with the
expected on-disk layout; a missing data set's error also names every folder searched and how to get it.  Reading is bounded, so that a hostile file cannot exhaust memory or time: file
sizes are capped (``MAX_CIFAR_BATCH_BYTES``, ``MAX_CIFAR_META_BYTES``), an idx header is checked before its
payload (``MAX_IDX_BYTES``) and a gzip stream is decompressed only as far as the header says, and a pickle
is refused (:mod:`probe._cifar_pickle`) past ``MAX_PICKLE_OPS`` opcodes, ``MAX_PICKLE_DEPTH`` levels of nesting or
``MAX_PICKLE_ELEMENTS`` elements (shared references counted each time they are reached).
"""
from __future__ import annotations

import difflib
import gzip
import math
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from probe._batches import Augment, Loader, make_loader  # noqa: F401  (re-exported)
from probe._cifar_pickle import load_cifar_pickle
from probe.errors import DataError, UserError

__all__ = ["DATASETS", "DataSplits", "Augment", "Loader", "data_roots", "find_data", "load_data", "make_loader"]

DATASETS = (
    "digits",
    "synthetic",
    "cifar10",
    "cifar100",
    "mnist",
    "fashion-mnist",
    "imagefolder",
    "caltech101",
)

# Per-channel statistics of the pixel values in [0, 1] (train splits of the respective data sets).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Grey images under ImageNet statistics: the average of the three channels.
IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD = (0.449,), (0.226,)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

#: where packaged data sets live, one folder per data set; ``$PROBE_SYSTEM_DATA`` overrides it
SYSTEM_DATA = "/usr/share/datasets"
#: the Debian package that installs a data set under :data:`SYSTEM_DATA`
SYSTEM_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}


# --------------------------------------------------------------------------------------------------
# Result type


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


# --------------------------------------------------------------------------------------------------
# Entry point


def load_data(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    **kwargs: Any,
) -> DataSplits:
    """Load data set ``name`` (one of :data:`DATASETS`) into memory.

    ``root``: the folder holding the data set's files, then the only one searched (default: the
    search path of :func:`data_roots`); ignored by ``digits`` and ``synthetic``.  ``image_size``: square
    output side; images are resized bilinearly (antialiased when shrinking) ignoring the aspect ratio;
    ``None`` keeps the native size (32 for ``imagefolder``, 64 for ``caltech101``, 8 for ``synthetic``).
    ``seed`` only affects ``synthetic``.

    ``limit_train`` / ``limit_test`` keep a deterministic, class-balanced subset: the first samples of
    each class in file order, taken round-robin over classes (so class counts differ by at most one
    while every class has enough samples), returned in their original order.

    Options per data set (``**kwargs``):
    ``synthetic``: ``channels=3, num_classes=10, n_train=512, n_test=128, noise=1.0`` (``size`` is an
    alias of ``image_size``); ``cifar10``/``cifar100``: ``format="auto"|"binary"|"python"``;
    ``imagefolder``: ``channels=3`` (1 reads grey images), ``test_fraction=0.2, split_seed=42``.
    """
    key = _canonical_name(name)
    loader, options = _LOADERS[key]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        accepted = ", ".join(options) if options else "none"
        raise UserError(f"data set {key!r} does not take option(s) {', '.join(unknown)}; accepted: {accepted}")
    if image_size is not None and (int(image_size) != image_size or image_size < 1):
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    for label, limit in (("limit_train", limit_train), ("limit_test", limit_test)):
        if limit is not None and (int(limit) != limit or limit < 1):
            raise UserError(f"{label} must be a positive integer, got {limit!r}")

    data: DataSplits = loader(root=root, image_size=image_size, seed=seed, **kwargs)
    if limit_train is not None or limit_test is not None:
        tr = _balanced_subset(data.y_train, limit_train)
        te = _balanced_subset(data.y_test, limit_test)
        data = replace(
            data,
            x_train=data.x_train[tr], y_train=data.y_train[tr],
            x_test=data.x_test[te], y_test=data.y_test[te],
        )
    return data


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    aliases = {"fashionmnist": "fashion-mnist", "caltech-101": "caltech101", "cifar-10": "cifar10",
               "cifar-100": "cifar100", "image-folder": "imagefolder"}
    key = aliases.get(key, key)
    if key not in DATASETS:
        close = difflib.get_close_matches(key, DATASETS, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UserError(f"unknown data set {name!r}{hint} (known: {', '.join(DATASETS)})")
    return key


def _balanced_subset(y: torch.Tensor, limit: int | None) -> torch.Tensor | slice:
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


# --------------------------------------------------------------------------------------------------
# Where the files are

# locate(base) -> (the folder under base that holds a complete copy, or None; notes on partial copies)
_Locate = Callable[[Path], tuple[Path | None, list[str]]]


def data_roots(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for data set ``name``'s files, in order.

    ``root`` given: ``[root]`` alone.  Otherwise ``$PROBE_DATA`` (when set), ``./data`` and
    ``$PROBE_SYSTEM_DATA/<name>`` (default ``/usr/share/datasets/<name>``, where packaged data sets are
    installed).  Empty for the data sets that read no files (``digits``, ``synthetic``) and for
    ``imagefolder`` without ``root``.
    """
    key = _canonical_name(name)
    if key in ("digits", "synthetic"):
        return []
    if root is not None:
        return [Path(root).expanduser()]
    if key == "imagefolder":
        return []
    roots = [Path(p).expanduser().absolute() for p in (os.environ.get("PROBE_DATA"), "data") if p]
    roots.append(Path(os.environ.get("PROBE_SYSTEM_DATA") or SYSTEM_DATA).expanduser().absolute() / key)
    return list(dict.fromkeys(roots))


def find_data(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """The folder holding a complete copy of data set ``name``'s files, the first in :func:`data_roots`
    order, found without reading them; ``None`` when there is none or the data set reads no files."""
    key = _canonical_name(name)
    locate = _locator(key)
    return next((f for f in (locate(base)[0] for base in data_roots(key, root)) if f is not None), None)


def _locator(key: str) -> _Locate:
    if key in _CIFAR:
        return lambda base: _locate_cifar(_CIFAR[key], base, "auto")
    if key in _IDX_SUBDIRS:
        return lambda base: _locate_idx(key, base)
    if key == "caltech101":
        from probe._imagefolder import locate_caltech101

        return locate_caltech101
    return lambda base: (base if base.is_dir() else None, [])  # imagefolder: root itself


def _search(key: str, root: str | os.PathLike | None, locate: _Locate, layout: str) -> Path:
    """The first folder ``locate`` finds over :func:`data_roots`; when none, a :class:`DataError` naming
    every folder searched, the expected ``layout`` and how to get the data set."""
    roots = data_roots(key, root)
    notes: list[str] = []
    for base in roots:
        folder, partial = locate(base)
        if folder is not None:
            return folder
        notes += partial
    detail = f" ({'; '.join(notes)})" if notes else ""
    if root is not None:
        where, there = f"under {roots[0]}", "that folder"
    else:
        where, there = f"in {', '.join(map(str, roots))}", "one of those folders"
    get = f"put the files under {there}"
    package = SYSTEM_PACKAGES.get(key)
    if package:
        unless = " (searched only when no root is given)" if root is not None else ""
        get = (f"install it with `apt-get install {package}` (or `make data`), which puts it in "
               f"{Path(SYSTEM_DATA) / key}{unless}, or {get}")
    raise DataError(f"{key} not found {where}{detail}. Expected {layout}. To get it, {get}")


def _normalise_u8(
    x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], size: int | None
) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 normalised, optionally resized to ``size x size``."""
    out = x.to(torch.float32).div_(255.0)
    out = _resize(out, size)
    return _normalise_(out, mean, std)


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or tuple(x.shape[-2:]) == (size, size) or x.shape[0] == 0:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _normalise_(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


# --------------------------------------------------------------------------------------------------
# digits and synthetic

DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0


def _load_digits(*, root, image_size, seed) -> DataSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.data.astype(np.float32).reshape(-1, 1, 8, 8) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    tr, te = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_SIZE, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    x_tr = _resize(torch.from_numpy(x[tr]), image_size)
    x_te = _resize(torch.from_numpy(x[te]), image_size)
    mean = (float(x_tr.mean()),)
    std = (float(x_tr.std(unbiased=False)),)
    return DataSplits(
        name="digits",
        x_train=_normalise_(x_tr, mean, std), y_train=torch.from_numpy(y[tr]),
        x_test=_normalise_(x_te, mean, std), y_test=torch.from_numpy(y[te]),
        num_classes=10, class_names=tuple(str(i) for i in range(10)), mean=mean, std=std,
        source=f"sklearn load_digits, stratified split test_size={DIGITS_TEST_SIZE} "
               f"random_state={DIGITS_SPLIT_SEED}",
    )


def _load_synthetic(
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
        x_train=_normalise_(x_tr, mean, std), y_train=y_tr,
        x_test=_normalise_(x_te, mean, std), y_test=y_te,
        num_classes=int(num_classes), class_names=tuple(str(i) for i in range(num_classes)),
        mean=mean, std=std,
        source=f"synthetic prototypes+noise seed={seed} noise={noise}",
    )


# --------------------------------------------------------------------------------------------------
# CIFAR

# Bounds on what the CIFAR readers accept, so that a hostile or corrupt file cannot exhaust memory or
# time.  Real files: a CIFAR-10 batch is ~31 MB (python) / 30.7 MB (binary), CIFAR-100 train ~155 MB /
# 153.7 MB, the meta files ~0.2-1.5 KB.  A Python 3 re-pickle of CIFAR-100 train at protocol 2 takes
# ~500k opcodes (~200k at protocol 5) and holds ~150k container elements two levels deep.
MAX_CIFAR_BATCH_BYTES = 2**28  # 256 MiB: one data batch file, binary or python
MAX_CIFAR_META_BYTES = 2**20  # 1 MiB: batches.meta, meta, batches.meta.txt, fine_label_names.txt


def _check_file_size(path: Path, size: int, limit: int, what: str, limit_name: str, expected: str) -> None:
    if size > limit:
        raise DataError(
            f"{path}: {size} bytes, above the {limit}-byte limit for {what} ({limit_name}); refused "
            f"without reading it. Expected {expected}"
        )


def _read_capped(path: Path, limit: int, what: str, limit_name: str, expected: str) -> bytes:
    """The file's bytes, refused (before reading) when larger than ``limit`` bytes.

    Exactly the size ``stat`` gives is read, so a file that grows meanwhile cannot make it read more.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            _check_file_size(path, size, limit, what, limit_name, expected)
            return f.read(size)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e}). Expected {expected}") from None


_READ_CHUNK = 2**20  # bytes per read where the length a file declares is not trusted


def _read_upto(f: Any, n: int) -> bytes:
    """At most ``n`` bytes from ``f``, read in chunks: memory grows with the data present, not with ``n``."""
    chunks, got = [], 0
    while got < n:
        chunk = f.read(min(_READ_CHUNK, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _safe_unpickle(path: Path, layout: str, *, meta: bool = False) -> Any:
    """Unpickle a CIFAR python batch (or meta file) within the size, opcode and tree budgets."""
    if meta:
        blob = _read_capped(path, MAX_CIFAR_META_BYTES, "a CIFAR meta file", "MAX_CIFAR_META_BYTES", layout)
    else:
        blob = _read_capped(path, MAX_CIFAR_BATCH_BYTES, "a CIFAR batch", "MAX_CIFAR_BATCH_BYTES", layout)
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
    folder = _search(spec.name, root, lambda base: _locate_cifar(spec, base, fmt), _cifar_layout(spec))
    formats = _cifar_formats(fmt)
    kind = next((k for k in formats if all((folder / n).is_file() for n in _cifar_needed(spec, k))), formats[-1])
    return kind, folder


def _read_cifar_binary(spec: _CifarSpec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    record = spec.label_bytes + 3072
    layout = _cifar_layout(spec)
    raw = np.frombuffer(_read_capped(path, MAX_CIFAR_BATCH_BYTES, "a CIFAR batch", "MAX_CIFAR_BATCH_BYTES", layout),
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
            text = _read_capped(
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


def _load_cifar(key: str, *, root, image_size, seed, format="auto") -> DataSplits:
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
        x_train=_normalise_u8(x_tr, spec.mean, spec.std, image_size), y_train=y_tr,
        x_test=_normalise_u8(x_te, spec.mean, spec.std, image_size), y_test=y_te,
        num_classes=spec.num_classes, class_names=_cifar_class_names(spec, kind, folder),
        mean=spec.mean, std=spec.std, source=f"{kind} format at {folder}",
    )


# --------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (idx)

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
    return _idx_files(_search(key, root, lambda base: _locate_idx(key, base), _idx_layout(key)))


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
            head = _read_upto(f, header)
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
                body = _read_upto(f, payload + 1)  # one byte more means longer than its header says
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


def _load_idx(key: str, *, root, image_size, seed) -> DataSplits:
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
        x_train=_normalise_u8(x_tr, mean, std, image_size), y_train=y_tr,
        x_test=_normalise_u8(x_te, mean, std, image_size), y_test=y_te,
        num_classes=10, class_names=names, mean=mean, std=std,
        source=f"idx files at {files['train_x'].parent}",
    )


def _load_imagefolder(**kw: Any) -> DataSplits:
    from probe._imagefolder import load_imagefolder

    return load_imagefolder(**kw)


def _load_caltech101(**kw: Any) -> DataSplits:
    from probe._imagefolder import load_caltech101

    return load_caltech101(**kw)


def _cifar_loader(key: str) -> Callable[..., DataSplits]:
    def load(**kw: Any) -> DataSplits:
        return _load_cifar(key, **kw)

    return load


def _idx_loader(key: str) -> Callable[..., DataSplits]:
    def load(**kw: Any) -> DataSplits:
        return _load_idx(key, **kw)

    return load


# name -> (loader, accepted keyword options)
_LOADERS: dict[str, tuple[Callable[..., DataSplits], tuple[str, ...]]] = {
    "digits": (_load_digits, ()),
    "synthetic": (_load_synthetic, ("size", "channels", "num_classes", "n_train", "n_test", "noise")),
    "cifar10": (_cifar_loader("cifar10"), ("format",)),
    "cifar100": (_cifar_loader("cifar100"), ("format",)),
    "mnist": (_idx_loader("mnist"), ()),
    "fashion-mnist": (_idx_loader("fashion-mnist"), ()),
    "imagefolder": (_load_imagefolder, ("channels", "test_fraction", "split_seed")),
    "caltech101": (_load_caltech101, ()),
}
