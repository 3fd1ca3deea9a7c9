"""(a) The seed's fusion table re-run: all 59 rows trained under one protocol on digits, several
seeds, side by side with the seed's Caltech-101 accuracies, with Spearman's rank correlation and a
bootstrap interval, under protocols of increasing training budget (how the correlation depends on
the protocol)."""
from __future__ import annotations

import numpy as np

from ._common import Context, fmt, Outcome
from ._fusion import (BASELINE, accuracy_table, protocols, row_ids, seeds, spearman_ci,
                      train_table)
from probe.companions import load

NAME = "fusion_table"
TITLE = "The seed's 59 fusion variants on digits vs their Caltech-101 accuracy"
DESCRIPTION = ("Every seed row (WRN-10-2, the seed's block) trained on digits under each protocol and seed; "
               "mean best test top-1 per row against the seed's Caltech-101 number, Spearman's rho with a "
               "95% bootstrap interval per protocol.")


def table_rows(acc: dict, rows: list[str], protos, seed_list) -> list[dict]:
    """One dict per seed row: its id, group, formula, the seed's number and, per protocol, the
    mean / sd of the best and final test top-1 and the mean last-epoch train top-1 over seeds, and
    the gap of the mean best to the baseline row."""
    seed_fusion = load("models.seed_table").seed_fusion

    out = []
    for row in rows:
        info = seed_fusion(row)
        rec = {"id": row, "group": info.group, "formula": info.formula, "fusion": info.name,
               "caltech101_top1": info.caltech101_top1}
        for p in protos:
            best = np.array([acc[(row, p.name, s)]["best"] for s in seed_list], dtype=np.float64)
            final = np.array([acc[(row, p.name, s)]["final"] for s in seed_list], dtype=np.float64)
            base = np.array([acc[(BASELINE, p.name, s)]["best"] for s in seed_list], dtype=np.float64)
            rec[f"{p.name}.best_mean"] = float(np.mean(best))
            rec[f"{p.name}.best_sd"] = float(np.std(best, ddof=1)) if len(best) > 1 else None
            rec[f"{p.name}.final_mean"] = float(np.mean(final))
            rec[f"{p.name}.train_final_mean"] = float(np.mean([acc[(row, p.name, s)]["train_final"] for s in seed_list]))
            rec[f"{p.name}.gap"] = float(np.mean(best) - np.mean(base))
        out.append(rec)
    return out


def correlations(table: list[dict], protos) -> list[dict]:
    """Spearman's rho of the digits mean best top-1 against the seed's Caltech-101 number, per
    protocol, with its interval, the baseline's digits accuracy and the spread of the rows."""
    caltech = [r["caltech101_top1"] for r in table]
    out = []
    for p in protos:
        digits = [r[f"{p.name}.best_mean"] for r in table]
        ci = spearman_ci(digits, caltech)
        base = next(r[f"{p.name}.best_mean"] for r in table if r["id"] == BASELINE)
        out.append({"protocol": p.name, "why": p.why, **ci, "baseline_best": base,
                    "rows_min": float(np.min(digits)), "rows_median": float(np.median(digits))})
    return out


def _figures(table: list[dict], corr: list[dict], protos) -> dict:
    import plotly.graph_objects as go

    figs = {}
    groups = list(dict.fromkeys(r["group"] for r in table))
    for p, c in zip(protos, corr):
        fig = go.Figure()
        for g in groups:
            mine = [r for r in table if r["group"] == g]
            fig.add_trace(go.Scatter(
                x=[r["caltech101_top1"] for r in mine], y=[r[f"{p.name}.best_mean"] for r in mine],
                error_y={"type": "data", "array": [r[f"{p.name}.best_sd"] or 0 for r in mine]},
                mode="markers", name=g, text=[f"{r['id']}: {r['formula']}" for r in mine],
                hovertemplate="%{text}<br>Caltech-101 %{x:.2f}%<br>digits %{y:.2f}%<extra></extra>"))
        fig.update_layout(title=f"{p.name}: digits vs Caltech-101 per seed row (Spearman rho {c['rho']:.2f}, "
                                f"95% CI [{c['lo']:.2f}, {c['hi']:.2f}], n={c['n']})",
                          xaxis_title="seed's Caltech-101 best top-1 (%)",
                          yaxis_title="digits best top-1 (%), mean over seeds (+- sd)", template="plotly_white")
        figs[f"scatter_{p.name.replace('-', '_')}"] = fig
    fig = go.Figure(go.Scatter(
        x=[c["protocol"] for c in corr], y=[c["rho"] for c in corr], mode="markers+lines",
        error_y={"type": "data", "symmetric": False, "array": [c["hi"] - c["rho"] for c in corr],
                 "arrayminus": [c["rho"] - c["lo"] for c in corr]},
        text=[f"baseline {c['baseline_best']:.1f}%" for c in corr]))
    fig.update_layout(title="Rank correlation with the seed's table, by protocol (95% bootstrap CI)",
                      yaxis_title="Spearman rho", xaxis_title="protocol (increasing training budget)",
                      template="plotly_white")
    figs["rho_by_protocol"] = fig
    return figs


def run(ctx: Context) -> Outcome:
    rows, protos, seed_list = row_ids(), protocols(ctx.quick), seeds(ctx.quick)
    runs = train_table(ctx, rows, protos, seed_list)
    acc = accuracy_table(ctx, runs)
    table = table_rows(acc, rows, protos, seed_list)
    corr = correlations(table, protos)
    found = []
    for c in corr:
        found.append(f"{c['protocol']} ({c['why']}): baseline fmm01 {fmt(c['baseline_best'], '.1f')}%, rows "
                     f"median {fmt(c['rows_median'], '.1f')}% (min {fmt(c['rows_min'], '.1f')}%); Spearman rho "
                     f"with the seed's Caltech-101 column {fmt(c['rho'], '.2f')} [95% CI {fmt(c['lo'], '.2f')}, "
                     f"{fmt(c['hi'], '.2f')}] over {c['n']} rows, {len(seed_list)} seeds")
    worst = sorted(table, key=lambda r: r[f"{protos[0].name}.best_mean"])[:3]
    found.append(f"lowest under {protos[0].name}: " + "; ".join(
        f"{r['id']} {r['formula']} {fmt(r[protos[0].name + '.best_mean'], '.1f')}% (Caltech {r['caltech101_top1']})"
        for r in worst))
    for p, c in zip(protos, corr):
        ctx.store.save_finding(NAME, f"seed_table_{p.name}", seed_table_finding(table, p, c, len(seed_list)))
    return Outcome(_figures(table, corr, protos), table, sorted(set(runs.values())), [], found,
                   tables={"correlations": corr})


def seed_table_finding(table: list[dict], protocol, corr: dict, n_seeds: int) -> dict:
    """The stored finding of one protocol (kind ``seed_table``): each row's seed Caltech-101
    accuracy next to its reproduced mean best top-1, with Spearman's rho and its interval."""
    import math

    def num(v):
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    return {"kind": "seed_table", "protocol": protocol.name, "rho": num(corr["rho"]), "lo": num(corr["lo"]),
            "hi": num(corr["hi"]), "n": int(corr["n"]),
            "title": f"The seed's Caltech-101 column against {protocol.data} ({protocol.name}: {protocol.why})",
            "rows": [{"id": r["id"], "formula": r["formula"], "group": r["group"], "caltech": num(r["caltech101_top1"]),
                      "acc_mean": num(r[f"{protocol.name}.best_mean"]), "acc_sd": num(r[f"{protocol.name}.best_sd"]),
                      "n_seeds": n_seeds} for r in table]}
