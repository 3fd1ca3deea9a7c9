"""Where a data set's files are: the folders searched, in order (:func:`data_roots`), the first that
holds a complete copy (:func:`find_data`), and the error that names them all when none does
(:func:`search_data`)."""
from __future__ import annotations

import os
from pathlib import Path

from probe.data.registry import Locate, canonical_name, get_dataset
from probe.errors import DataError

__all__ = ["SYSTEM_DATA", "data_roots", "find_data", "search_data"]

#: where packaged data sets live, one folder per data set; ``$PROBE_SYSTEM_DATA`` overrides it
SYSTEM_DATA = "/usr/share/datasets"


def data_roots(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for data set ``name``'s files, in order.

    ``root`` given: ``[root]`` alone.  Otherwise ``$PROBE_DATA`` (when set), ``./data`` and
    ``$PROBE_SYSTEM_DATA/<name>`` (default ``/usr/share/datasets/<name>``, where packaged data sets are
    installed).  Empty for the data sets that read no files (``digits``, ``synthetic``) and for
    ``imagefolder`` without ``root``.
    """
    entry = get_dataset(name)
    if entry.files == "none":
        return []
    if root is not None:
        return [Path(root).expanduser()]
    if entry.files == "root":
        return []
    roots = [Path(p).expanduser().absolute() for p in (os.environ.get("PROBE_DATA"), "data") if p]
    roots.append(Path(os.environ.get("PROBE_SYSTEM_DATA") or SYSTEM_DATA).expanduser().absolute() / entry.name)
    return list(dict.fromkeys(roots))


def find_data(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """The folder holding a complete copy of data set ``name``'s files, the first in :func:`data_roots`
    order, found without reading them; ``None`` when there is none or the data set reads no files."""
    entry = get_dataset(name)
    locate = entry.locate
    return next((f for f in (locate(base)[0] for base in data_roots(entry.name, root)) if f is not None), None)


def search_data(key: str, root: str | os.PathLike | None, locate: Locate, layout: str) -> Path:
    """The first folder ``locate`` finds over :func:`data_roots`; when none, a :class:`DataError` naming
    every folder searched, the expected ``layout`` and how to get the data set."""
    key = canonical_name(key)
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
    package = get_dataset(key).system_package
    if package:
        unless = " (searched only when no root is given)" if root is not None else ""
        get = (f"install it with `apt-get install {package}` (or `make data`), which puts it in "
               f"{Path(SYSTEM_DATA) / key}{unless}, or {get}")
    raise DataError(f"{key} not found {where}{detail}. Expected {layout}. To get it, {get}")
