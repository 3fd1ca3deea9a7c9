"""Bounded reads of data files, so that a hostile or corrupt file cannot exhaust memory: a file read
whole only below a size cap (:func:`read_capped`), a stream read in chunks only as far as asked
(:func:`read_upto`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from probe.errors import DataError

__all__ = ["READ_CHUNK", "read_capped", "read_upto"]

READ_CHUNK = 2**20  # bytes per read where the length a file declares is not trusted


def _check_file_size(path: Path, size: int, limit: int, what: str, limit_name: str, expected: str) -> None:
    if size > limit:
        raise DataError(
            f"{path}: {size} bytes, above the {limit}-byte limit for {what} ({limit_name}); refused "
            f"without reading it. Expected {expected}"
        )


def read_capped(path: Path, limit: int, what: str, limit_name: str, expected: str) -> bytes:
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


def read_upto(f: Any, n: int) -> bytes:
    """At most ``n`` bytes from ``f``, read in chunks: memory grows with the data present, not with ``n``."""
    chunks, got = [], 0
    while got < n:
        chunk = f.read(min(READ_CHUNK, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
