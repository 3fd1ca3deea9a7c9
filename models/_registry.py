"""Build models by name: ``create_model(name, **overrides)``.

A registered builder is a small function that only sets arguments of a family. User models are
accepted as ``package.module:factory``. Every model returned by :func:`create_model` carries
``model.probe_config = {"name": ..., "kwargs": {...}}`` (JSON-able) so that a checkpoint can rebuild
it.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .fusion import FusionSpec, FusionSpecError, parse_fusion

__all__ = ["ModelNameError", "ModelConfigError", "register_model", "create_model", "list_models",
           "model_entry", "ModelEntry", "accepted_kwargs", "is_factory_name"]


class ModelNameError(LookupError):
    """Unknown model name (the message lists close matches)."""


class ModelConfigError(ValueError):
    """Bad keyword arguments for a model builder."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    family: str
    tags: tuple[str, ...] = ()


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(fn: Callable | None = None, *, name: str | None = None, family: str = "",
                   tags: tuple[str, ...] = ()):
    """Decorator registering a builder under ``name`` (default: the function name)."""

    def wrap(f):
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        doc = inspect.getdoc(f) or ""
        _REGISTRY[key] = ModelEntry(key, f, doc.splitlines()[0] if doc else "", family, tuple(tags))
        return f

    return wrap(fn) if fn is not None else wrap


def list_models(tag: str | None = None) -> list[str]:
    """Registered model names (sorted), optionally only those carrying ``tag``."""
    return sorted(k for k, e in _REGISTRY.items() if tag is None or tag in e.tags)


def _close(name: str) -> str:
    matches = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
    return f"; did you mean {', '.join(matches)}?" if matches else f"; `probe models` lists the {len(_REGISTRY)} names"


def model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelNameError(f"unknown model {name!r}{_close(name)}") from None


def is_factory_name(name: str) -> bool:
    """Whether ``name`` names a user factory (``package.module:factory``) rather than a registered model.

    Building such a model imports and runs the named module: only do it for a name the user gave,
    never for one read from stored content (a runs folder, a checkpoint).
    """
    return ":" in str(name)


def _resolve(name: str) -> Callable[..., nn.Module]:
    if is_factory_name(name):
        mod_name, _, attr = name.partition(":")
        if not mod_name or not attr:
            raise ModelNameError(f"model {name!r}: expected package.module:factory")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ModelNameError(f"cannot import {mod_name!r} for model {name!r}: {e}") from None
        except Exception as e:  # the user's module failed while importing
            raise ModelNameError(f"importing {mod_name!r} for model {name!r} raised "
                                 f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                                 ) from None
        fn = getattr(mod, attr, None)
        if not callable(fn):
            raise ModelNameError(f"{mod_name!r} has no callable {attr!r} (expected package.module:factory)")
        return fn
    return model_entry(name).builder


def accepted_kwargs(name: str) -> set[str] | None:
    """Keyword names the builder of ``name`` accepts (None when it takes ``**kwargs``)."""
    try:
        sig = inspect.signature(_resolve(name))
    except (TypeError, ValueError):  # a callable without an inspectable signature
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {k for k, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _jsonable(v):
    if isinstance(v, FusionSpec):
        return v.name
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


def _same_kind(value, default) -> bool:
    """Whether ``value`` fits a builder argument whose default is ``default`` (checked for bool, int
    and float defaults only: a wrong type there fails deep inside a builder with an unclear message)."""
    kind = type(default)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model (or ``package.module:factory``) with keyword overrides.

    ``fusion`` may be a canonical fusion name, a :class:`FusionSpec`, or a seed row id from
    ``probe fusions`` (e.g. ``fmm08``).
    """
    fn = _resolve(name)
    if "fusion" in overrides and isinstance(overrides["fusion"], str):
        from .seed_table import resolve_fusion
        overrides["fusion"] = resolve_fusion(overrides["fusion"])
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise ModelNameError(f"model {name!r}: {type(fn).__name__} is not a model factory "
                             "(expected a function returning an nn.Module)") from None
    accepted = ", ".join(sorted(k for k, p in sig.parameters.items() if p.kind is not p.VAR_KEYWORD))
    try:
        sig.bind(**overrides)
    except TypeError as e:
        raise ModelConfigError(f"model {name!r}: {e}; accepted arguments: {accepted}") from None
    for key, value in overrides.items():
        param = sig.parameters.get(key)
        if param is not None and not _same_kind(value, param.default):
            raise ModelConfigError(f"model {name!r}: {key} must be {_KIND_NAMES[type(param.default)]} like its "
                                   f"default {param.default!r}, got {value!r}")
    try:
        model = fn(**overrides)
    except FusionSpecError:
        raise
    except TypeError as e:
        raise ModelConfigError(f"model {name!r}: {e}; accepted arguments: {accepted} "
                               f"(and those of its family)") from None
    except ValueError as e:
        raise ModelConfigError(f"model {name!r}: {e}") from None
    except Exception as e:  # a user factory may raise anything, a builder given bad values too
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        what = "the factory" if is_factory_name(name) else "building it"
        raise ModelConfigError(f"model {name!r}: {what} raised {type(e).__name__}"
                               + (f": {first}" if first else "")) from None
    if not isinstance(model, nn.Module):
        raise ModelConfigError(f"model {name!r}: factory returned {type(model).__name__}, not an nn.Module")
    model.probe_config = {"name": name, "kwargs": _jsonable(dict(overrides))}
    return model
