"""What the benchmark scripts share: workers in fresh subprocesses (plain, or under a watchdog on
their resident set and wall time), their result line, peak memory, a baseline installed into a
folder of its own, the machine's settings and progress on stderr, and the device a script measures
on (``--device cpu|cuda|auto``, :func:`add_device_flag`) with the memory figure that goes with it:
the process's resident set on the CPU, the CUDA caching allocator's statistics on a GPU
(:func:`start_memory`, :func:`peak_memory_mib`; each worker is a fresh process, so its peak is its own).

A worker is the script itself run again with a worker flag: it prints ``READY <json>`` once its
set-up is done (optional; the watchdog then knows the measured part has begun) and its result as
the last ``RESULT <json>`` line (:func:`print_result`); the parent reads them back
(:func:`run_worker`, :func:`run_watched`). Baselines are installed with ``pip install --no-deps
--target <dir>`` (:func:`pip_install`) and put on the ``sys.path`` of the worker that uses them
only, never into the project's environment.
"""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["GIB", "MIB", "DEVICES", "log", "environment", "status_kib", "reset_peak", "peak_rss_mib", "rss_mib",
           "add_device_flag", "pick_device", "memory_unit", "sync", "start_memory", "peak_memory_mib",
           "print_ready", "print_result", "read_result", "script_command", "Finished", "run_worker",
           "Watched", "run_watched", "pip_install"]

GIB = 2 ** 30
MIB = 2 ** 20
READY = "READY "
RESULT = "RESULT "


def log(*parts: Any) -> None:
    """Progress on stderr (stdout carries the report, or the worker's result line)."""
    print(*parts, file=sys.stderr, flush=True)


def environment(**extra: Any) -> dict:
    """Threads, CPUs, torch version and the load average at the start, plus ``extra``."""
    import torch

    return {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_avg_start": os.getloadavg(), **extra}


# --- memory ----------------------------------------------------------------------------------------


def status_kib(field: str, pid: int | str = "self") -> int | None:
    """A ``kB`` field (VmRSS, VmHWM) of /proc/<pid>/status, KiB; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def reset_peak() -> None:
    """Reset this process's resident high-water mark: VmHWM := VmRSS (``5`` written to
    /proc/self/clear_refs). Raises OSError where the kernel does not offer it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (``getrusage`` ru_maxrss), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0      # Linux: KiB


def rss_mib() -> float:
    """This process's resident set size now (/proc/self/statm), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


DEVICES = ("cpu", "cuda", "auto")


def add_device_flag(parser, default: str = "cpu") -> None:
    """``--device {cpu,cuda,auto}`` on a benchmark's parser (``auto``: cuda when available)."""
    import argparse

    shown = "" if issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter) else \
        f" (default: {default})"                           # that formatter adds it itself
    parser.add_argument("--device", default=default, choices=DEVICES,
                        help=f"device of the measured computations: cpu, cuda or auto (cuda when available); "
                             f"on cuda memory is the CUDA allocator's peak{shown}")


def pick_device(name: str) -> str:
    """``cpu`` or ``cuda`` for a ``--device`` value; SystemExit with one line for cuda without a GPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this torch sees no CUDA device")
    return name


def memory_unit(device: str) -> str:
    """What a script's memory columns measure on ``device``."""
    return "CUDA allocated" if str(device).startswith("cuda") else "max RSS"


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): before reading a clock or a peak."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def start_memory(device) -> float:
    """Start measuring peak memory on ``device``; the baseline in MiB. On CUDA the allocator's peak
    counter starts again (:func:`probe.runtime.memory.reset_peak_allocated`, which the library's own
    meters leave intact) and the baseline is the bytes allocated now; on the CPU the resident
    high-water mark so far (``getrusage``: this process's own, a fresh worker's)."""
    if str(device).startswith("cuda"):
        import torch

        from probe.runtime.memory import reset_peak_allocated

        sync(device)
        reset_peak_allocated(device)
        return torch.cuda.memory_allocated(device) / MIB
    return peak_rss_mib()


def peak_memory_mib(device) -> float:
    """The peak in MiB since :func:`start_memory` on CUDA (allocator; includes the baseline), the
    resident high-water mark of this process on the CPU."""
    if str(device).startswith("cuda"):
        from probe.runtime.memory import peak_allocated

        sync(device)
        return peak_allocated(device) / MIB
    return peak_rss_mib()


# --- the result line -------------------------------------------------------------------------------


def print_ready(info: dict) -> None:
    """The worker's set-up is done (printed before the measured part)."""
    print(READY + json.dumps(info), flush=True)


def print_result(result: Any) -> None:
    """The worker's result, as its last line on stdout."""
    print(RESULT + json.dumps(result), flush=True)


def _tagged(lines: Iterable[str], tag: str, last: bool) -> Any:
    found = [ln for ln in lines if ln.startswith(tag)]
    if not found:
        return None
    return json.loads(found[-1 if last else 0][len(tag):])


def read_result(stdout: str | Sequence[str]) -> Any:
    """The last ``RESULT`` of a worker's stdout (text or lines); None when it printed none."""
    lines = stdout.splitlines() if isinstance(stdout, str) else stdout
    return _tagged(lines, RESULT, last=True)


def script_command(script: str | Path, *args: str) -> list[str]:
    """``python <script> args...`` with this interpreter."""
    return [sys.executable, str(Path(script).resolve()), *args]


# --- workers -----------------------------------------------------------------------------------------


@dataclass
class Finished:
    """A worker that ran to its end: exit code, its ``READY`` and ``RESULT`` (None when missing),
    its stderr."""

    returncode: int
    ready: Any
    result: Any
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.result is not None

    def tail(self, lines: int = 3, sep: str = "\n") -> str:
        """The last ``lines`` lines of its stderr."""
        return sep.join(self.stderr.strip().splitlines()[-lines:])


def run_worker(cmd: Sequence[str], *, env: dict | None = None, cwd: str | Path | None = None,
               timeout: float | None = None) -> Finished:
    """Run ``cmd`` to its end, capturing its output."""
    out = subprocess.run(list(cmd), capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    lines = out.stdout.splitlines()
    return Finished(out.returncode, _tagged(lines, READY, last=False), read_result(lines), out.stderr)


@dataclass
class Watched(Finished):
    """A worker run under the watchdog: ``stopped`` says why the watchdog killed it (``killed
    above X GiB`` / ``timeout after T s``; None when it ended by itself), ``wall_s`` the seconds it
    ran, ``seen_kib`` the largest VmRSS / VmHWM the watchdog read."""

    stopped: str | None = None
    wall_s: float = 0.0
    seen_kib: int = 0

    @property
    def killed(self) -> bool:
        return self.stopped is not None and self.stopped.startswith("killed")

    def row(self, case: dict, *, message_chars: int | None = None) -> dict:
        """The result row of ``case``: its fields, the worker's READY fields, then either its
        RESULT or a ``status`` (killed / timeout / error) with a ``message`` (at most
        ``message_chars`` of the output's tail for an error), its wall time and peak RSS."""
        row = dict(case)
        if self.ready:
            row.update(self.ready)
        if self.stopped:
            row.update(status="killed" if self.killed else "timeout", message=self.stopped, wall_s=self.wall_s,
                       rss_peak_kib=self.seen_kib)
        elif not self.ok:
            tail = self.tail(3, " | ")
            row.update(status="error", message=f"exit {self.returncode}: {tail[-message_chars:] if message_chars else tail}",
                       rss_peak_kib=self.seen_kib, wall_s=self.wall_s)
        else:
            row.update(self.result)
        return row


def run_watched(cmd: Sequence[str], *, cap_gib: float, timeout_s: float,
                peak_after_ready: bool = False) -> Watched:
    """Run ``cmd`` under a watchdog that reads its VmRSS and VmHWM every 0.2 s and kills it
    (SIGKILL) above ``cap_gib`` of resident memory or after ``timeout_s`` seconds.
    ``peak_after_ready``: ``seen_kib`` counts from the worker's first line on (its ``READY``,
    printed after it reset its high-water mark) instead of from its start."""
    cap_kib = int(cap_gib * GIB / 1024)
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=err, text=True)
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        pid, t0, seen_kib, why, measuring = str(proc.pid), time.monotonic(), 0, None, False
        while proc.poll() is None:
            if peak_after_ready and not measuring and lines:
                measuring, seen_kib = True, 0
            rss, hwm = status_kib("VmRSS", pid), status_kib("VmHWM", pid)
            seen_kib = max(seen_kib, rss or 0, hwm or 0)
            if rss is not None and rss > cap_kib:
                why = f"killed above {cap_gib:g} GiB"
            elif time.monotonic() - t0 > timeout_s:
                why = f"timeout after {timeout_s:g} s"
            if why:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
        reader.join(timeout=5)
        err.seek(0)
        stderr = err.read()
    return Watched(proc.returncode, _tagged(lines, READY, last=False), read_result(lines), stderr,
                   stopped=why, wall_s=time.monotonic() - t0, seen_kib=seen_kib)


# --- baselines ---------------------------------------------------------------------------------------


def pip_install(packages: Sequence[str], where: str | Path, *, timeout: float | None = None) -> str | None:
    """``pip install --no-deps --target where packages``: None on success, else why it failed
    (the error, or the last two lines of pip's stderr)."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
           "--target", str(where), *packages]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if out.returncode != 0:
        return " ".join(out.stderr.strip().splitlines()[-2:]) or f"exit {out.returncode}"
    return None
