"""The data set registry and :func:`load_data`, the one entry point that loads a data set by name.

A source module (one file under ``probe/data/``, imported by the package) registers each of its data
sets once, and code outside the package can add its own the same way::

    register_dataset("svhn", load_svhn, aliases=("svhn-cropped",), locate=locate_svhn)

which gives the name to :func:`load_data`, :func:`probe.data.data_roots` / :func:`probe.data.find_data`,
``probe.data.DATASETS`` and the help of ``probe train --data``.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from probe.data.splits import DataSplits, balanced_subset
from probe.errors import UserError

__all__ = ["Dataset", "Locate", "register_dataset", "unregister_dataset", "dataset_names", "get_dataset",
           "canonical_name", "dataset_help", "load_data", "split_source"]

#: ``locate(base) -> (the folder under base that holds a complete copy, or None; notes on partial copies)``
Locate = Callable[[Path], tuple[Path | None, list[str]]]

#: where a data set's files are looked for: ``root`` or the search path, ``root`` only, or nowhere
FILES = ("search", "root", "none")


def _root_itself(base: Path) -> tuple[Path | None, list[str]]:
    return (base if base.is_dir() else None), []


@dataclass(frozen=True)
class Dataset:
    """One registered data set; see :func:`register_dataset`."""

    name: str
    loader: Callable[..., DataSplits]
    aliases: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    files: str = "search"
    locate: Locate = _root_itself
    system_package: str | None = None


_DATASETS: dict[str, Dataset] = {}
_ALIASES: dict[str, str] = {}  # alias -> name


def _normal(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def register_dataset(
    name: str,
    loader: Callable[..., DataSplits],
    *,
    aliases: tuple[str, ...] = (),
    options: tuple[str, ...] = (),
    files: str = "search",
    locate: Locate | None = None,
    system_package: str | None = None,
) -> Dataset:
    """Register data set ``name`` (lower case, ``-`` not ``_``), loaded by
    ``loader(root=, image_size=, seed=, **options)`` into a :class:`DataSplits`.

    ``aliases``: other names :func:`load_data` accepts.  ``options``: the keyword options ``loader``
    takes beyond ``root``, ``image_size`` and ``seed``.  ``files``: ``"search"`` (``root`` when given,
    else the search path of :func:`probe.data.data_roots`), ``"root"`` (only a given ``root``) or
    ``"none"`` (reads no files).  ``locate(base)``: the folder under a searched folder ``base`` that
    holds a complete copy and notes on partial copies (default: ``base`` itself when it is a folder).
    ``system_package``: the Debian package that installs the data set under the system data folder,
    named when it is missing.  Names are listed in registration order.
    """
    key = _normal(name)
    if not key or key != name:
        raise ValueError(f"data set name {name!r}: give it lower case with '-', e.g. {key!r}")
    if not callable(loader):
        raise TypeError(f"data set {name!r}: loader must be callable")
    if files not in FILES:
        raise ValueError(f"data set {name!r}: files must be one of {', '.join(FILES)}, got {files!r}")
    normal_aliases = tuple(dict.fromkeys(_normal(a) for a in aliases))
    for n in (key, *normal_aliases):
        if n in _DATASETS or n in _ALIASES:
            raise ValueError(f"data set {name!r}: {n!r} is already registered")
    if key in normal_aliases:
        raise ValueError(f"data set {name!r}: an alias repeats its name")
    entry = Dataset(key, loader, normal_aliases, tuple(options), files, locate or _root_itself, system_package)
    _DATASETS[key] = entry
    _ALIASES.update((a, key) for a in normal_aliases)
    return entry


def unregister_dataset(name: str) -> None:
    """Remove data set ``name`` and its aliases (unknown names are ignored)."""
    entry = _DATASETS.pop(_normal(name), None)
    for alias in entry.aliases if entry is not None else ():
        _ALIASES.pop(alias, None)


def dataset_names() -> tuple[str, ...]:
    """The registered data set names, in registration order."""
    return tuple(_DATASETS)


def split_source(name: str) -> tuple[str, str | None]:
    """``"npz:FILE"``, a data set that reads one given file or folder (``files="root"``) with that
    file, as ``("npz", "FILE")``; any other name as ``(name, None)``."""
    if isinstance(name, str) and ":" in name:
        head, _, rest = name.partition(":")
        key = _ALIASES.get(_normal(head), _normal(head))
        if rest and key in _DATASETS and _DATASETS[key].files == "root":
            return head, rest
    return name, None


def canonical_name(name: str) -> str:
    """The registered name ``name`` means (any case, ``_`` or ``-``, or an alias; ``npz:FILE`` means
    ``npz``); a :class:`UserError` listing the known names, with close matches, when it means none."""
    key = _normal(split_source(name)[0])
    key = _ALIASES.get(key, key)
    if key not in _DATASETS:
        names = dataset_names()
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UserError(f"unknown data set {name!r}{hint} (known: {', '.join(names)})")
    return key


def get_dataset(name: str) -> Dataset:
    """The registered entry of data set ``name`` (see :func:`canonical_name`)."""
    return _DATASETS[canonical_name(name)]


def dataset_help() -> str:
    """The help of ``probe train --data``."""
    return f"data set: {', '.join(dataset_names())}; npz:FILE reads arrays x, y of one's own"


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
    """Load data set ``name`` (one of ``probe.data.DATASETS``) into memory.

    ``root``: the folder holding the data set's files, then the only one searched (default: the
    search path of :func:`probe.data.data_roots`); ignored by ``digits`` and ``synthetic``.
    ``image_size``: square output side; images are resized bilinearly (antialiased when shrinking)
    ignoring the aspect ratio; ``None`` keeps the native size (32 for ``imagefolder``, 64 for
    ``caltech101``, 8 for ``synthetic``).  ``seed`` only affects ``synthetic``.

    ``limit_train`` / ``limit_test`` keep a deterministic, class-balanced subset: the first samples of
    each class in file order, taken round-robin over classes (so class counts differ by at most one
    while every class has enough samples), returned in their original order.

    Options per data set (``**kwargs``):
    ``synthetic``: ``channels=3, num_classes=10, n_train=512, n_test=128, noise=1.0`` (``size`` is an
    alias of ``image_size``); ``cifar10``/``cifar100``: ``format="auto"|"binary"|"python"``;
    ``imagefolder``: ``channels=3`` (1 reads grey images), ``test_fraction=0.2, split_seed=42``;
    ``npz`` (``name`` ``"npz:FILE"``, or ``root`` the file): ``test_fraction=0.2, split_seed=42``.
    """
    name, path = split_source(name)
    if path is not None and root is None:  # npz:FILE; a given root replaces the file (it moved)
        root = path
    entry = get_dataset(name)
    key, options = entry.name, entry.options
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        accepted = ", ".join(options) if options else "none"
        raise UserError(f"data set {key!r} does not take option(s) {', '.join(unknown)}; accepted: {accepted}")
    if image_size is not None and (int(image_size) != image_size or image_size < 1):
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    for label, limit in (("limit_train", limit_train), ("limit_test", limit_test)):
        if limit is not None and (int(limit) != limit or limit < 1):
            raise UserError(f"{label} must be a positive integer, got {limit!r}")

    data: DataSplits = entry.loader(root=root, image_size=image_size, seed=seed, **kwargs)
    if limit_train is not None or limit_test is not None:
        tr = balanced_subset(data.y_train, limit_train)
        te = balanced_subset(data.y_test, limit_test)
        data = replace(
            data,
            x_train=data.x_train[tr], y_train=data.y_train[tr],
            x_test=data.x_test[te], y_test=data.y_test[te],
        )
    return data
