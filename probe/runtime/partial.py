"""Partial results of a long probe: pieces saved as they finish, so that a killed probe resumes.

A probe whose work splits into independent pieces (the chunks of a loss-surface grid, ...) saves
each finished piece with :meth:`PartialResults.put` and, before computing a piece, asks
:meth:`PartialResults.get` whether an earlier, interrupted attempt of the *same* job already
did. The runner hands every probe one of these as ``ctx.partial`` and removes it once the final
result is in the catalog; a probe that never calls it leaves nothing behind.

Where: ``<runs root>/partial/<key>/<piece>.npz``, written atomically through the store (inside the
runs root, never through a symlink out of it), read back with the store's checked ``.npz``
reader (no pickle). ``key`` is a hash of everything that determines the result -- the probe, the
target (model name, run, checkpoint epoch and a sha256 of the model's state as probed), the
probe's parameters with the data, ``n`` and the seed, and the device -- so pieces of a different
job are never mixed in.

A piece that cannot be read (truncated by a crash mid-write of an older layout, corrupt, or not
an array file) is recomputed, and :attr:`PartialResults.notes` says which; a piece is never
half-used. Results are stored as given (float64 stays float64), so a resumed job equals an
uninterrupted one bit for bit when its pieces are computed deterministically.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
from typing import Any, Callable, Mapping

import numpy as np
import torch

from probe.errors import StoreError

__all__ = ["PartialResults", "partial_key", "model_fingerprint"]

_PIECE = re.compile(r"^[A-Za-z0-9_.-]{1,96}$")


def partial_key(spec: Mapping[str, Any]) -> str:
    """A stable 32-hex key of a job's description (JSON-able values; key order does not matter)."""
    text = json.dumps(spec, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def model_fingerprint(model) -> str:
    """sha256 over a module's state (parameter and buffer names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class PartialResults:
    """The saved pieces of one job (see the module docstring).

    ``store`` a :class:`probe.store.RunStore` (writable for :meth:`put`), ``key`` from
    :func:`partial_key`. Piece names are short identifiers (letters, digits, ``_ . -``).
    """

    def __init__(self, store, key: str | Callable[[], str]):
        self.store, self._key = store, key
        self.notes: list[str] = []
        self.resumed = 0                      # pieces found from an earlier attempt

    @property
    def key(self) -> str:
        """The job's key; a callable given for it is called once, on first use (the runner
        passes one, so that jobs that never save a piece never hash their model)."""
        if callable(self._key):
            self._key = self._key()
        if not isinstance(self._key, str) or not re.fullmatch(r"[0-9a-f]{8,64}", self._key):
            raise ValueError(f"partial-results key must be hex, got {self._key!r}")
        return self._key

    @property
    def rel(self) -> str:
        return f"partial/{self.key}"

    @staticmethod
    def _name(piece: str) -> str:
        if not isinstance(piece, str) or not _PIECE.match(piece) or piece.startswith("."):
            raise ValueError(f"bad piece name {piece!r}: letters, digits, '_', '.', '-' only")
        return piece

    def get(self, piece: str) -> dict[str, np.ndarray] | None:
        """The arrays saved for ``piece``, or None when it was not saved (or cannot be read: a
        note says so and the piece is to be recomputed)."""
        from probe.store.files import load_npz as _load_npz

        rel = f"{self.rel}/{self._name(piece)}.npz"
        try:
            path = self.store._inside(rel)
        except StoreError as e:
            self.notes.append(f"saved piece {piece} not used ({e})")
            return None
        if not path.is_file() or path.is_symlink():
            return None
        try:
            arrays = _load_npz(self.store._get(rel, "partial result"), path)
        except StoreError as e:
            self.notes.append(f"saved piece {piece} was unreadable and is recomputed ({e})")
            return None
        self.resumed += 1
        return arrays

    def put(self, piece: str, arrays: Mapping[str, Any]) -> None:
        """Save ``piece`` (name -> array) atomically; an earlier copy is replaced."""
        from probe.store.atomic import write_npz as _savez

        buf = io.BytesIO()
        _savez(buf, {k: np.asarray(v) for k, v in arrays.items()})
        self.store._put(f"{self.rel}/{self._name(piece)}.npz", buf.getvalue())

    def clear(self) -> None:
        """Remove every saved piece of this job (best effort: a leftover folder is harmless)."""
        if getattr(self.store, "readonly", False) or callable(self._key):
            return                                            # never used: nothing to remove
        with contextlib.suppress(OSError, StoreError):
            path = self.store._inside(self.rel)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
