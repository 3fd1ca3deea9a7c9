"""(h) The seed author's conclusions, each tested on the fusion table's runs, and (b) gate
saturation per variant and across training.

Each conclusion is a change to a fusion spec ("pin the shortcut BN's bias to 1", "put a BN
before the residual sigmoid", ...). Its pairs are every two seed rows that differ by exactly that
change; the test is the mean paired difference of digits best top-1 (changed minus unchanged)
with a bootstrap interval over pairs and seeds, per protocol, next to the same difference in the
seed's Caltech-101 column. "Without BN the sigmoids saturate" is tested on the saturation probe:
the fraction of gate logits with |z| > 3, without minus with the BN, at the last epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ._common import Context, fmt, last_entries, Outcome, probe_figures, probe_rows
from ._fusion import accuracy_table, paired_ci, protocols, row_ids, seeds, train_table
from probe.companions import load

NAME = "seed_conclusions"
TITLE = "The seed author's conclusions, tested; gate saturation per variant and across training"
DESCRIPTION = ("Paired differences of digits accuracy between seed rows that differ by one change (shortcut "
               "mean 1, BN before the residual sigmoid, zero-mean BN, pinned BN weight, sigmoid on the shortcut "
               "instead of the residual) with bootstrap intervals; saturation of every gated row with and "
               "without BN before its sigmoids, and across training for sig(s) * sig(r) vs sig(bn s) * sig(bn r).")


@dataclass(frozen=True)
class Conclusion:
    """A claim as a spec change: ``change(spec)`` the changed specs (none where it does not
    apply); ``expect`` +1 when the change should raise accuracy (or, with ``measure``
    "saturation", the saturated fraction), -1 when it should lower it."""

    key: str
    claim: str
    change: Callable
    expect: int
    measure: str = "accuracy"


def _fixed(v: float):
    ParamMode = load("models.fusion").ParamMode

    return ParamMode("fixed", v)


def _shortcut_mean_one(spec):
    s = spec.s
    if spec.op == "mul" and s.norm == "bn" and s.act == "identity" and s.bias.mode == "learn":
        return [replace(spec, s=replace(s, bias=_fixed(1.0)))]
    return []


def _bn_before_residual_sigmoid(spec):
    r = spec.r
    if r.act == "sigmoid" and r.norm == "none":
        return [replace(spec, r=replace(r, norm="bn"))]
    return []


def _zero_mean_bn(spec):
    r = spec.r
    if r.act == "sigmoid" and r.norm == "bn" and r.bias.mode == "learn":
        return [replace(spec, r=replace(r, bias=_fixed(0.0)))]
    return []


def _pin_weight(spec):
    return [replace(spec, **{side: replace(getattr(spec, side), weight=_fixed(1.0))}) for side in ("r", "s")
            if getattr(spec, side).norm == "bn" and getattr(spec, side).weight.mode == "learn"]


def _sigmoid_to_shortcut(spec):
    if spec.op == "mul" and spec.r.act == "sigmoid" and spec.s.act == "identity":
        return [replace(spec, r=spec.s, s=spec.r)]
    return []


def _no_bn_before_sigmoid(spec):
    """BN removed before every sigmoid that has one: the 'without BN' side of the saturation claim."""
    changed = spec
    for side in ("r", "s"):
        b = getattr(changed, side)
        if b.act == "sigmoid" and b.norm == "bn" and b.weight.mode == "learn" and b.bias.mode == "learn":
            changed = replace(changed, **{side: replace(b, norm="none")})
    return [changed] if changed != spec else []


CONCLUSIONS = (
    Conclusion("shortcut_mean_1", "a shortcut mean of 1 helps (shortcut BN bias pinned to 1)", _shortcut_mean_one, +1),
    Conclusion("bn_before_sigmoid", "BN before the residual sigmoid helps", _bn_before_residual_sigmoid, +1),
    Conclusion("zero_mean_bn", "a zero-mean BN before the residual sigmoid helps more (bias pinned to 0)",
               _zero_mean_bn, +1),
    Conclusion("pin_bn_weight", "pinning a BN weight to 1 hurts", _pin_weight, -1),
    Conclusion("sigmoid_on_shortcut", "the sigmoid on the shortcut beats the sigmoid on the residual",
               _sigmoid_to_shortcut, +1),
    Conclusion("no_bn_saturates", "without BN the sigmoids saturate", _no_bn_before_sigmoid, +1,
               measure="saturation"),
)

def pairs(conclusion: Conclusion) -> list[tuple[str, str]]:
    """(unchanged row, changed row) for every seed row whose changed spec is another seed row."""
    SEED_FUSIONS = load("models.seed_table").SEED_FUSIONS

    by_spec = {row.spec: row.id for row in SEED_FUSIONS}
    out = []
    for row in SEED_FUSIONS:
        for changed in conclusion.change(row.spec):
            if by_spec.get(changed) not in (None, row.id):
                out.append((row.id, by_spec[changed]))
    return out


def _verdict(ci: dict, expect: int) -> str:
    lo, hi = sorted((expect * ci["lo"], expect * ci["hi"]))
    if not np.isfinite(lo):
        return "no pairs"
    return "supported" if lo > 0 else "contradicted" if hi < 0 else "not resolved"


def run(ctx: Context) -> Outcome:
    seed_fusion = load("models.seed_table").seed_fusion

    rows, protos, seed_list = row_ids(), protocols(ctx.quick), seeds(ctx.quick)
    runs = train_table(ctx, rows, protos, seed_list)          # the fusion table's runs, reused
    acc = accuracy_table(ctx, runs)
    table, found, probe_ids = [], [], []
    # saturation of every gated row at the last epoch, seed 0 of the first protocol: (b)
    first = protos[0].name
    gated = [r for r in rows if "sig" in seed_fusion(r).name or "gate=" in seed_fusion(r).name]
    sat_runs = {r: runs[(r, first, seed_list[0])] for r in gated}
    _, sat_rows, ids = probe_rows(ctx, "saturation", {}, sat_runs, n=256)
    probe_ids += ids
    sat = {}
    for (row, _), rec in zip(sat_runs.items(), sat_rows):
        sat[row] = rec.get("model.frac_logit_sat")
        rec["id"] = row
    trained = set(rows)
    for c in CONCLUSIONS:
        ps = [(a, b) for a, b in pairs(c) if a in trained and b in trained]
        for p in (protos if c.measure == "accuracy" else protos[:1]):
            if c.measure == "accuracy":
                diffs = np.array([[acc[(b, p.name, s)]["best"] - acc[(a, p.name, s)]["best"] for s in seed_list]
                                  for a, b in ps], dtype=np.float64).reshape(len(ps), len(seed_list))
                unit = "points of top-1"
            else:
                diffs = np.array([[(sat.get(b) if sat.get(b) is not None else np.nan)
                                   - (sat.get(a) if sat.get(a) is not None else np.nan)] for a, b in ps],
                                 dtype=np.float64).reshape(len(ps), 1)
                unit = "saturated fraction"
            ci = paired_ci(diffs)
            caltech = [seed_fusion(b).caltech101_top1 - seed_fusion(a).caltech101_top1 for a, b in ps]
            cal_mean = float(np.mean(caltech)) if caltech else None
            verdict = _verdict(ci, c.expect)
            seed_agrees = None if cal_mean is None or c.measure != "accuracy" else bool(c.expect * cal_mean > 0)
            table.append({"conclusion": c.key, "claim": c.claim, "measure": c.measure, "protocol": p.name,
                          "pairs": " ".join(f"{a}->{b}" for a, b in ps), "n_pairs": len(ps), "expect": c.expect,
                          "mean_diff": ci["mean"], "ci_lo": ci["lo"], "ci_hi": ci["hi"], "verdict": verdict,
                          "caltech_mean_diff": cal_mean, "caltech_agrees": seed_agrees})
            found.append(f"{c.claim} [{p.name}]: changed - unchanged = {fmt(ci['mean'], '.3g')} {unit} "
                         f"[95% CI {fmt(ci['lo'], '.3g')}, {fmt(ci['hi'], '.3g')}] over {len(ps)} pairs -> "
                         f"{verdict}" + (f"; seed's Caltech-101 difference {fmt(cal_mean, '.2f')}"
                                         if c.measure == "accuracy" and cal_mean is not None else ""))
    # across training: the no-BN sigmoid pair sig(s) * sig(r) against sig(bn s) * sig(bn r)
    across_rows = [r for r in ("fmm25", "fmm38") if r in trained]
    across_runs = {f"{r} {seed_fusion(r).formula}": runs[(r, first, seed_list[0])] for r in across_rows}
    entries, across, ids = probe_rows(ctx, "saturation", {}, across_runs, checkpoint="all", n=256)
    probe_ids += ids
    for model in across_runs:
        mine = sorted((r for r in across if r["model"] == model), key=lambda r: r.get("epoch") or 0)
        found.append(f"saturation across training, {model}: " + ", ".join(
            f"epoch {r.get('epoch') or 0} {fmt(r.get('model.frac_logit_sat'), '.3f')}" for r in mine))
    per_variant = [{"id": r["id"], "group": seed_fusion(r["id"]).group, "formula": seed_fusion(r["id"]).formula,
                    "n_gates": r.get("n_gates"), "frac_logit_sat": r.get("model.frac_logit_sat"),
                    "frac_output_sat": r.get("model.frac_output_sat"), "gain": r.get("model.gain"),
                    "probe_id": r["probe_id"]} for r in sat_rows]
    figures = _figure(table)
    figures["saturation_per_variant"] = _saturation_figure(per_variant, first)
    if entries:
        figures.update(probe_figures("saturation", last_entries(entries), "saturation_last", across=entries))
    return Outcome(figures, table, sorted(set(runs.values())), probe_ids, found, tables={"saturation": per_variant})


def _saturation_figure(per_variant: list[dict], protocol: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    for group in dict.fromkeys(r["group"] for r in per_variant):
        mine = [r for r in per_variant if r["group"] == group and r["frac_logit_sat"] is not None]
        fig.add_trace(go.Bar(x=[f"{r['id']} {r['formula']}" for r in mine], y=[r["frac_logit_sat"] for r in mine],
                             name=group, customdata=[r["gain"] for r in mine],
                             hovertemplate="%{x}<br>|z| > 3: %{y:.4f}<br>mean gain %{customdata:.3f}<extra></extra>"))
    fig.update_layout(title=f"Gate saturation per seed variant at the last epoch ({protocol}, seed 0): fraction of "
                            f"gate logits with |z| > 3", yaxis_title="saturated fraction", template="plotly_white",
                      xaxis_tickangle=-60, height=650)
    return fig


def _figure(table: list[dict]) -> dict:
    import plotly.graph_objects as go

    fig = go.Figure()
    for proto in dict.fromkeys(r["protocol"] for r in table if r["measure"] == "accuracy"):
        mine = [r for r in table if r["protocol"] == proto and r["measure"] == "accuracy"]
        fig.add_trace(go.Scatter(
            y=[r["claim"] for r in mine], x=[r["mean_diff"] for r in mine], mode="markers", name=proto,
            error_x={"type": "data", "symmetric": False, "array": [r["ci_hi"] - r["mean_diff"] for r in mine],
                     "arrayminus": [r["mean_diff"] - r["ci_lo"] for r in mine]}))
    cal = [r for r in table if r["measure"] == "accuracy" and r["caltech_mean_diff"] is not None]
    seen = {}
    for r in cal:
        seen.setdefault(r["claim"], r["caltech_mean_diff"])
    fig.add_trace(go.Scatter(y=list(seen), x=list(seen.values()), mode="markers", name="seed, Caltech-101",
                             marker={"symbol": "x", "size": 10}))
    fig.add_vline(x=0, line_dash="dot")
    fig.update_layout(title="The seed's conclusions: changed minus unchanged top-1 over paired rows (95% CI)",
                      xaxis_title="difference in best top-1 (points)", template="plotly_white",
                      margin={"l": 380})
    return {"conclusions": fig}
