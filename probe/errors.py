"""Errors a user can cause (bad names, missing files, bad options).

The CLI turns a :class:`UserError` into a one-line message on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message says what was wrong and what to do."""


class DataError(UserError):
    """A data set that is missing, truncated or malformed; the message names the expected layout."""


class StoreError(UserError):
    """A runs root or catalog that cannot be used (not writable, corrupt, wrong schema)."""


class DiskFullError(StoreError):
    """No space (or no inodes) left while writing to the runs root; what was stored before is intact."""
