"""Errors a user can cause (bad names, missing files, bad options).

The CLI turns a :class:`UserError` into a one-line message on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations


__all__ = ["UserError", "DataError", "StoreError", "DiskFullError", "OutOfMemory", "first_line"]


class UserError(ValueError):
    """A mistake in the user's input; the message says what was wrong and what to do. A
    ``ValueError``, so library callers catch bad arguments the usual way."""


class DataError(UserError):
    """A data set that is missing, truncated or malformed; the message names the expected layout."""


class StoreError(UserError):
    """A runs root or catalog that cannot be used (not writable, corrupt, wrong schema)."""


class DiskFullError(StoreError):
    """No space (or no inodes) left while writing to the runs root; what was stored before is intact."""


class OutOfMemory(UserError):
    """A computation ran out of (GPU) memory: the message names the step and says to use smaller sizes.
    Raised in place of ``torch.OutOfMemoryError`` where that would otherwise be read as "this method
    does not work on this model"; the original error is its ``__cause__``."""


def first_line(e: BaseException, *, default: str | None = None) -> str:
    """The first line of an error's message; ``default`` (the error's type name when None) for
    an empty message."""
    text = str(e).strip()
    if text:
        return text.splitlines()[0]
    return type(e).__name__ if default is None else default
