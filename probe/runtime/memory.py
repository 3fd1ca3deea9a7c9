"""Measured working sets: the peak bytes of the tensors a piece of code allocates.

Planners estimate memory from formulas; :class:`MemoryMeter` measures what a small trial run of
the same code really holds at its peak, so that the estimate can be calibrated before the large
run (the ratio measured / estimated scales the plan). On CUDA it reads the allocator's peak
statistics; elsewhere it follows every tensor created inside it (a ``TorchDispatchMode``: each
operator's outputs are counted by storage until the storage is freed; views and in-place
results share an input's storage and add nothing), which sees the tensors of
autograd's backward pass and of ``torch.func`` transforms too. Tensors that existed before the
meter started are not counted.

    >>> with MemoryMeter(device) as meter:
    ...     run_small_block()
    >>> meter.peak_bytes

:func:`memory_budget` gives the probes that plan by a memory budget theirs: a fixed default on the
CPU, a fraction of the free memory on CUDA, and a requested budget checked against it.
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from probe.errors import OutOfMemory, UserError, first_line

__all__ = ["BUDGET_CAP_BYTES", "DEFAULT_BUDGET_BYTES", "FREE_FRACTION", "MemoryMeter", "device_memory",
           "memory_budget", "out_of_memory", "peak_allocated", "reset_peak_allocated"]


class _StorageTracker(TorchDispatchMode):
    """Live bytes of the storages created by operators while the mode is active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # otherwise torch wraps __torch_dispatch__ in dynamo.disable, whose first call imports
        # torch._dynamo (2-9 s of CPU time in every process); nothing is compiled under the meter
        return False

    def _collect(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                try:
                    inputs.add(t.untyped_storage().data_ptr())
                except (RuntimeError, NotImplementedError):
                    pass
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                try:
                    st = t.untyped_storage()
                    key, nbytes = st.data_ptr(), st.nbytes()
                except (RuntimeError, NotImplementedError):       # tensors without storage
                    continue
                if key and key not in self.live and key not in inputs:   # views, in-place: no new bytes
                    self.live[key] = (StorageWeakRef(st), nbytes)
                    self.current += nbytes
        if self.current > self.peak:          # only then is it worth finding what was freed
            self._collect()
            self.peak = max(self.peak, self.current)
        return out


# the allocator's counters, one function each so that the bookkeeping below runs (and is tested)
# without a GPU against a stand-in allocator
def _cuda_sync(device: torch.device) -> None:
    torch.cuda.synchronize(device)


def _cuda_allocated(device: torch.device) -> int:
    return int(torch.cuda.memory_allocated(device))


def _cuda_peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device))


def _cuda_reset_peak(device: torch.device) -> None:
    torch.cuda.reset_peak_memory_stats(device)


def _cuda_device(device: torch.device | str) -> torch.device:
    """``device`` with its index (``cuda`` is the current device), so that one device has one key."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


_WARM: set[tuple[int, int]] = set()        # (device index, stream) whose library workspaces exist


def _cuda_warm_up(device: torch.device) -> None:
    """Create the cuBLAS / cuBLASLt workspaces and the cuDNN handle of ``device``'s current stream
    (allocated by the caching allocator on a library's first use and kept): a meter entered before
    them would count them as the measured code's."""
    index = _cuda_device(device).index
    key = (index, torch.cuda.current_stream(index).cuda_stream)
    if key in _WARM:
        return
    with torch.no_grad():
        for dt in (torch.float32, torch.float64):
            a = torch.ones(8, 8, device=device, dtype=dt)
            torch.addmm(a[0], a, a)
            torch.bmm(a[None], a[None])
            torch.mm(a, a)
            if torch.backends.cudnn.is_available():
                torch.nn.functional.conv2d(a[None, None], a[None, None, :3, :3])
    _WARM.add(key)


_ACTIVE: list["MemoryMeter"] = []           # the CUDA meters now open, outermost first


def _fold(device: torch.device, peak: int) -> None:
    """Before the allocator's peak counter of ``device`` is reset: keep what it held for every open
    meter of that device and for :func:`peak_allocated`."""
    for m in _ACTIVE:
        if m.device == device:
            m._folded = max(m._folded, peak)
    _CARRIED[device] = max(_CARRIED.get(device, 0), peak)


_CARRIED: dict[torch.device, int] = {}


def peak_allocated(device: torch.device | str) -> int:
    """``torch.cuda.max_memory_allocated(device)`` as it would read had no :class:`MemoryMeter`
    reset it since the last :func:`reset_peak_allocated`: read the peak through this, not the
    allocator, around code that may measure itself."""
    device = _cuda_device(device)
    return max(_CARRIED.get(device, 0), _cuda_peak(device))


def reset_peak_allocated(device: torch.device | str) -> None:
    """Start a new peak for :func:`peak_allocated` (open meters keep theirs)."""
    device = _cuda_device(device)
    _fold(device, _cuda_peak(device))
    _CARRIED.pop(device, None)
    _cuda_reset_peak(device)


class MemoryMeter:
    """Context manager measuring the peak bytes allocated inside it (see the module docstring).

    On CUDA the peak is the allocator's (``max_memory_allocated``), relative to the bytes allocated
    when the meter opened. Meters nest: a meter resets the allocator's peak counter to see its own
    peak, and folds the peak it clears into every enclosing meter and into :func:`peak_allocated`,
    so that their measurements stay what they would have been. The first meter on a device and
    stream creates the cuBLAS / cuDNN workspaces first (:func:`_cuda_warm_up`), so a library's
    first use is not counted as the measured code's working set."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = _cuda_device(device)
        self.peak_bytes = 0
        self._mode: _StorageTracker | None = None
        self._base = 0
        self._folded = 0

    def __enter__(self) -> "MemoryMeter":
        if self.device.type == "cuda":
            _cuda_warm_up(self.device)
            _cuda_sync(self.device)
            _fold(self.device, _cuda_peak(self.device))
            _cuda_reset_peak(self.device)
            self._base = _cuda_allocated(self.device)
            self._folded = 0
            _ACTIVE.append(self)
        else:
            self._mode = _StorageTracker()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _cuda_sync(self.device)
            self.peak_bytes = max(0, max(self._folded, _cuda_peak(self.device)) - self._base)
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        elif self._mode is not None:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak
            self._mode = None


DEFAULT_BUDGET_BYTES = 2 << 30
"""The memory budget of a probe that plans by one, on the CPU and where no device memory is known."""
FREE_FRACTION = 0.75
"""On CUDA the default budget is this fraction of the device's free memory ..."""
BUDGET_CAP_BYTES = 64 << 30
"""... and at most this many bytes (a probe's working set, not the whole of a large card)."""


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.3g} GiB"


def device_memory(device: torch.device | str) -> tuple[int, int] | None:
    """``(free, total)`` bytes of a CUDA ``device``: the driver's free memory
    (``torch.cuda.mem_get_info``) plus what PyTorch's caching allocator holds unused (reserved, not
    allocated, so free to this process); None for other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    cached = int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device))
    return int(free) + max(0, cached), int(total)


def memory_budget(requested: float | None, device: torch.device | str, *, name: str = "memory budget",
                  free: tuple[int, int] | None = None) -> int:
    """The memory budget in bytes of a probe that plans by one, on ``device``.

    ``requested`` (bytes) None takes the default: :data:`DEFAULT_BUDGET_BYTES` on the CPU, and on
    CUDA :data:`FREE_FRACTION` of the device's free memory, at most :data:`BUDGET_CAP_BYTES`. A
    requested budget on CUDA above the free memory is a :class:`UserError` (the plan would run out of
    memory), and one that is not a positive number is one everywhere (``name`` says which option).
    ``free``: the device's ``(free, total)`` bytes (default: :func:`device_memory`)."""
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, (int, float))
                                  or not 0 < requested < float("inf")):
        raise UserError(f"{name} must be positive, got {requested!r}")
    known = device_memory(device) if free is None else free
    if known is None:
        return DEFAULT_BUDGET_BYTES if requested is None else int(requested)
    avail, total = int(known[0]), int(known[1])
    default = max(1, min(int(FREE_FRACTION * avail), BUDGET_CAP_BYTES))
    if requested is None:
        return default
    if requested > avail:
        raise UserError(f"{name} of {_gib(requested)} exceeds the {_gib(avail)} free on {torch.device(device)} "
                        f"(of {_gib(total)}): give at most {_gib(avail)}, or none for the default "
                        f"({FREE_FRACTION:.0%} of the free memory, now {_gib(default)})")
    return int(requested)


def out_of_memory(exc: BaseException, step: str) -> OutOfMemory:
    """The :class:`probe.errors.OutOfMemory` to raise (``from exc``) for a ``torch.OutOfMemoryError``
    caught in ``step``: the fallback handlers that read a ``RuntimeError`` as "this method does not
    work on this model" re-raise an out-of-memory error through it instead of falling back."""
    return OutOfMemory(f"out of memory in {step} ({first_line(exc)[:200]}); use smaller sizes: a smaller "
                       f"memory budget, fewer samples or a smaller batch")
