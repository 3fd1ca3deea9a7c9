"""The probe registry: a probe is one package, registered once.

A probe package ``probe/probes/<name>/`` holds the same files:

- ``api.py``: the pure functions over ``(model, data)`` that never mutate the model (the library API),
- ``result.py``: the **result** type(s): a frozen dataclass with ``summary() -> dict`` (JSON-able:
  the catalog row and the ``--json`` output), ``arrays() -> dict[str, np.ndarray]`` (the ``.npz``
  artifact), ``from_store(summary, arrays)`` (classmethod, the inverse: ``from_store(r.summary(),
  r.arrays())`` equals ``r``) and ``text() -> str`` (the lines the CLI prints); :class:`StoredResult`
  gives all but ``text`` to a result kept in its stored form,
- ``probe.py``: the frozen **parameters** dataclass (one field per probe option, each with a default
  and ``metadata={"help": "...", "choices": (...)}``; ``__post_init__`` raises :class:`UserError` on
  a bad value, messages naming the field, never a CLI flag), a ``compute(ctx: ProbeContext, params)
  -> result`` adapter from the runner's context to the pure function, and one call
  ``register(Probe(...))``,
- ``__init__.py``: the public names (the pure functions and result types), and ``from .probe
  import ...`` so that importing the package registers the probe;

other private helper modules (``_name.py``) may sit beside them.

Registering gives the probe its CLI subcommand (the shared target flags come from the runner, the
probe's own flags from its parameters dataclass), its catalog kind (``Probe.name``), the
``--checkpoint all`` sweep with a per-target error entry, ``--html`` through its figure builder
(``probe/figures/``), its explorer page, and its rows of the headline table
(:mod:`probe.headline`). Nothing else needs to change to add a probe: the packages of
:mod:`probe.probes` are discovered by :func:`load_probes`.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from probe.checks import check_choice
from probe.errors import UserError
from probe.runtime.progress import Progress

__all__ = ["Probe", "ProbeContext", "ProbeResult", "ResultView", "StoredResult", "Progress", "Measure", "Figure",
           "summary_number", "probe_figures", "register", "unregister", "get_probe", "list_probes", "load_probes", "param_fields", "make_params",
           "params_dict"]

@dataclass(frozen=True)
class ProbeContext:
    """What the runner hands a probe for one target (one model, at one checkpoint).

    ``model`` must not be changed (parameters, buffers, modes, hooks): probes work on
    ``torch.func.functional_call`` or on hooks they remove again. At initialisation its BatchNorm
    statistics were estimated on ``x`` (on a copy). ``x`` are ``n`` seeded, class-balanced inputs
    ``(N, C, H, W)`` (float32, CPU) of the target's data split, ``y`` their int64 labels ``(N,)``.
    ``lr`` is the learning rate the run used at this checkpoint (``None`` for a model given by
    name), for probes that relate gradients to step sizes.
    """

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    device: torch.device
    seed: int
    model_name: str
    data: str = ""                      # the data set's name
    run_id: str | None = None
    epoch: int | None = None            # checkpoint epoch; 0 = initialisation of a run; None = by name
    lr: float | None = None
    progress: Progress | None = None
    #: ``rebuild(seed)``: the same architecture freshly initialised from ``seed`` (for probes that
    #: average over initialisations); ``None`` where the target cannot be rebuilt.
    rebuild: Callable[[int], nn.Module] | None = None
    #: saved pieces of this job (:class:`probe.runtime.partial.PartialResults`): a probe that splits
    #: into pieces saves each one as it finishes and reuses those an interrupted attempt of the
    #: same job saved; ``None`` when results are not saved.
    partial: Any = None
    #: the :class:`probe.store.RunStore` the job runs in, for probes that read other stored
    #: results or checkpoints (a run's trajectory, another run's weights, stored eigenvectors);
    #: ``None`` outside the runner.
    store: Any = None

    @property
    def at_init(self) -> bool:
        return not self.epoch


class ProbeResult(Protocol):
    def summary(self) -> dict: ...
    def arrays(self) -> dict[str, np.ndarray]: ...
    def text(self) -> str: ...

    @classmethod
    def from_store(cls, summary: dict, arrays: dict) -> "ProbeResult": ...


class ResultView:
    """What every probe result offers in a notebook: :meth:`figure` (the probe's plotly figure),
    :meth:`figures` (every figure of the probe's explorer page), :meth:`to_frame` (its numbers as
    a pandas DataFrame) and a short ``repr`` (the key numbers and the samples used).

    A result class says which probe draws it (``_probe``), which of its arrays form the table
    (``_frame_columns``, 1-D, one row per entry of ``_frame_index``: the name of an array used as
    the index, or a label for a rank 1, 2, ...) and which summary numbers its repr shows
    (``_repr_keys``, dotted paths into the drawn result's ``summary()``, each shown under its last
    part or as ``label=path``). A result whose figure
    builders read another form (a pure function's result drawn as the stored one) returns it from
    :meth:`drawn`. The dataclasses using this view are declared with ``repr=False``."""

    _probe: ClassVar[str] = ""
    _frame_index: ClassVar[str] = "index"
    _frame_columns: ClassVar[tuple[str, ...]] = ()
    _repr_keys: ClassVar[tuple[str, ...]] = ()
    _samples_keys: ClassVar[tuple[str, ...]] = ("n_samples", "n")

    def drawn(self) -> Any:
        """The form the probe's figure builders read (``summary()`` / ``arrays()`` as stored)."""
        return self

    def _entry(self, name: str | None) -> list[tuple[dict, Any]]:
        result = self.drawn()
        summary = result.summary()
        model = name or summary.get("model") or "model"
        return [({"model": model, "run_id": summary.get("run_id"), "epoch": summary.get("epoch")}, result)]

    def figure(self, name: str | None = None):
        """The probe's main plotly figure of this result (``name`` labels it in the legend)."""
        spec = get_probe(self._probe)
        if spec.figure is None:
            raise UserError(f"probe {self._probe!r} has no figure")
        return spec.figure(self._entry(name))

    def figures(self, name: str | None = None) -> dict:
        """``{title: figure}``: the main figure and every extra figure of the probe (what its
        explorer page and its ``--html`` page draw)."""
        return probe_figures(get_probe(self._probe), self._entry(name))

    def frame_columns(self) -> dict[str, np.ndarray]:
        """The table's columns, ``_frame_index`` first (shorter columns padded with NaN)."""
        arrays = self.drawn().arrays()
        cols = {k: np.asarray(arrays[k]) for k in self._frame_columns if k in arrays and np.ndim(arrays[k]) == 1}
        index = arrays.get(self._frame_index)
        rows = max([len(v) for v in cols.values()] + [0 if index is None else len(index)])
        out = {self._frame_index: np.asarray(index) if index is not None else np.arange(1, rows + 1)}
        for k, v in cols.items():
            if len(v) < rows:
                v = np.concatenate([v.astype(np.float64), np.full(rows - len(v), np.nan)])
            out[k] = v
        return out

    def to_frame(self):
        """The result's numbers as a pandas DataFrame (one row per eigenvalue, layer, gate, path or
        grid point; see :meth:`frame_columns`)."""
        import pandas as pd

        cols = self.frame_columns()
        return pd.DataFrame(cols).set_index(self._frame_index)

    def repr_items(self) -> list[tuple[str, Any]]:
        """``(name, value)`` pairs of the repr: the samples used, then ``_repr_keys``."""
        summary = self.drawn().summary()

        def dig(key: str) -> Any:
            v: Any = summary
            for part in key.split("."):
                v = v.get(part) if isinstance(v, dict) else None
            return v

        items: list[tuple[str, Any]] = []
        n = next((v for v in map(dig, self._samples_keys) if v is not None), None)
        if n is not None:
            of = summary.get("n_available")
            items.append(("samples", f"{n} of {of}" if of not in (None, n) else n))
        for key in self._repr_keys:
            label, _, path = key.rpartition("=")
            v = dig(path)
            if v is not None:
                items.append((label or path.rsplit(".", 1)[-1], v))
        return items

    def __repr__(self) -> str:
        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.4g}"
            if isinstance(v, (list, tuple)):
                return "[" + ", ".join(fmt(x) for x in list(v)[:5]) + (", ..." if len(v) > 5 else "") + "]"
            return str(v)

        body = ", ".join(f"{k}={fmt(v)}" for k, v in self.repr_items())
        return f"{type(self).__name__}({self._probe}: {body})"


def probe_figures(spec: "Probe", entries: Sequence[tuple[dict, Any]]) -> dict:
    """``{title: figure}`` of a probe over ``entries``: its main figure (under its help line) and
    every :class:`Figure` of ``extra_figures``: what its explorer page draws."""
    out = {}
    entries = list(entries)
    if spec.figure is not None:
        out[spec.help] = spec.figure(entries)
    for fig in spec.extra_figures:
        out[fig.title] = fig.build(entries)
    return out


@dataclass(frozen=True, eq=False, repr=False)
class StoredResult(ResultView):
    """A probe result kept in its stored form: ``data`` the summary (the catalog row and the
    ``--json`` output), ``array_data`` the arrays (the ``.npz`` artifact). It gives a result
    ``summary``, ``arrays``, ``from_store`` and equality; a probe subclasses it for ``text()`` and
    its own accessors."""

    data: dict
    array_data: dict

    def summary(self) -> dict:
        return dict(self.data)

    def arrays(self) -> dict:
        return dict(self.array_data)

    @classmethod
    def from_store(cls, summary: dict, arrays: dict):
        return cls(dict(summary), {k: np.asarray(v) for k, v in arrays.items()})

    def __eq__(self, other) -> bool:
        if not isinstance(other, type(self)):
            return NotImplemented
        from probe.store import to_jsonable

        return (to_jsonable(self.data) == to_jsonable(other.data) and self.array_data.keys() == other.array_data.keys()
                and all(_same_array(self.array_data[k], other.array_data[k]) for k in self.array_data))

    __hash__ = None

    def text(self) -> str:
        raise NotImplementedError


def _same_array(a, b) -> bool:
    """Equal shapes and elements; NaN equals NaN in floating arrays (a gap stored as NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    floating = np.issubdtype(a.dtype, np.inexact) and np.issubdtype(b.dtype, np.inexact)
    return bool(np.array_equal(a, b, equal_nan=floating))


#: The two kinds of headline measure (:mod:`probe.headline`).
MEASURE_KINDS = ("optimisation", "generalisation")


@dataclass(frozen=True)
class Measure:
    """One headline number of a probe: its ``key``, table ``label``, whether it is an
    ``optimisation`` or a ``generalisation`` measure (``kind``), ``get(summary, result)`` (the
    number from a stored row's summary and its loaded result; None when it has none) and a
    ``help`` line. ``probe`` is the name of the probe that declares it (filled in by
    :func:`register`)."""

    key: str
    label: str
    kind: str
    get: Callable[[dict, Any], "float | None"]
    help: str = ""
    probe: str = ""


def summary_number(*keys: str) -> Callable[[dict, Any], "float | None"]:
    """A :attr:`Measure.get` reading the number at ``summary[keys[0]][keys[1]]...`` (None when a
    key is missing or the value is not a number)."""
    def get(summary: dict, result: Any) -> "float | None":
        v: Any = summary
        for k in keys:
            if not isinstance(v, dict):
                return None
            v = v.get(k)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return get


@dataclass(frozen=True)
class Figure:
    """One more figure of a probe, over the same entries as :attr:`Probe.figure`: its ``title``,
    its ``build(entries)`` and whether it draws a ``series`` across training (one point per
    checkpoint of a run: give it every checkpoint) or the results one by one."""

    title: str
    build: Callable[[Sequence[tuple[dict, Any]]], Any]
    series: bool = False


@dataclass(frozen=True)
class Probe:
    """A registered probe.

    ``figure(entries)`` builds one plotly figure from ``entries``, a list of ``(info, result)``
    pairs: ``info`` a dict with ``model``, ``run_id``, ``epoch`` (the target) and ``probe_id``
    (when stored), ``result`` the probe's result object; several entries are several models or
    checkpoints overlaid or side by side.

    Settings, each ``(params, n)`` (options given, the rest their defaults; ``n`` inputs):
    ``quick`` seconds on a CPU with the demo's models, ``full`` the headline measurement
    (:func:`probe.headline.measure`); ``smoke`` the options of the smallest run that still takes
    every path of the probe (the tests' setting, with any ``n``). ``measures`` are the probe's
    headline numbers, ``order`` places them in the headline table (lower first).
    """

    name: str                                   # CLI subcommand and catalog kind
    help: str                                   # one line for `probe --help`
    params: type                                # frozen dataclass of the probe's own options
    result: type                                # the result dataclass (has from_store)
    compute: Callable[[ProbeContext, Any], Any]
    figure: Callable[[Sequence[tuple[dict, Any]]], Any] | None = None
    #: more figures over the same entries (:class:`Figure`), shown on the probe's explorer page
    extra_figures: tuple[Figure, ...] = ()
    default_n: int = 128                        # probe inputs by default (--n)
    split: str = "train"                        # which data split the inputs come from
    description: str = ""                       # longer text for `probe NAME --help`
    quick: tuple[dict, int] | None = None       # None: ({}, default_n)
    full: tuple[dict, int] | None = None        # None: ({}, default_n)
    smoke: dict = dataclasses.field(default_factory=dict)
    measures: tuple[Measure, ...] = ()
    order: int = 100

    def settings(self, quick: bool) -> tuple[dict, int]:
        """``(params, n)`` of the quick or the full measurement (a copy of the params)."""
        chosen = self.quick if quick else self.full
        params, n = chosen if chosen is not None else ({}, self.default_n)
        return dict(params), int(n)


_REGISTRY: dict[str, Probe] = {}


def register(probe: Probe) -> Probe:
    """Register ``probe`` under ``probe.name`` (once); returns it with its measures' ``probe``
    filled in."""
    if not dataclasses.is_dataclass(probe.params):
        raise TypeError(f"probe {probe.name!r}: params must be a dataclass")
    for fig in probe.extra_figures:
        if not isinstance(fig, Figure):
            raise TypeError(f"probe {probe.name!r}: extra_figures must be Figure records, got {type(fig).__name__}")
    for m in probe.measures:
        if m.kind not in MEASURE_KINDS:
            raise TypeError(f"probe {probe.name!r}: measure {m.key!r} has kind {m.kind!r}, not one of "
                            f"{', '.join(MEASURE_KINDS)}")
    if any(m.probe != probe.name for m in probe.measures):
        probe = dataclasses.replace(probe, measures=tuple(dataclasses.replace(m, probe=probe.name)
                                                          for m in probe.measures))
    known = _REGISTRY.get(probe.name)
    if known is not None and known != probe:
        raise ValueError(f"probe {probe.name!r} is already registered")
    _REGISTRY[probe.name] = probe
    return probe


def unregister(name: str) -> Probe | None:
    """Remove the probe registered as ``name`` (a probe registered for a while, as in a test);
    returns it, or None when there was none."""
    return _REGISTRY.pop(name, None)


def load_probes() -> None:
    """Import every package of :mod:`probe.probes` (each registers its probe)."""
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not info.name.startswith("_") and info.name != "registry":
            importlib.import_module(f"probe.probes.{info.name}")


def list_probes() -> list[str]:
    """Names of the registered probes (sorted)."""
    load_probes()
    return sorted(_REGISTRY)


def get_probe(name: str) -> Probe:
    """The probe registered as ``name``; an unknown name lists the known ones."""
    load_probes()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown probe {name!r}; probes: {', '.join(sorted(_REGISTRY))}") from None


def param_fields(params: type) -> list[dataclasses.Field]:
    """The option fields of a parameters dataclass (every field must have a default and help)."""
    out = []
    for f in dataclasses.fields(params):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"{params.__name__}.{f.name} needs a default")
        if "help" not in f.metadata:
            raise TypeError(f"{params.__name__}.{f.name} needs metadata={{'help': ...}}")
        out.append(f)
    return out


def make_params(params: type, values: dict) -> Any:
    """``params(**values)`` with unknown names refused and a bad value reported as a UserError."""
    known = {f.name for f in dataclasses.fields(params)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for f in dataclasses.fields(params):
        choices = f.metadata.get("choices")
        if f.name in values and choices is not None:
            check_choice(f.name, values[f.name], choices)
    try:
        return params(**values)
    except TypeError as e:
        raise UserError(str(e)) from None


def params_dict(params: Any) -> dict:
    """The options of a parameters object as a JSON-able dict (what the catalog stores)."""
    return dataclasses.asdict(params)
