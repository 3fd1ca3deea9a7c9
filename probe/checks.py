"""Checks of option values shared by the trainer, the runner and every probe's parameters: one
wording for every "must be" message (named after the option, never after a CLI flag)."""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from probe.errors import UserError

__all__ = ["check_int", "check_number", "check_bool", "check_choice"]


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` if it is an integer (not a bool) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise UserError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def check_number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False,
                 hi_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number (not a bool) in the interval
    ``[lo, hi]`` (either end open on request)."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi))
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise UserError(f"{name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value
