"""``npz``: a data set of one's own in one ``.npz`` file (``--data npz:FILE``), for data that is not
images as well as for images.

Arrays: ``x`` (N, ...) inputs and ``y`` (N,) integer class labels, and optionally ``x_test`` /
``y_test``; without them the samples are split stratified (``test_fraction=0.2``,
``split_seed=42``, as ``imagefolder``). Inputs are used as stored (cast to float32, not normalised:
mean 0 and std 1 are recorded); ``x`` of shape (N, H, W) becomes (N, 1, H, W), any other shape is
kept (an (N, D) table gives ``in_channels`` D). Labels must lie in [0, K) with K the number of
classes; ``class_names`` (K strings) may name them.

Read bounded, never unpickled: the file is refused above :data:`MAX_NPZ_BYTES`; every member is an
``.npy`` array whose header (shape, dtype) is checked against the member's size, and the member's
size against what deflate can produce from its compressed bytes, before anything is allocated;
object arrays are refused (``allow_pickle=False``).
"""
from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from probe.data.reading import read_capped
from probe.data.registry import register_dataset
from probe.data.splits import DataSplits, resize
from probe.errors import DataError, UserError

__all__ = ["MAX_NPZ_BYTES", "NPZ_LAYOUT", "load_npz_data", "read_npz"]

#: Largest .npz file read (8 GiB), and the most bytes its arrays may hold once decompressed.
MAX_NPZ_BYTES = 8 << 30

NPZ_LAYOUT = ("an .npz file (numpy.savez) with arrays x (N, ...) and y (N,) integer labels, optionally "
              "x_test and y_test, and class_names")

_MEMBERS = ("x", "y", "x_test", "y_test", "class_names")
_MAX_RATIO = 1100  # deflate produces at most ~1032 bytes per compressed byte


def read_npz(path: Path, limit: int = MAX_NPZ_BYTES) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, bounded (see the module docstring); a :class:`DataError` naming
    the file and the expected layout for anything else."""
    from numpy.lib import format as npy

    data = read_capped(path, limit, "an .npz data file", "probe.data.npz.MAX_NPZ_BYTES", NPZ_LAYOUT)
    headers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0,
               (3, 0): npy.read_array_header_2_0}
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            total = 0
            for info in zf.infolist():
                name = info.filename.removesuffix(".npy")
                if name not in _MEMBERS:
                    continue
                ratio = _MAX_RATIO if info.compress_type != zipfile.ZIP_STORED else 1
                if info.file_size > ratio * info.compress_size + 1024:
                    raise ValueError(f"member {name!r} claims {info.file_size} bytes from {info.compress_size}")
                total += info.file_size
                if total > limit:
                    raise ValueError(f"its arrays hold more than {limit} bytes")
                with zf.open(info) as f:
                    version = npy.read_magic(f)
                    if version not in headers:
                        raise ValueError(f"member {name!r} has .npy version {version}")
                    shape, fortran, dtype = headers[version](f)
                    if dtype.hasobject:
                        raise ValueError(f"member {name!r} holds Python objects (a pickle); refused")
                    if math.prod(shape) * dtype.itemsize > info.file_size:
                        raise ValueError(f"member {name!r} declares a {shape} {dtype} array but holds "
                                         f"{info.file_size} bytes")
                    arr = np.frombuffer(f.read(math.prod(shape) * dtype.itemsize), dtype=dtype)
                    out[name] = arr.reshape(shape, order="F" if fortran else "C")
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zipfile.LargeZipFile, RuntimeError) as e:
        raise DataError(f"{path}: not a readable .npz data file ({e}). Expected {NPZ_LAYOUT}") from None
    return out


def _inputs(arr: np.ndarray, what: str, path: Path) -> torch.Tensor:
    if arr.dtype.kind not in "biuf" or arr.ndim < 2:
        raise DataError(f"{path}: {what} must be a numeric array (N, ...) with one row per sample, got "
                        f"{arr.dtype} {arr.shape}. Expected {NPZ_LAYOUT}")
    x = torch.from_numpy(np.array(arr, dtype=np.float32))
    if not torch.isfinite(x).all():
        raise DataError(f"{path}: {what} holds NaN or infinite values")
    return x.unsqueeze(1) if x.ndim == 3 else x


def _labels(arr: np.ndarray, what: str, n: int, path: Path) -> torch.Tensor:
    if arr.dtype.kind not in "iub" or arr.ndim != 1 or arr.shape[0] != n:
        raise DataError(f"{path}: {what} must be {n} integer class labels (one per sample), got {arr.dtype} "
                        f"{arr.shape}. Expected {NPZ_LAYOUT}")
    y = torch.from_numpy(arr.astype(np.int64))
    if n and int(y.min()) < 0:
        raise DataError(f"{path}: {what} holds a negative label ({int(y.min())}); labels are 0 .. K-1")
    return y


def _split(labels: np.ndarray, test_fraction: float, split_seed: int, path: Path):
    from sklearn.model_selection import train_test_split

    try:
        tr, te = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels,
                                  random_state=split_seed)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: cannot make a stratified {test_fraction!r} test split ({e}); every class "
                        "needs at least 2 samples, or give x_test and y_test") from None
    return torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))


def load_npz_data(*, root, image_size, seed, test_fraction: float = 0.2, split_seed: int = 42) -> DataSplits:
    """The ``npz`` data set: the file ``root`` (``--data npz:FILE``); see the module docstring."""
    if root is None:
        raise UserError("data set 'npz' reads one file: give it as npz:FILE (e.g. --data npz:mydata.npz)")
    path = Path(root).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file. Expected {NPZ_LAYOUT}")
    arrays = read_npz(path)
    for need in ("x", "y"):
        if need not in arrays:
            raise DataError(f"{path}: no array {need!r} (found: {', '.join(sorted(arrays)) or 'none'}). "
                            f"Expected {NPZ_LAYOUT}")
    x = _inputs(arrays["x"], "x", path)
    y = _labels(arrays["y"], "y", x.shape[0], path)
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: x_test and y_test come together (found only one)")
    if "x_test" in arrays:
        x_te = _inputs(arrays["x_test"], "x_test", path)
        y_te = _labels(arrays["y_test"], "y_test", x_te.shape[0], path)
        if x_te.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_test samples {tuple(x_te.shape[1:])} differ from x samples "
                            f"{tuple(x.shape[1:])}")
        x_tr, y_tr, how = x, y, "its own x_test / y_test"
    else:
        tr, te = _split(y.numpy(), test_fraction, split_seed, path)
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
        how = f"stratified split test_fraction={test_fraction} split_seed={split_seed}"
    k = int(max(int(y_tr.max()) if len(y_tr) else 0, int(y_te.max()) if len(y_te) else 0)) + 1
    if len(y_tr) < 1 or len(y_te) < 1:
        raise DataError(f"{path}: needs at least one train and one test sample")
    names = tuple(str(i) for i in range(k))
    if "class_names" in arrays:
        given = arrays["class_names"]
        if given.dtype.kind not in "US" or given.shape != (k,):
            raise DataError(f"{path}: class_names must be {k} strings, got {given.dtype} {given.shape}")
        names = tuple(str(s) for s in given.tolist())
    if image_size is not None:
        if x_tr.ndim != 4:
            raise UserError(f"{path}: an image size applies to images (N, C, H, W); x is {tuple(x.shape)}")
        x_tr, x_te = resize(x_tr, image_size), resize(x_te, image_size)
    c = int(x_tr.shape[1])
    return DataSplits(name="npz", x_train=x_tr.contiguous(), y_train=y_tr, x_test=x_te.contiguous(), y_test=y_te,
                      num_classes=k, class_names=names, mean=(0.0,) * c, std=(1.0,) * c,
                      source=f"{path} (as stored, not normalised; {how})")


register_dataset("npz", load_npz_data, options=("test_fraction", "split_seed"), files="root")
