"""Shared plumbing for the ``probe`` CLI: one-line errors, JSON output, tables."""
from __future__ import annotations

import argparse
import errno
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

from probe.errors import UserError, first_line


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad usage on one line (exit 2) instead of usage + message."""

    def error(self, message: str):  # noqa: D401 (argparse API)
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


@dataclass
class Output:
    """What a subcommand produces: a JSON-able object and the human-readable text."""

    data: dict
    text: str = ""


def jsonable(obj: Any) -> Any:
    """Convert numpy / torch scalars and arrays, paths, tuples and non-finite floats for JSON."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if np is not None and isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if np is not None and isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return jsonable(obj.item())
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's mistake: one line on stderr, exit 2."""
    from models import FusionSpecError, ModelConfigError, ModelNameError
    return (UserError, ModelNameError, ModelConfigError, FusionSpecError)


def run_command(func: Callable[[argparse.Namespace], "Output | None"], args: argparse.Namespace, prog: str) -> int:
    """Run one subcommand: its output on stdout; a user error, a full disk or running out of memory
    as one line on stderr with exit 2; Ctrl-C (or SIGTERM) as exit 130. Anything else is a bug and
    keeps its traceback. Python warnings are collected and shown one line each after a success."""
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            out = func(args)
    except user_error_types() as e:
        print(f"{prog}: error: {first_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"{prog}: error: no space left on the device{where}; what was stored before is intact, "
              "free some space and run the command again", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prog}: error: out of memory; use smaller sizes (fewer samples, a smaller batch or memory "
              "budget)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if out is None:  # a rank other than 0 of a distributed job: rank 0 reports
        return 0
    if not getattr(args, "quiet", False):  # library warnings, one line each (dropped on an error: it says why)
        for text in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught):
            print(f"{prog}: warning: {first_line(RuntimeError(text))}", file=sys.stderr)
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(jsonable(out.data), allow_nan=False) + "\n")
    elif out.text:
        print(out.text)
    return 0
