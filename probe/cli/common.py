"""Shared plumbing for the ``probe`` CLI: one-line errors, JSON output, progress bars, and the
flags several subcommands share (the runs root, user factories, model arguments, flags named
after dataclass fields)."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

from probe.companions import load
from probe.errors import UserError, first_line

__all__ = ["OneLineParser", "Output", "jsonable", "user_error_types", "run_command", "TqdmProgress", "runs_arg",
           "open_store", "factory_args", "parse_model_args", "flag_name", "field_type", "rank_group"]


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
    models = load("models")
    return (UserError, models.ModelNameError, models.ModelConfigError, models.FusionSpecError)


def _memory_errors() -> tuple[type[BaseException], ...]:
    """Running out of memory: the host's (``MemoryError``) and a device's (``torch.OutOfMemoryError``,
    a ``RuntimeError``; looked up only once torch is loaded, which it is wherever one can be raised)."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return (MemoryError,) if oom is None else (MemoryError, oom)


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
    except _memory_errors() as e:
        what = "" if isinstance(e, MemoryError) else f" ({first_line(e)[:200]})"
        print(f"{prog}: error: out of memory{what}; use smaller sizes (fewer samples, a smaller batch or memory "
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


class TqdmProgress:
    """The library's ``progress(desc, done, total)`` callback rendered as tqdm bars on stderr (one
    bar per description; silent with ``--quiet``)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bars: dict = {}

    def __call__(self, desc: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(desc)
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = self.bars[desc] = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            self.bars.pop(desc, None)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


@contextlib.contextmanager
def rank_group(device: str, quiet: bool, *, together: tuple[type[BaseException], ...] = ()):
    """A command's place among the ranks: under ``torchrun`` join the process group on ``device``
    (a single process otherwise) and yield ``(main, progress)``: whether this is rank 0 (which
    alone writes and reports) and its progress bars (silent on the other ranks or with ``quiet``).
    On the way out the bars close and the ranks leave the group: together after work that ended
    normally or with one of ``together`` (an error every rank raises at the same step), at once
    after any other error."""
    from probe.runtime.dist import launched, setup, teardown
    from probe.training import resolve_device

    ddp = setup(resolve_device(device)) if launched() else None
    main = ddp is None or ddp.main
    progress = TqdmProgress(quiet or not main)
    ended = False
    try:
        yield main, progress
        ended = True
    except together:
        ended = True
        raise
    finally:
        progress.close()
        if ddp is not None:
            teardown(wait=ended)


# --- shared flags ------------------------------------------------------------------------------


def runs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", metavar="DIR", default=None,
                   help="runs root (default: $PROBE_RUNS or ./runs)")


def open_store(args, readonly: bool = False):
    """The :class:`probe.store.RunStore` at ``--runs``."""
    from probe.store import RunStore
    return RunStore(args.runs, readonly=True) if readonly else RunStore(args.runs)


def factory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--factory", metavar="PKG.MODULE:FN", default=None,
                   help="for a run built by a user factory: the factory to rebuild it with (a name stored in "
                        "a runs folder is never imported)")
    p.add_argument("--trust-factory", action="store_true",
                   help="import the user factory named in the run's stored config (only for runs you trust)")


def parse_model_args(items: list[str] | None) -> dict:
    """``--model-arg KEY=VALUE`` items as keyword arguments (a value is JSON where it parses)."""
    out = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise UserError(f"--model-arg {item!r}: expected KEY=VALUE, e.g. --model-arg width=8")
        try:
            out[key] = json.loads(val)
        except ValueError:
            out[key] = val
    return out


def flag_name(field_name: str) -> str:
    """The flag of a dataclass field: ``batch_size`` is ``--batch-size``."""
    return "--" + field_name.replace("_", "-")


def field_type(cls: type, field_name: str) -> type:
    """The plain type of a dataclass field, for its flag's values (``int`` for ``int | None``)."""
    import typing

    hint = typing.get_type_hints(cls)[field_name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint
