"""The progress callback type through which the library reports long work."""
from __future__ import annotations

from typing import Callable

__all__ = ["Progress"]

#: ``progress(description, done, total)``: the library reports long work through this; the CLI
#: renders it with tqdm on stderr. ``None`` means silent.
Progress = Callable[[str, int, int], None]
