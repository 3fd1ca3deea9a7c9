"""Float32 matmuls and convolutions in IEEE precision for the probes that promise float32 accuracy.

On tensor-core GPUs (Ampere and later) torch may run float32 matrix products and convolutions in
TF32 (10-bit mantissa, ~1e-3 relative error): cuDNN convolutions do by default. The probes' solver
tolerances, closed-form self-checks and sample-independence checks assume float32 (or float64)
arithmetic, so :func:`exact_matmul` switches TF32 off for its duration and restores the caller's
settings afterwards (also on an exception); :func:`exact` does the same around a function and, when
the computation ran on CUDA, adds :data:`TF32_NOTE` to the ``notes`` of the result it returns.
An operator a probe returns computes later, outside that function: :func:`exact_products` makes its
products switch TF32 off themselves.
On a CPU the flags have no effect.
"""
from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn

__all__ = ["TF32_NOTE", "exact_matmul", "exact", "exact_products", "precision_flags", "uses_cuda"]

TF32_NOTE = "TF32 off for this probe (float32 matmuls and convolutions in IEEE precision)"

F = TypeVar("F", bound=Callable[..., Any])


def _flags() -> list[tuple[str, Any, str, Any]]:
    """(name, object, attribute, IEEE value) of each precision switch this torch has: the ``fp32_precision``
    names (``torch.backends.cuda.matmul``, ``torch.backends.cudnn.conv``) where they exist, the legacy
    ``allow_tf32`` flags otherwise."""
    backends = torch.backends
    out = []
    for label, new, legacy in (("cuda.matmul", backends.cuda.matmul, backends.cuda.matmul),
                               ("cudnn.conv", getattr(backends.cudnn, "conv", None), backends.cudnn)):
        if new is not None and hasattr(new, "fp32_precision"):
            out.append((f"{label}.fp32_precision", new, "fp32_precision", "ieee"))
        elif hasattr(legacy, "allow_tf32"):
            out.append((f"{label.split('.')[0]}.allow_tf32", legacy, "allow_tf32", False))
    return out


def precision_flags() -> dict[str, Any]:
    """The current values of the switches :func:`exact_matmul` sets, by name (for records and tests)."""
    return {label: getattr(obj, name) for label, obj, name, _ in _flags()}


@contextmanager
def exact_matmul() -> Iterator[None]:
    """TF32 off (float32 matmuls and convolutions in IEEE precision) inside the block; the previous
    settings are restored on leaving it, also on an exception. Nests."""
    flags = _flags()
    saved = [(obj, name, getattr(obj, name)) for _, obj, name, _ in flags]
    try:
        for _, obj, name, value in flags:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _cuda_device(d: Any) -> bool:
    if isinstance(d, str):
        if d == "auto":
            return torch.cuda.is_available()
        return d.startswith("cuda")
    return isinstance(d, torch.device) and d.type == "cuda"


def uses_cuda(*args: Any, **kwargs: Any) -> bool:
    """Whether a call's arguments put its computation on CUDA: a ``device`` argument naming CUDA
    (``auto`` with CUDA available), or a model or tensor argument on CUDA."""
    if _cuda_device(kwargs.get("device")):
        return True
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return True
        if isinstance(a, nn.Module):
            p = next(a.parameters(), None)
            if p is not None and p.is_cuda:
                return True
    return False


def _with_note(result: Any) -> Any:
    if not dataclasses.is_dataclass(result) or isinstance(result, type):
        return result
    notes = getattr(result, "notes", None)
    if not isinstance(notes, (tuple, list)) or TF32_NOTE in notes:
        return result
    return dataclasses.replace(result, notes=(*notes, TF32_NOTE))


def exact(fn: F) -> F:
    """Decorator: ``fn`` runs inside :func:`exact_matmul`; when its arguments are on CUDA, the
    result (a dataclass with ``notes``) gets :data:`TF32_NOTE`."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with exact_matmul():
            result = fn(*args, **kwargs)
        return _with_note(result) if uses_cuda(*args, **kwargs) else result
    wrapper.exact_matmul = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


_PRODUCTS = ("matmat", "matvec", "mean_loss")
"""The methods of an operator that compute with the model (:func:`exact_products`)."""

O = TypeVar("O")


def _exact_call(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with exact_matmul():
            return fn(*args, **kwargs)
    wrapper.exact_matmul = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def exact_products(op: O) -> O:
    """``op`` (an operator a probe returns, e.g. a :class:`probe.linalg.SymmetricOperator`) with
    its products -- ``matmat``, ``matvec`` and ``mean_loss`` where it has them -- run inside
    :func:`exact_matmul` whenever they are called, long after the function that built ``op``
    returned and restored the caller's flags. The same object, its methods replaced on the instance."""
    for name in _PRODUCTS:
        method = getattr(op, name, None)
        if callable(method) and not getattr(method, "exact_matmul", False):
            setattr(op, name, _exact_call(method))
    return op
