"""Where the repository's companion packages are: ``models`` (the model zoo), ``apps`` (the explorer)
and ``experiments``.

In a checkout they are the top-level folders ``models/``, ``apps/`` and ``experiments/``. An installed
wheel carries them inside this package, as ``probe.models``, ``probe.apps`` and ``probe.experiments``,
so that installing the project puts no generic top-level name (``models``, ``apps``) into
site-packages, and a researcher's own ``models`` package is never shadowed by ours nor shadows it.
Code of the library that needs one of them asks this module, so each process imports exactly one copy:

    >>> from probe.companions import load
    >>> create_model = load("models").create_model
    >>> Fusion = load("models.fusion").Fusion
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

__all__ = ["COMPANIONS", "load", "qualified_name"]

#: the companion packages, by their name in a checkout
COMPANIONS = ("models", "apps", "experiments")

_HERE = Path(__file__).resolve().parent      # probe/
_CHECKOUT = _HERE.parent                     # the repository root, in a checkout
_resolved: dict[str, str] = {}


def _top(name: str) -> str:
    """``"models"`` in a checkout (the top-level folder beside ``probe/`` is the one importable under
    that name), ``"probe.models"`` otherwise (an installed wheel, or an editable install run where the
    checkout is not on the path)."""
    if name not in _resolved:
        if (_HERE / name / "__init__.py").is_file():          # shipped inside the wheel
            _resolved[name] = f"probe.{name}"
        else:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            ours = _CHECKOUT / name / "__init__.py"
            same = spec is not None and spec.origin is not None and Path(spec.origin).resolve() == ours.resolve()
            _resolved[name] = name if same else f"probe.{name}"
    return _resolved[name]


def qualified_name(dotted: str) -> str:
    """The importable name of a companion module given by its checkout name: ``"models.fusion"`` ->
    ``"models.fusion"`` in a checkout, ``"probe.models.fusion"`` when installed."""
    head, _, rest = dotted.partition(".")
    if head not in COMPANIONS:
        raise ValueError(f"{dotted!r} is not in a companion package ({', '.join(COMPANIONS)})")
    top = _top(head)
    return f"{top}.{rest}" if rest else top


def load(dotted: str) -> ModuleType:
    """Import a companion module by its checkout name (``"models"``, ``"models.fusion"``, ``"apps"``)."""
    return importlib.import_module(qualified_name(dotted))
