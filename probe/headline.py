"""Headline numbers of a trained model: each probe run once at one checkpoint and reduced to the
few numbers that compare models (the demo's side-by-side table, the experiments' verdict table).

Measuring goes through the public runner (:func:`probe.jobs.run_probe`), so every number is a
stored probe row; :func:`headline` reads the numbers back from the store by probe id, so a table
built from it is the store's, not a copy made along the way::

    >>> ids = measure(store, run_id, quick=True)        # {probe: probe id}
    >>> headline(store, ids)["lambda_max"]

Each measure is classed as a question of **optimisation** (can the loss be driven down: gate
saturation, gradient signal-to-noise, relative update size, curvature and the loss surface's
rise) or of **generalisation** (what function is learnt: NTK spectrum and the eigenlearning
prediction, smoothness between real inputs).

The measures and the settings they are taken with are declared by the probes themselves
(:attr:`probe.probes.registry.Probe.measures`, ``quick``, ``full``): a registered probe with a
measure is in the table.
"""
from __future__ import annotations

from probe.errors import UserError
from probe.probes.registry import Measure, get_probe, list_probes

__all__ = ["Measure", "MEASURES", "PROBES", "measures", "headline_probes", "probe_settings", "measure", "headline",
           "stored_probe"]


def measures() -> tuple[Measure, ...]:
    """Every registered probe's headline measures (:attr:`probe.probes.registry.Probe.measures`),
    the probes in their ``order``, each probe's measures in the order it declares them."""
    specs = sorted((get_probe(name) for name in list_probes()), key=lambda spec: (spec.order, spec.name))
    return tuple(m for spec in specs for m in spec.measures)


def headline_probes() -> tuple[str, ...]:
    """The probes the measures come from, in the order :func:`measure` runs them."""
    return tuple(dict.fromkeys(m.probe for m in measures()))


def __getattr__(name: str):
    # MEASURES and PROBES are read from the registry when asked for (a probe registered later is in them)
    if name == "MEASURES":
        return measures()
    if name == "PROBES":
        return headline_probes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def probe_settings(quick: bool) -> dict[str, tuple[dict, int]]:
    """``{probe: (params, n)}`` used by :func:`measure`: each probe's ``quick`` settings (CPU
    seconds per probe on the demo's models) or its ``full`` ones
    (:attr:`probe.probes.registry.Probe.quick` / ``full``)."""
    return {name: get_probe(name).settings(quick) for name in headline_probes()}


def stored_probe(store, run_id: str, epoch: int | None, name: str, params: dict, n: int, seed: int = 0) -> str | None:
    """The id of the newest stored ``name`` row of ``run_id`` at checkpoint ``epoch`` taken with
    the same options (the probe's defaults filled in), ``n`` and ``seed``; None when there is none."""
    from probe.probes.registry import make_params, params_dict

    want = {**params_dict(make_params(get_probe(name).params, dict(params))), "n": n, "seed": seed}
    for row in reversed(store.list_probes(run_id=run_id, kind=name)):
        have = row.get("params") or {}
        if row.get("checkpoint_epoch") == epoch and all(have.get(k) == v for k, v in want.items()):
            return row["probe_id"]
    return None


def measure(store, run_id: str, *, checkpoint="last", quick: bool = False, probes=None,
            done: dict[str, str] | None = None, reuse: bool = True, progress=None, log=None) -> dict[str, str]:
    """Run each of ``probes`` (default: every probe with a headline measure) on ``run_id`` at
    ``checkpoint`` and return ``{probe: probe id}``;
    ``done`` gives probe ids already measured (kept, not rerun), and with ``reuse`` a row the
    store already holds for the same run, checkpoint and settings is taken instead of a new
    measurement. A probe that fails on this run is a :class:`UserError` naming the run and the
    probe."""
    from probe.jobs import run_probe

    say = log or (lambda line: None)
    probes = headline_probes() if probes is None else probes
    ids = dict(done or {})
    epoch = store.latest_checkpoint(run_id) if checkpoint == "last" else (0 if checkpoint == "init" else checkpoint)
    for name in probes:
        if name in ids:
            continue
        params, n = get_probe(name).settings(quick)
        if reuse and epoch is not None:
            found = stored_probe(store, run_id, epoch, name, params, n)
            if found is not None:
                say(f"reusing probe {name} {found} of run {run_id}")
                ids[name] = found
                continue
        say(f"probe {name} on run {run_id} (checkpoint {checkpoint})")
        outcome = run_probe(store, name, params, run=run_id, checkpoint=checkpoint, n=n, progress=progress)[0]
        if outcome.error is not None:
            raise UserError(f"probe {name} failed on run {run_id}: {outcome.error}")
        ids[name] = outcome.info["probe_id"]
    return ids


def headline(store, probe_ids: dict[str, str]) -> dict[str, "float | None"]:
    """``{measure key: number}`` read from the stored probe rows ``probe_ids`` (``{probe: id}``);
    a measure whose probe is not in ``probe_ids`` is None."""
    from probe.jobs import load_result

    loaded = {name: load_result(store, pid) for name, pid in probe_ids.items()}
    out: dict[str, float | None] = {}
    for m in measures():
        if m.probe not in loaded:
            out[m.key] = None
            continue
        row, result = loaded[m.probe]
        out[m.key] = m.get(row["summary"], result)
    return out
