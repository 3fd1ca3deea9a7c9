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

__all__ = ["OneLineParser", "Output", "fail", "jsonable", "user_error_types", "run_command", "TqdmProgress", "runs_arg",
           "open_store", "close_stores", "factory_args", "parse_model_args", "flag_name", "field_type", "rank_group"]


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad usage on one line (exit 2) instead of usage + message."""

    #: whether the command line asked for ``--json`` (set by :func:`probe.cli.main` before parsing):
    #: a usage error is then also one JSON object on stdout
    json_errors = False

    def error(self, message: str):  # noqa: D401 (argparse API)
        line = f"{self.prog}: error: {message} (see `{self.prog} --help`)"
        if OneLineParser.json_errors:
            sys.stdout.write(json.dumps({"error": line, "exit_code": 2}) + "\n")
        self.exit(2, line + "\n")


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


def fail(args: argparse.Namespace | None, line: str, code: int = 2) -> int:
    """Report a command that failed: ``line`` on stderr and, with ``--json``, one JSON object
    ``{"error": line, "exit_code": code}`` on stdout (so a script reading stdout sees why)."""
    import os

    print(line, file=sys.stderr)
    if getattr(args, "json", False) and os.environ.get("RANK", "0") in ("0", ""):  # under torchrun: rank 0 alone
        sys.stdout.write(json.dumps({"error": line, "exit_code": code}) + "\n")
    return code


def run_command(func: Callable[[argparse.Namespace], "Output | None"], args: argparse.Namespace, prog: str) -> int:
    """Run one subcommand: its output on stdout; a user error, a full disk or running out of memory
    as one line on stderr with exit 2; Ctrl-C (or SIGTERM) as exit 130. Anything else is a bug and
    keeps its traceback. Python warnings are collected and shown one line each after a success."""
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            out = func(args)
    except user_error_types() as e:
        return fail(args, f"{prog}: error: {first_line(e)}")
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        return fail(args, f"{prog}: error: no space left on the device{where}; what was stored before is intact, "
                          "free some space and run the command again")
    except _memory_errors() as e:
        what = "" if isinstance(e, MemoryError) else f" ({first_line(e)[:200]})"
        return fail(args, f"{prog}: error: out of memory{what}; use smaller sizes (fewer samples, a smaller batch or "
                          "memory budget)")
    except KeyboardInterrupt:
        return fail(args, f"{prog}: interrupted", 130)
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
    """The library's ``progress(desc, done, total)`` callback on stderr (silent with ``--quiet``):
    tqdm bars (one per description) when stderr is a terminal; otherwise (a log file, CI,
    ``nohup``) plain lines, never a carriage return: ``desc: done/total (p%)`` each time the work
    passes another ``step_pct`` percent, once ``min_interval_s`` have gone by since the description's
    previous line (work shorter than that prints nothing; the callers' own lines, such as one per
    epoch, say what finished)."""

    def __init__(self, quiet: bool, *, tty: bool | None = None, step_pct: float = 10.0,
                 min_interval_s: float = 10.0, stream=None):
        self.quiet = quiet
        self.stream = stream
        self.tty = tty
        self.step_pct = float(step_pct)
        self.min_interval_s = float(min_interval_s)
        self.bars: dict = {}
        self.plain: dict = {}           # desc -> [total, last percent step printed, last time, start]

    def _out(self):
        return self.stream if self.stream is not None else sys.stderr

    def _is_tty(self) -> bool:
        if self.tty is not None:
            return self.tty
        try:
            return bool(self._out().isatty())
        except (AttributeError, ValueError):
            return False

    def __call__(self, desc: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if not self._is_tty():
            self._line(desc, done, total)
            return
        from tqdm import tqdm

        bar = self.bars.get(desc)
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = self.bars[desc] = tqdm(total=total, desc=desc, file=self._out(), leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            self.bars.pop(desc, None)

    def _line(self, desc: str, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        state = self.plain.get(desc)
        if state is None or state[0] != total:
            state = self.plain[desc] = [total, 0.0, now, now]
        pct = 100.0 * done / total if total else 100.0
        passed = self.step_pct * math.floor(pct / self.step_pct) if self.step_pct > 0 else pct
        if passed > state[1] and now - state[2] >= self.min_interval_s:
            state[1], state[2] = passed, now
            print(f"{desc}: {done}/{total} ({pct:.0f}%, {now - state[3]:.0f}s)", file=self._out(), flush=True)
        if total and done >= total:
            self.plain.pop(desc, None)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
        self.plain.clear()


@contextlib.contextmanager
def rank_group(device: str, quiet: bool, *, together: tuple[type[BaseException], ...] = ()):
    """A command's place among the ranks: under ``torchrun`` join the process group on ``device``
    (a single process otherwise) and yield ``(main, progress)``: whether this is rank 0 (which
    alone writes and reports) and its progress bars (silent on the other ranks or with ``quiet``).
    On the way out the bars close and the ranks leave the group: together after work that ended
    normally or with one of ``together`` (an error every rank raises at the same step), at once
    after any other error."""
    from probe.runtime.dist import joins, setup, teardown
    from probe.training import resolve_device

    ddp = setup(resolve_device(device)) if joins() else None
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


_OPENED: list = []          # the stores this command opened, closed when it ends (close_stores)


def open_store(args, readonly: bool = False):
    """The :class:`probe.store.RunStore` at ``--runs``, closed by :func:`close_stores` when the
    command ends (not whenever the garbage collector finds it: a late close could still write)."""
    from probe.store import RunStore
    store = RunStore(args.runs, readonly=True) if readonly else RunStore(args.runs)
    _OPENED.append(store)
    return store


def close_stores() -> None:
    """Close every store :func:`open_store` opened for this command."""
    while _OPENED:
        _OPENED.pop().close()


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
