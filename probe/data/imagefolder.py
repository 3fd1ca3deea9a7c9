"""Image-folder data sets, read with Pillow in threads and normalised with ImageNet statistics:
``imagefolder`` (``root/{train,test}/<class>/<image>``, or ``root/<class>/<image>`` split stratified
with ``test_fraction=0.2``, ``split_seed=42``; native size 32) and the ``caltech101`` preset
(``101_ObjectCategories`` without ``BACKGROUND_Google``, stratified 80/20 split with
``random_state=42``, resized to 64x64 ignoring the aspect ratio)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from probe.data.registry import register_dataset
from probe.data.search import search_data
from probe.data.splits import DataSplits, normalise_u8
from probe.errors import DataError, UserError

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGENET_GRAY_MEAN", "IMAGENET_GRAY_STD",
           "load_imagefolder", "load_caltech101", "locate_caltech101"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# Per-channel statistics of ImageNet's pixel values in [0, 1]; grey images: the average of the three channels.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD = (0.449,), (0.226,)


IMAGEFOLDER_LAYOUT = (
    "<root>/train/<class>/<image> and <root>/test/<class>/<image>, or <root>/<class>/<image> "
    f"(split automatically); images {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}"
)
CALTECH_LAYOUT = (
    "<root>/101_ObjectCategories/<class>/image_XXXX.jpg (root may also be the 101_ObjectCategories "
    "folder itself); the BACKGROUND_Google folder is ignored"
)


def _class_dirs(folder: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in exclude),
        key=lambda p: p.name,
    )


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir()
         if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.name,
    )


def _scan_tree(folder: Path, exclude: tuple[str, ...] = ()) -> tuple[list[str], list[Path], list[int]]:
    """Class-major listing: classes sorted by name, files sorted by name; empty class folders skipped."""
    classes, paths, labels = [], [], []
    d = folder
    try:
        for d in _class_dirs(folder, exclude):
            files = _image_files(d)
            if not files:
                continue
            labels.extend([len(classes)] * len(files))
            classes.append(d.name)
            paths.extend(files)
    except OSError as e:
        raise DataError(f"{d}: cannot list ({type(e).__name__}: {e})") from None
    return classes, paths, labels


def _read_image(path: Path, size: int, mode: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    return arr.reshape(size, size, -1)  # (H, W, C)


def _read_images(paths: list[Path], size: int, mode: str) -> torch.Tensor:
    """uint8 ``(N, C, size, size)``; decoding runs on a few threads (Pillow releases the GIL)."""
    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    workers = min(8, os.cpu_count() or 1)

    def one(i: int) -> None:
        out[i] = _read_image(paths[i], size, mode)

    if workers > 1 and len(paths) > 16:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(len(paths))))
    else:
        for i in range(len(paths)):
            one(i)
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def _stratified_split(labels: list[int], test_fraction: float, split_seed: int, where: Path):
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(
            np.arange(len(labels)), test_size=test_fraction, stratify=np.asarray(labels),
            random_state=split_seed,
        )
    except ValueError as e:
        raise DataError(
            f"{where}: cannot make a stratified {test_fraction:g} test split ({e}); every class needs "
            f"at least 2 images"
        ) from None


def _image_splits(
    name: str, folder: Path, *, presplit: bool, size: int, channels: int, test_fraction: float,
    split_seed: int, exclude: tuple[str, ...] = (), layout: str,
) -> DataSplits:
    if channels not in (1, 3):
        raise UserError(f"{name}: channels must be 1 or 3, got {channels!r}")
    if not 0 < test_fraction < 1:
        raise UserError(f"{name}: test_fraction must be in (0, 1), got {test_fraction!r}")
    mode = "L" if channels == 1 else "RGB"
    mean, std = (IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    if presplit:
        classes, tr_paths, tr_labels = _scan_tree(folder / "train", exclude)
        test_classes, te_paths, te_local = _scan_tree(folder / "test", exclude)
        if not classes:
            raise DataError(f"{folder / 'train'}: no class folders with images. Expected {layout}")
        extra = sorted(set(test_classes) - set(classes))
        if extra:
            raise DataError(f"{folder / 'test'}: classes {', '.join(extra)} have no training images")
        if not te_paths:
            raise DataError(
                f"{folder / 'test'}: no class folders with images, so the test split would be empty. "
                f"Expected {layout}"
            )
        index = {c: i for i, c in enumerate(classes)}
        te_labels = [index[test_classes[j]] for j in te_local]
        source = f"image folders {folder}/train and {folder}/test"
    else:
        classes, paths, labels = _scan_tree(folder, exclude)
        if not classes:
            raise DataError(f"{folder}: no class folders with images. Expected {layout}")
        tr, te = _stratified_split(labels, test_fraction, split_seed, folder)
        tr_paths, tr_labels = [paths[i] for i in tr], [labels[i] for i in tr]
        te_paths, te_labels = [paths[i] for i in te], [labels[i] for i in te]
        source = (f"image folder {folder}, stratified split test_fraction={test_fraction:g} "
                  f"random_state={split_seed}")
    if exclude:
        source += f", excluding {', '.join(exclude)}"
    return DataSplits(
        name=name,
        x_train=normalise_u8(_read_images(tr_paths, size, mode), mean, std, None),
        y_train=torch.tensor(tr_labels, dtype=torch.int64),
        x_test=normalise_u8(_read_images(te_paths, size, mode), mean, std, None),
        y_test=torch.tensor(te_labels, dtype=torch.int64),
        num_classes=len(classes), class_names=tuple(classes), mean=mean, std=std, source=source,
    )


def load_imagefolder(
    *, root, image_size, seed, channels=3, test_fraction=0.2, split_seed=42
) -> DataSplits:
    if root is None:
        raise DataError(f"imagefolder needs root=<folder>. Expected {IMAGEFOLDER_LAYOUT}")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DataError(f"imagefolder: {folder} is not a directory. Expected {IMAGEFOLDER_LAYOUT}")
    has_train, has_test = (folder / "train").is_dir(), (folder / "test").is_dir()
    if has_train != has_test:
        missing = "test" if has_train else "train"
        raise DataError(f"imagefolder: {folder} has no {missing}/ folder. Expected {IMAGEFOLDER_LAYOUT}")
    return _image_splits(
        "imagefolder", folder, presplit=has_train, size=image_size or 32, channels=channels,
        test_fraction=test_fraction, split_seed=split_seed, layout=IMAGEFOLDER_LAYOUT,
    )


CALTECH_EXCLUDE = ("BACKGROUND_Google",)


def locate_caltech101(base: Path) -> tuple[Path | None, list[str]]:
    """The ``101_ObjectCategories`` folder under ``base`` (or ``base`` itself), None when absent."""
    candidates = [base / "101_ObjectCategories", base / "caltech101" / "101_ObjectCategories"]
    if base.name == "101_ObjectCategories" or (base / CALTECH_EXCLUDE[0]).is_dir():
        candidates.insert(0, base)  # root is the categories folder itself
    return next((c for c in candidates if c.is_dir() and _class_dirs(c, CALTECH_EXCLUDE)), None), []


def load_caltech101(*, root, image_size, seed) -> DataSplits:
    folder = search_data("caltech101", root, locate_caltech101, CALTECH_LAYOUT)
    return _image_splits(
        "caltech101", folder, presplit=False, size=image_size or 64, channels=3, test_fraction=0.2,
        split_seed=42, exclude=CALTECH_EXCLUDE, layout=CALTECH_LAYOUT,
    )


register_dataset("imagefolder", load_imagefolder, aliases=("image-folder",),
                 options=("channels", "test_fraction", "split_seed"), files="root")
register_dataset("caltech101", load_caltech101, aliases=("caltech-101",), locate=locate_caltech101)
