"""torch.distributed for jobs started by ``torchrun``: the process group (gloo on CPU, NCCL on
CUDA), this process's rank, and the few collectives the library uses, each turning a lost peer
into one clear error instead of a hang.

A process started by ``torchrun`` has ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its
environment; :func:`setup` joins the group once (idempotent) and returns a :class:`Dist`. Outside
``torchrun`` (or with a world of one) every method is a no-op and the library runs as a single
process, so single-process code paths are untouched.

``PROBE_DIST_FORCE=1`` (or ``setup(force=True)``) joins a process group even for a world of one --
under ``torchrun --nproc-per-node 1`` through its environment, in a plain process through an
in-process store -- and the library then takes its distributed paths with that one rank (DDP
training, collectives, data shards), on NCCL for a CUDA device: a check of the distributed code on
a machine with one GPU. The numbers equal a single process's.

Every collective waits at most ``timeout`` (``PROBE_DIST_TIMEOUT`` seconds, default 300): a rank
that dies makes the others raise :class:`DistError` -- at once where the backend sees the closed
connection (gloo on one machine), after the timeout otherwise -- and ``torchrun`` ends the job.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from probe.errors import UserError, first_line
from probe.runtime.memory import out_of_memory

__all__ = ["COMM", "Dist", "DistError", "setup", "current", "local", "teardown", "launched", "joins", "forced",
           "FORCE_ENV", "DEFAULT_TIMEOUT_S", "collective_timeout_s"]

DEFAULT_TIMEOUT_S = 300.0

#: environment variable: ``1`` joins a process group also for a world of one (``0`` or unset: not)
FORCE_ENV = "PROBE_DIST_FORCE"

_FORCED = [False]   # this process joined a group of one by force (setup); cleared by teardown


#: time spent in (and waiting at) this process's collectives, for benchmarks: ``seconds``, ``calls``
COMM = {"seconds": 0.0, "calls": 0}


class DistError(UserError):
    """A collective failed: a peer rank stopped or did not answer within the timeout."""


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process in all."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def forced() -> bool:
    """Whether ``PROBE_DIST_FORCE`` asks for a process group even for a world of one."""
    raw = os.environ.get(FORCE_ENV, "").strip()
    if raw in ("", "0"):
        return False
    if raw == "1":
        return True
    raise UserError(f"{FORCE_ENV}={raw!r}: expected 1 (join a process group even for one process) or 0")


def joins() -> bool:
    """Whether :func:`setup` joins a process group: started by ``torchrun`` with more than one
    process, or forced (``PROBE_DIST_FORCE=1``)."""
    return launched() or forced()


def collective_timeout_s() -> float:
    """Seconds a collective waits (``PROBE_DIST_TIMEOUT``, default 300); a :class:`UserError` for a
    value that is not 1 to 86400 seconds."""
    raw = os.environ.get("PROBE_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"PROBE_DIST_TIMEOUT={raw!r}: expected seconds, e.g. 300") from None
    if not 1.0 <= value <= 86400.0:
        raise UserError(f"PROBE_DIST_TIMEOUT={raw!r}: expected 1 to 86400 seconds")
    return value


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` (``local_rank`` on its machine),
    ``backend`` (None outside a process group); ``forced``: a group joined by force, active even
    with a world of one."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    forced: bool = False

    @property
    def active(self) -> bool:
        """Whether the distributed paths are taken: more than one rank, or a group forced."""
        return self.world > 1 or (self.forced and self.backend is not None)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` under NCCL, ``device`` otherwise."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    # --- collectives: no-ops for a single process -----------------------------------------------

    def _call(self, what: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except torch.OutOfMemoryError as e:   # a RuntimeError too, but no peer's fault
            raise out_of_memory(e, f"the {what} on rank {self.rank} of {self.world}") from e
        except RuntimeError as e:   # DistBackendError and gloo's connection errors are RuntimeErrors
            detail = first_line(e)
            raise DistError(f"rank {self.rank} of {self.world}: {what} failed, a peer rank stopped or did not "
                            f"answer within {collective_timeout_s():.0f} s ({detail[:200]}); the job ends on every rank "
                            f"and resumes with --resume") from None
        finally:
            COMM["seconds"] += time.perf_counter() - t0
            COMM["calls"] += 1

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place."""
        if self.active:
            import torch.distributed as dist
            self._call("all-reduce", dist.all_reduce, tensor)
        return tensor

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (pickled between the job's own processes only)."""
        if not self.active:
            return obj
        import torch.distributed as dist
        box = [obj if self.rank == src else None]
        self._call("broadcast", dist.broadcast_object_list, box, src=src)
        return box[0]

    def gather(self, obj: Any) -> list | None:
        """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world if self.main else None
        self._call("gather", dist.gather_object, obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        self._call("all-gather", dist.all_gather_object, out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            self._call("barrier", dist.barrier)

    def sendrecv(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int):
        """Start sending ``send`` to rank ``dst`` and receiving ``recv`` (preallocated, filled in
        place) from rank ``src``; returns ``wait()``, which blocks until both are done and returns
        ``recv``. Work done before ``wait()`` overlaps the transfer."""
        if not self.active:
            raise UserError("sendrecv needs a process group of more than one rank")
        import torch.distributed as dist
        out = [send.contiguous()]         # held until the transfer is done
        works = self._call("send/receive", lambda: [dist.isend(out[0], dst), dist.irecv(recv, src)])

        def wait() -> torch.Tensor:
            self._call("send/receive", lambda: [w.wait() for w in works])
            out.clear()
            return recv
        return wait

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of ``range(n)`` (the first ``n % world`` ranks one longer)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


_LOCAL = [0]   # > 0 inside :func:`local`


@contextlib.contextmanager
def local():
    """Within this block :func:`current` is a single process: for work that one rank does alone
    while the others do other work (a sweep shared out by target)."""
    _LOCAL[0] += 1
    try:
        yield
    finally:
        _LOCAL[0] -= 1


def current() -> Dist:
    """The process group this process is in (a single process when none was set up, or inside
    :func:`local`)."""
    import torch.distributed as dist

    if _LOCAL[0] or not (dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend(),
                forced=_FORCED[0] or forced())


def setup(device: str | torch.device = "cpu", *, force: bool | None = None) -> Dist:
    """Join the process group ``torchrun`` described in the environment (NCCL for a CUDA device,
    gloo otherwise; the timeout from ``PROBE_DIST_TIMEOUT``); a single process when not launched
    by ``torchrun``. ``force`` (default: ``PROBE_DIST_FORCE``) joins a group also for a world of
    one: through ``torchrun``'s environment where it is set, else a group of this process alone
    (an in-process store). Idempotent."""
    import torch.distributed as dist

    force = forced() if force is None else bool(force)
    if dist.is_available() and dist.is_initialized():   # joined before (by this process's first setup)
        if force and dist.get_world_size() == 1:
            _FORCED[0] = True
        return current()
    if not (launched() or force):
        return Dist()
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run without torchrun")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    backend = "nccl" if device.type == "cuda" else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA devices; "
                            "start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=collective_timeout_s())
    try:
        if launched() or all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")):
            dist.init_process_group(backend, timeout=timeout)
        else:   # a world of one outside torchrun: nothing to rendezvous with
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    except torch.OutOfMemoryError as e:   # NCCL's buffers on a full GPU: not a process group that cannot form
        raise out_of_memory(e, f"joining the process group ({backend})") from e
    except (RuntimeError, ValueError) as e:
        raise DistError(f"could not join the process group ({backend}): {first_line(e)[:200]}") from None
    _FORCED[0] = force and dist.get_world_size() == 1
    return current()


def teardown(*, wait: bool = True) -> None:
    """Leave the process group (if any). ``wait`` (after work that ended normally): first wait
    until every rank has got here, so that no rank closes its connections while a peer still
    uses them (gloo aborts the peer on a closed connection). After an error the ranks leave at
    once: a peer may be stuck in another collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            try:
                dist.barrier()
            except RuntimeError:   # a peer already gone: nothing left to wait for
                pass
        dist.destroy_process_group()
    _FORCED[0] = False
