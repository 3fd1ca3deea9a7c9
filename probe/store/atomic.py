"""Atomic file writes: a temp file in the same folder, held under an exclusive ``flock`` while it is
written (so a sweep can tell a dead writer's leftover from a live one's), fsync, ``os.replace``,
fsync of the folder. A reader sees the old file or the new one, never half of one; a full disk
(ENOSPC / EDQUOT) becomes :class:`~probe.errors.DiskFullError`."""
from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
from pathlib import Path
from typing import Any, Iterator, Mapping

from probe.errors import DiskFullError, StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - platforms without flock
    fcntl = None

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "atomic_savez", "atomic_file",
           "write_npz", "temp_file", "fsync_dir", "disk_errors", "no_space_message", "NO_SPACE"]

NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def no_space_message(what: Any) -> str:
    return (f"no space left on device writing {what}; nothing stored was lost, "
            "free space and resume / retry")


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """OSError while writing ``path`` -> StoreError (no space / cannot write); FileExistsError passes."""
    try:
        yield
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno in NO_SPACE:
            raise DiskFullError(no_space_message(path)) from None
        raise StoreError(f"cannot write {path} ({e.strerror or e}); check the disk and the "
                         "permissions of the runs root") from None


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_file(directory: Path, name: str) -> tuple[int, Path]:
    """Create ``directory/.<name>.<hex>.tmp`` exclusively and hold an exclusive ``flock`` on it.

    The lock tells the sweep of :class:`RunStore` that the writer is alive; it goes with the
    process. A sweep may take the lock in the instant between creating and locking, and then
    removes the file: so once locked, the file must still be there under its name, else another
    name is tried. Mode 0o666 so that the umask applies as for a plain ``open()``.
    """
    while True:
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        if fcntl is None:
            return fd, tmp
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[io.BufferedWriter]:
    """Yield a binary file; on clean exit it replaces ``path`` atomically, on error it vanishes."""
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(directory, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # still locked: the sweep never sees an unlocked live temp file
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    Parent folders are created. On any error the previous file, if any, is left untouched and no
    temporary file remains. Returns ``Path(path)``.
    """
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically; see :func:`atomic_write_bytes`.

    Keep ``obj`` to tensors and plain Python containers / numbers / strings, so that it loads with
    ``torch.load(..., weights_only=True)``.
    """
    import torch

    with atomic_file(path) as f:
        torch.save(obj, f)
    return Path(path)


def write_npz(f: Any, arrays: Mapping[str, Any]) -> None:
    """``numpy.savez_compressed`` of ``arrays`` into the open binary file ``f``; object arrays are
    refused (they would need pickle to load back)."""
    import numpy as np

    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in arrays.items():
        if v.dtype.hasobject:
            raise TypeError(f"array {k!r} has dtype object; store numbers or strings only")
    np.savez_compressed(f, **arrays)


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> Path:
    """``numpy.savez_compressed(path, **arrays)`` atomically; ``path`` is used exactly as given.

    Object arrays are refused (they would need pickle to load back).
    """
    buf = io.BytesIO()
    write_npz(buf, arrays)
    return atomic_write_bytes(path, buf.getvalue())
