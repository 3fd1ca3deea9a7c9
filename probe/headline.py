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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from probe.errors import UserError

__all__ = ["Measure", "MEASURES", "PROBES", "probe_settings", "measure", "headline", "stored_probe"]


@dataclass(frozen=True)
class Measure:
    """One headline number: its ``key``, table ``label``, the ``probe`` it comes from, whether it
    is an ``optimisation`` or a ``generalisation`` measure, and ``get(summary, result)``."""

    key: str
    label: str
    probe: str
    kind: str
    get: Callable[[dict, Any], "float | None"]
    help: str = ""


def _path(*keys: str) -> Callable[[dict, Any], "float | None"]:
    def get(summary: dict, result: Any) -> "float | None":
        v: Any = summary
        for k in keys:
            if not isinstance(v, dict):
                return None
            v = v.get(k)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return get


def _eigenlearning(field: str) -> Callable[[dict, Any], "float | None"]:
    def get(summary: dict, result: Any) -> "float | None":
        rows = (summary.get("eigenlearning") or {}).get("rows") or []
        v = rows[-1].get(field) if rows else None
        return float(v) if isinstance(v, (int, float)) else None
    return get


def _rise(summary: dict, result: Any) -> "float | None":
    return result.mean_rise(0.5)


MEASURES: tuple[Measure, ...] = (
    Measure("sat_frac", "gate sat. frac", "saturation", "optimisation", _path("model", "frac_logit_sat"),
            "fraction of gate logits with |z| > 3 over every gate (none: the model has no gate)"),
    Measure("grad_snr", "grad SNR", "gradvar", "optimisation", _path("aggregates", "snr"),
            "|mean gradient|^2 / trace of the mini-batch gradient covariance"),
    Measure("rel_update", "rel. update", "gradvar", "optimisation", _path("aggregates", "rel_update"),
            "lr x rms mini-batch gradient / weight norm: the step size relative to the weights"),
    Measure("lambda_max", "Hessian l_max", "hessian", "optimisation", _path("lambda_max"),
            "largest Hessian eigenvalue of the mean cross-entropy"),
    Measure("hessian_trace", "Hessian trace", "hessian", "optimisation", _path("trace", "estimate"),
            "Hutchinson estimate of the Hessian trace"),
    Measure("surface_rise", "surface rise", "surface", "optimisation", _rise,
            "mean loss rise over the |a|, |b| <= 0.5 square of a filter-normalised random plane"),
    Measure("ntk_cond", "NTK cond", "ntk", "generalisation", _path("spectrum", "condition_number"),
            "condition number of the trace NTK on the probe inputs"),
    Measure("ntk_eff_rank", "NTK eff. rank", "ntk", "generalisation", _path("spectrum", "effective_rank"),
            "effective rank (exp of the spectral entropy) of the trace NTK"),
    Measure("el_pred_mse", "EL pred. MSE", "ntk", "generalisation", _eigenlearning("predicted_test_mse"),
            "eigenlearning prediction of kernel regression's test MSE with the model's NTK"),
    Measure("el_meas_mse", "KRR meas. MSE", "ntk", "generalisation", _eigenlearning("measured_test_mse"),
            "measured test MSE of kernel regression with the same kernel"),
    Measure("path_deviation", "path deviation", "interp", "generalisation", _path("all", "deviation_max_mean"),
            "mean over mixup paths of the largest deviation of the logits from the chord (relative)"),
    Measure("path_degree", "path degree", "interp", "generalisation", _path("all", "degree_mean"),
            "mean Chebyshev degree that fits the logits along a mixup path"),
)

#: the probes the measures come from, in the order :func:`measure` runs them
PROBES: tuple[str, ...] = tuple(dict.fromkeys(m.probe for m in MEASURES))


def probe_settings(quick: bool) -> dict[str, tuple[dict, int]]:
    """``{probe: (params, n)}`` used by :func:`measure`: small settings for ``quick`` (CPU
    seconds per probe on the demo's models), the probes' defaults otherwise."""
    if quick:
        return {"saturation": ({}, 128), "gradvar": ({"batches": 4, "batch_size": 32, "seeds": 2}, 128),
                "hessian": ({"k": 2, "trace_matvecs": 20, "density": False}, 64),
                "surface": ({"grid": "-1:1:9"}, 128),
                "ntk": ({"trials": 4}, 32),
                "interp": ({"pairs": 32, "steps": 17, "max_degree": 8, "triples": 1, "plane_resolution": 15}, 128)}
    return {"saturation": ({}, 512), "gradvar": ({}, 512), "hessian": ({"k": 5, "trace_matvecs": 100}, 200),
            "surface": ({"grid": "-1:1:21"}, 256), "ntk": ({"trials": 10}, 128), "interp": ({}, 256)}


def stored_probe(store, run_id: str, epoch: int | None, name: str, params: dict, n: int, seed: int = 0) -> str | None:
    """The id of the newest stored ``name`` row of ``run_id`` at checkpoint ``epoch`` taken with
    the same options (the probe's defaults filled in), ``n`` and ``seed``; None when there is none."""
    from probe.probes.registry import get_probe, make_params, params_dict

    want = {**params_dict(make_params(get_probe(name).params, dict(params))), "n": n, "seed": seed}
    for row in reversed(store.list_probes(run_id=run_id, kind=name)):
        have = row.get("params") or {}
        if row.get("checkpoint_epoch") == epoch and all(have.get(k) == v for k, v in want.items()):
            return row["probe_id"]
    return None


def measure(store, run_id: str, *, checkpoint="last", quick: bool = False, probes=PROBES,
            done: dict[str, str] | None = None, reuse: bool = True, progress=None, log=None) -> dict[str, str]:
    """Run each of ``probes`` on ``run_id`` at ``checkpoint`` and return ``{probe: probe id}``;
    ``done`` gives probe ids already measured (kept, not rerun), and with ``reuse`` a row the
    store already holds for the same run, checkpoint and settings is taken instead of a new
    measurement. A probe that fails on this run is a :class:`UserError` naming the run and the
    probe."""
    from probe.jobs import run_probe

    say = log or (lambda line: None)
    settings = probe_settings(quick)
    ids = dict(done or {})
    epoch = store.latest_checkpoint(run_id) if checkpoint == "last" else (0 if checkpoint == "init" else checkpoint)
    for name in probes:
        if name in ids:
            continue
        params, n = settings[name]
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
    for m in MEASURES:
        if m.probe not in loaded:
            out[m.key] = None
            continue
        row, result = loaded[m.probe]
        out[m.key] = m.get(row["summary"], result)
    return out
