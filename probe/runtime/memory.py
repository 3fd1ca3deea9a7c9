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
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from probe.errors import OutOfMemory, first_line

__all__ = ["MemoryMeter", "out_of_memory"]


class _StorageTracker(TorchDispatchMode):
    """Live bytes of the storages created by operators while the mode is active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

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


class MemoryMeter:
    """Context manager measuring the peak bytes allocated inside it (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._mode: _StorageTracker | None = None
        self._base = 0

    def __enter__(self) -> "MemoryMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _StorageTracker()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        elif self._mode is not None:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak
            self._mode = None


def out_of_memory(exc: BaseException, step: str) -> OutOfMemory:
    """The :class:`probe.errors.OutOfMemory` to raise (``from exc``) for a ``torch.OutOfMemoryError``
    caught in ``step``: the fallback handlers that read a ``RuntimeError`` as "this method does not
    work on this model" re-raise an out-of-memory error through it instead of falling back."""
    return OutOfMemory(f"out of memory in {step} ({first_line(exc)[:200]}); use smaller sizes: a smaller "
                       f"memory budget, fewer samples or a smaller batch")
