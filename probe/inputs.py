"""Data as the probe functions take it: tensors, or a :class:`torch.utils.data.DataLoader`.

Every probe function (``hessian_spectrum(model, x, y)``, ``empirical_ntk(model, x)``, ...) also takes a
DataLoader in place of its inputs, as PyHessian's ``dataloader=``: ``hessian_spectrum(model, loader)``.
The loader's batches are read once, in its order, and concatenated: ``(x, y)`` pairs (tuples or lists;
further entries are ignored), ``{"x": ..., "y": ...}`` mappings (``"input"`` / ``"label"``,
``"inputs"`` / ``"labels"`` too) or bare input tensors where the probe takes no labels. The result is
then the one the concatenated tensors give, and its ``notes`` say how many samples came from the
loader (a probe that uses a subset of them says so too).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from probe.errors import UserError

__all__ = ["is_loader", "loader_tensors", "takes_loader"]

F = TypeVar("F", bound=Callable[..., Any])

_X_KEYS = ("x", "input", "inputs")
_Y_KEYS = ("y", "label", "labels", "target", "targets")


def is_loader(obj: Any) -> bool:
    """Whether ``obj`` is a :class:`torch.utils.data.DataLoader`."""
    return isinstance(obj, torch.utils.data.DataLoader)


def _split(batch: Any, i: int) -> tuple[Any, Any]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        x = next((batch[k] for k in _X_KEYS if k in batch), None)
        y = next((batch[k] for k in _Y_KEYS if k in batch), None)
        if x is not None:
            return x, y
    raise UserError(f"DataLoader batch {i}: expected (x, y), {{'x': ..., 'y': ...}} or an input tensor, got "
                    f"{type(batch).__name__}")


def loader_tensors(loader, *, labels: bool = True) -> tuple[Tensor, Tensor | None, int]:
    """The batches of ``loader`` concatenated: ``(x, y or None, number of batches)``. With
    ``labels`` every batch must carry labels; without, labels are dropped."""
    xs, ys = [], []
    for i, batch in enumerate(loader):
        x, y = _split(batch, i)
        if not isinstance(x, Tensor):
            raise UserError(f"DataLoader batch {i}: inputs are a {type(x).__name__}, expected a tensor")
        if labels:
            if y is None:
                raise UserError(f"DataLoader batch {i} has no labels; this probe needs (x, y) batches")
            y = torch.as_tensor(y)
            if y.shape[:1] != x.shape[:1]:
                raise UserError(f"DataLoader batch {i}: {x.shape[0]} inputs but {tuple(y.shape)} labels")
            ys.append(y)
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise UserError(f"DataLoader batch {i}: sample shape {tuple(x.shape[1:])} differs from the first "
                            f"batch's {tuple(xs[0].shape[1:])}")
        xs.append(x)
    if not xs:
        raise UserError("the DataLoader gave no batches")
    return torch.cat(xs), (torch.cat(ys) if labels else None), len(xs)


def _with_note(result: Any, note: str) -> Any:
    fields = getattr(result, "__dataclass_fields__", None)
    if fields and "notes" in fields:
        return dataclasses.replace(result, notes=(note, *tuple(result.notes)))
    return result


def takes_loader(inputs: str, labels: str | None = None, *more: str) -> Callable[[F], F]:
    """Let a probe function take a DataLoader for its argument ``inputs`` (with its ``labels``
    argument then left out, read from the batches) and for each argument in ``more`` (inputs only,
    e.g. ``empirical_ntk``'s ``x2``); tensors pass through unchanged. A note on the result states the
    samples read."""

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        names = list(sig.parameters)
        at = names.index(inputs)
        shift = labels is not None and labels in names and names.index(labels) == at + 1

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = None
            if shift and len(args) > at and is_loader(args[at]) and labels not in kwargs:
                # f(model, loader, more...): the labels come from the loader, the rest moves up one place
                try:
                    bound = sig.bind_partial(*args[:at + 1], None, *args[at + 1:], **kwargs)
                except TypeError:  # one argument too many: the labels were given after the loader
                    bound = None
            bound = bound or sig.bind_partial(*args, **kwargs)
            notes = []
            if is_loader(bound.arguments.get(inputs)):
                if labels is not None and bound.arguments.get(labels) is not None:
                    raise UserError(f"{fn.__name__}: {inputs} is a DataLoader, which gives the labels too; "
                                    f"leave {labels} out")
                x, y, nb = loader_tensors(bound.arguments[inputs], labels=labels is not None)
                bound.arguments[inputs] = x
                if labels is not None:
                    bound.arguments[labels] = y
                notes.append(f"data: {x.shape[0]} samples read from a DataLoader ({nb} batches)")
            elif labels is not None and labels in sig.parameters and bound.arguments.get(labels) is None \
                    and sig.parameters[labels].default is inspect.Parameter.empty:
                raise UserError(f"{fn.__name__}: give {labels} (the labels of {inputs}) or a DataLoader of "
                                f"(x, y) batches as {inputs}")
            for name in more:
                if is_loader(bound.arguments.get(name)):
                    x, _, nb = loader_tensors(bound.arguments[name], labels=False)
                    bound.arguments[name] = x
                    notes.append(f"{name}: {x.shape[0]} samples read from a DataLoader ({nb} batches)")
            result = fn(*bound.args, **bound.kwargs)
            for note in reversed(notes):
                result = _with_note(result, note)
            return result

        if labels is not None and labels in sig.parameters:  # the labels may be left out with a loader
            params = [p.replace(default=None) if p.name == labels and p.default is inspect.Parameter.empty else p
                      for p in sig.parameters.values()]
            try:
                call.__signature__ = sig.replace(parameters=params)
            except ValueError:  # a required argument follows (loss_surface's directions): keep the signature
                pass
        return call  # type: ignore[return-value]

    return wrap
