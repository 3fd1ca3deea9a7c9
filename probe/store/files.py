"""The runs root as a boundary: every file of the store is reached through :class:`RootFiles`,
which keeps each path inside the real root, writes atomically and checks what it reads; and a
guarded reader of ``.npz`` files that may come from someone else.

Threat model: a runs root may come from someone else, so everything in it is data. File paths are
derived from ids, never taken from the catalog; every file is resolved before it is read or written
and must stay inside the real root (symlinks leading out are refused). Opening a store read-write
removes the temp files of writers that died (their lock is free).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import zipfile
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: temp files are not locked, none is swept
    fcntl = None

from probe.errors import DiskFullError, StoreError
from probe.store.atomic import NO_SPACE, atomic_write_bytes, disk_errors, no_space_message, temp_file
from probe.store.records import error_line, sha256_hex

__all__ = ["resolve_runs_root", "load_npz", "RootFiles", "RESERVE_NAME", "RESERVE_BYTES"]

#: A file of zeros kept in the root so that a run's status can be written on a full disk.
RESERVE_NAME = ".space-reserve"
RESERVE_BYTES = 512 * 1024


def resolve_runs_root(path: str | os.PathLike | None = None) -> Path:
    """The runs root: ``path`` if given, else ``$PROBE_RUNS`` if set and non-empty, else ``./runs``.

    Returns an absolute path (``~`` expanded); nothing is created.
    """
    chosen = path if path not in (None, "") else (os.environ.get("PROBE_RUNS") or "runs")
    return Path(chosen).expanduser().absolute()


def load_npz(data: bytes, path: Any) -> dict[str, Any]:
    """The arrays of an .npz file's bytes; any defect raises StoreError naming ``path``.

    Every member must be an .npy array whose header's shape and dtype fit the member's size, and
    no member may claim more bytes than deflate can produce from it: a hostile header cannot make
    us allocate a gigantic array.
    """
    import numpy as np
    from numpy.lib import format as npy

    headers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0,
               (3, 0): npy.read_array_header_2_0}  # 3.0 differs from 2.0 in the text encoding only
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                ratio = 1100 if info.compress_type != zipfile.ZIP_STORED else 1
                if info.file_size > ratio * info.compress_size + 1024:
                    raise ValueError(f"member {info.filename!r} claims {info.file_size} bytes "
                                     f"from {info.compress_size}")
                with zf.open(info) as f:
                    version = npy.read_magic(f)
                    if version not in headers:
                        raise ValueError(f"member {info.filename!r} has .npy version {version}")
                    shape, _, dtype = headers[version](f)
                    if math.prod(shape) * dtype.itemsize > info.file_size:
                        raise ValueError(f"member {info.filename!r} declares a {shape} {dtype} array "
                                         f"but holds {info.file_size} bytes")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as e:  # noqa: BLE001 - whatever the defect, the file is unusable
        raise StoreError(f"probe artifact {path} is corrupt ({error_line(e)}); run the probe again") from None


class RootFiles:
    """The files under one runs root (``self.root``, ``self.readonly``: set by the subclass that
    opens the root): paths checked to stay inside it, atomic writes, reads checked against the
    size and sha256 the catalog holds, the space reserve and the sweep of dead writers' temp files."""

    root: Path
    readonly: bool

    def _inside(self, rel: str) -> Path:
        """``root / rel`` after checking that, symlinks resolved, it stays inside the real root.

        Every file and folder of the store is reached through here before it is read or written.
        The root itself may be a symlink (the user's choice); anything below it that leads out is
        refused with a StoreError."""
        path = self.root / rel
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if os.path.commonpath([real, real_root]) != real_root:
            raise StoreError(f"{path} leads outside the runs root {self.root} (to {real}) through a "
                             "symlink; nothing was read or written there; replace the link by the "
                             "real file or folder")
        return path

    def _require_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"runs root {self.root} was opened read-only (readonly=True); nothing was "
                             "written; open it without readonly to train or probe")

    def _put(self, rel: str, data: bytes) -> Path:
        """Write ``root/rel`` atomically (parents created); disk errors become StoreError."""
        self._require_writable()
        path = self._inside(rel)
        with disk_errors(path):
            atomic_write_bytes(path, data)
        return path

    def _mkdir(self, rel: str, exist_ok: bool = True) -> Path:
        self._require_writable()
        path = self._inside(rel)
        with disk_errors(path):
            path.mkdir(exist_ok=exist_ok)
        return path

    def _get(self, rel: str, what: str, size: int | None = None, sha256: str | None = None,
             redo: str = "") -> bytes:
        """The bytes of ``root/rel``; with ``size`` / ``sha256`` (from the catalog) they must match."""
        path = self._inside(rel)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            listed = " although the catalog lists it" if size is not None else ""
            raise StoreError(f"{what} {path} is missing{listed}; {redo}".rstrip("; ")) from None
        except OSError as e:
            raise StoreError(f"{what} {path} cannot be read ({e.strerror or e})") from None
        if size is not None and (len(data) != size or sha256_hex(data) != sha256):
            raise StoreError(f"{what} {path} is corrupt or truncated ({len(data)} bytes, sha256 "
                             f"{sha256_hex(data)[:12]}..., catalog says {size} bytes, "
                             f"{sha256[:12]}...); {redo}")
        return data

    def _keep_reserve(self) -> None:
        """Keep ``.space-reserve`` (:data:`RESERVE_BYTES`) in the root, best effort: on a full disk
        :meth:`record_stop` gives it up so that the catalog can still say why a run stopped."""
        path = self.root / RESERVE_NAME
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and path.stat().st_size >= RESERVE_BYTES:
                return
            atomic_write_bytes(self._inside(RESERVE_NAME), bytes(RESERVE_BYTES))

    def _sweep(self) -> None:
        """Remove ``.*.tmp`` files of dead writers (their lock is free) in the root, ``probes/``,
        ``findings/``, ``runs/*/`` and ``runs/*/checkpoints/``; symlinked folders are not entered."""
        if fcntl is None:
            return
        folders, runs = [self.root, self.root / "probes", self.root / "findings"], self.root / "runs"
        with contextlib.suppress(OSError):
            if not runs.is_symlink():
                with os.scandir(runs) as entries:
                    for e in entries:
                        if e.is_dir(follow_symlinks=False):
                            folders += [Path(e.path), Path(e.path) / "checkpoints"]
        for folder in folders:
            if not folder.is_dir() or folder.is_symlink():
                continue
            with contextlib.suppress(OSError), os.scandir(folder) as entries:
                for e in entries:
                    if e.name.startswith(".") and e.name.endswith(".tmp") and \
                            e.is_file(follow_symlinks=False):
                        self._remove_if_dead(e.path)

    @staticmethod
    def _remove_if_dead(path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while the writer lives
            os.unlink(path)  # still locked: see temp_file
        except OSError:
            pass
        finally:
            os.close(fd)

    # ---- checking the root ---------------------------------------------------------------------

    def _check_root(self) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise StoreError(f"runs root {root} exists but is not a folder; pick another runs root")
        if self.readonly:
            return
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create runs root {root} ({e.strerror or e}); "
                             "pick a writable runs root") from None
        try:  # a real write: os.access is blind to read-only mounts and ACLs
            fd, probe = temp_file(root, "write-test")
            try:        # removed while locked: another process's sweep of stale files leaves it alone
                probe.unlink(missing_ok=True)
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno in NO_SPACE:
                raise DiskFullError(no_space_message(f"runs root {root}")) from None
            raise StoreError(f"runs root {root} is not writable (read-only: {e.strerror or e}); "
                             "reading it works with RunStore(root, readonly=True); pick a writable "
                             "runs root to train or probe") from None
