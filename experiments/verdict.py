"""The verdict table: for the seed's fusion variants, which probe measurements go with a variant's
accuracy gap to the additive baseline: optimisation measures (gate saturation, gradient SNR,
relative update size, Hessian lambda_max and trace, the loss surface's rise) or generalisation
measures (NTK condition number and effective rank, the eigenlearning prediction, smoothness along
mixup paths between real inputs).

Every variant of the fusion table's first protocol is probed at its last epoch with
:func:`probe.headline.measure`, every seed (three quick, five full), and each measure is the mean
over the seeds; each measure's Spearman correlation with the gap (mean best top-1 over seeds minus
the baseline's) is given over all variants and within each seed group of at least
five rows, with a bootstrap interval.

These measures are *descriptive*: taken after training, a measure can follow the gap rather than
cause it (the ``regimes`` experiment reports the *predictive* ones, taken at initialisation, apart).
Each rho is given with Holm's adjusted p-value over the measures tested together in its group.

Limits, stated with the numbers: correlation over one small architecture and data set, three or five
seeds of probes per variant, and groups of five to sixteen rows (wide intervals).
"""
from __future__ import annotations

import numpy as np

from ._common import Context, fmt, Outcome
from ._fusion import (accuracy_table, eval_train_accuracy, protocols, row_ids, seeds, spearman_ci,
                      train_table)
from probe.companions import load

NAME = "verdict"
TITLE = "Verdict: which probe measurements go with multiplication's accuracy gap"
DESCRIPTION = ("Every seed variant probed at its last epoch (saturation, gradient variance, Hessian, surface, "
               "NTK + eigenlearning, interpolation); Spearman correlation of each measure with the variant's "
               "accuracy gap to the additive baseline, over all variants and per seed group, 95% bootstrap CI.")

_MIN_GROUP = 5


def run(ctx: Context) -> Outcome:
    from .fusion_table import table_rows
    seed_fusion = load("models.seed_table").seed_fusion
    from probe.headline import MEASURES, headline, measure

    rows, protos, seed_list = row_ids(), protocols(ctx.quick), seeds(ctx.quick)
    runs = train_table(ctx, rows, protos, seed_list)           # the fusion table's runs, reused
    acc = accuracy_table(ctx, runs)
    table = {r["id"]: r for r in table_rows(acc, rows, protos, seed_list)}
    first = protos[0].name
    variants, probe_ids = [], []
    for i, row in enumerate(rows):
        per_seed = []
        for seed in seed_list:                                 # every seed probed: the measure is their mean
            rid = runs[(row, first, seed)]
            ids = measure(ctx.store, rid, quick=ctx.quick, log=ctx.log)
            probe_ids += list(ids.values())
            per_seed.append({**headline(ctx.store, ids), "train_eval_top1": eval_train_accuracy(ctx, rid),
                             "test_best": acc[(row, first, seed)]["best"]})
        variants.append({"id": row, "group": seed_fusion(row).group, "formula": seed_fusion(row).formula,
                         "run_id": runs[(row, first, seed_list[0])], "n_seeds": len(seed_list),
                         "gap": table[row][f"{first}.gap"], "best_mean": table[row][f"{first}.best_mean"],
                         "train_final_mean": table[row][f"{first}.train_final_mean"],
                         **seed_mean(per_seed, ["train_eval_top1", "test_best"] + [m.key for m in MEASURES])})
        if ctx.progress is not None:
            ctx.progress("verdict: probing variants", i + 1, len(rows))
    groups = ["all"] + [g for g in dict.fromkeys(v["group"] for v in variants)
                        if sum(v["group"] == g for v in variants) >= _MIN_GROUP]
    corr = correlations(variants, groups)
    found = _findings(corr, variants, first)
    ctx.store.save_finding(NAME, "correlations", {
        "kind": "correlations", "when": "trained",
        "title": f"Measures after training against the accuracy gap to bn(r) + s ({first}, descriptive; Spearman, "
                 f"Holm over the {len(MEASURES)} measures per group)",
        "rows": corr})                       # non-finite numbers are stored as missing
    return Outcome(_figures(corr, variants, groups), variants, sorted(set(runs.values())), probe_ids, found,
                   tables={"correlations": corr})


def seed_mean(per_seed: list[dict], keys: list[str]) -> dict:
    """``{key: mean over seeds}`` of ``per_seed`` (one dict per seed), skipping a seed whose value
    is missing or not finite; None where no seed has one."""
    out = {}
    for k in keys:
        vals = [float(d[k]) for d in per_seed if d.get(k) is not None and np.isfinite(float(d[k]))]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def correlations(variants: list[dict], groups: list[str]) -> list[dict]:
    """Spearman's rho of every measure with the gap per group, with its bootstrap interval, its
    p-value and Holm's adjusted p-value over the measures tested together in that group."""
    from ._regimes import holm, spearman_p
    from probe.headline import MEASURES

    corr = []
    for g in groups:
        mine = [v for v in variants if g == "all" or v["group"] == g]
        rows = []
        for m in MEASURES:
            x = [v[m.key] if v[m.key] is not None else np.nan for v in mine]
            y = [v["gap"] for v in mine]
            rows.append({"measure": m.key, "label": m.label, "kind": m.kind, "group": g, **spearman_ci(x, y),
                         "p": spearman_p(x, y)["p"]})
        for r, adj in zip(rows, holm([r["p"] for r in rows])):
            r["p_holm"] = adj
        corr += rows
    order = {m.key: i for i, m in enumerate(MEASURES)}
    return sorted(corr, key=lambda c: order[c["measure"]])


def split_gap(variants: list[dict], baseline: str = "fmm01", train_key: str = "train_eval_top1") -> dict:
    """The test gap of the variants at least 5 points behind the baseline (best test top-1, mean
    over seeds, minus the baseline's), split into a training part (their ``train_key`` accuracy minus the
    baseline's: eval-mode top-1 on the training samples by default, the per-epoch train-mode top-1
    with ``train_final_mean``) and the rest (a larger generalisation gap): the direct reading of
    optimisation against generalisation."""
    base = next((v for v in variants if v["id"] == baseline), None)
    if base is None:
        return {"n_behind": 0}
    behind = [v for v in variants if v["test_best"] - base["test_best"] <= -5]
    train = np.array([v[train_key] - base[train_key] for v in behind])
    test = np.array([v["test_best"] - base["test_best"] for v in behind])
    return {"n_behind": len(behind), "test_gap_mean": float(test.mean()) if len(test) else None,
            "train_gap_mean": float(train.mean()) if len(train) else None,
            "train_share": float(train.sum() / test.sum()) if len(test) and test.sum() != 0 else None,
            "baseline_train": base[train_key], "ids": [v["id"] for v in behind]}


def _findings(corr: list[dict], variants: list[dict], protocol: str) -> list[str]:
    gaps = np.array([v["gap"] for v in variants])
    found = [f"{len(variants)} variants under {protocol}: gap to the baseline median {np.median(gaps):.1f} points "
             f"(min {gaps.min():.1f}, max {gaps.max():.1f})"]
    split = split_gap(variants)
    if split["n_behind"]:
        mode = split_gap(variants, train_key="train_final_mean")
        found.append(f"{split['n_behind']} variants at least 5 points behind on test, mean over "
                     f"{variants[0].get('n_seeds', 1)} seeds "
                     f"({', '.join(split['ids'])}): test gap {fmt(split['test_gap_mean'], '.1f')} points on average, "
                     f"of which their fit of the training samples (eval mode, as at test time) accounts for "
                     f"{fmt(split['train_gap_mean'], '.1f')} (share {fmt(split['train_share'], '.2f')}; baseline "
                     f"{fmt(split['baseline_train'], '.1f')}%) and their train-mode top-1 of the last epoch for "
                     f"{fmt(mode['train_gap_mean'], '.1f')} (share {fmt(mode['train_share'], '.2f')}): a share near "
                     f"1 is a failure to fit (optimisation), near 0 a failure to generalise; eval mode below train "
                     f"mode is BatchNorm's running statistics failing the network")
    overall = [c for c in corr if c["group"] == "all"]
    for c in overall:
        sig = np.isfinite(c["lo"]) and (c["lo"] > 0 or c["hi"] < 0)
        found.append(f"{c['kind']:<14} {c['label']:<15} rho {fmt(c['rho'], '+.2f')} [{fmt(c['lo'], '+.2f')}, "
                     f"{fmt(c['hi'], '+.2f')}] p_holm {fmt(c['p_holm'], '.2g')} n={c['n']}"
                     f"{'  (interval excludes 0)' if sig else ''}")
    for kind in ("optimisation", "generalisation"):
        mine = [c for c in overall if c["kind"] == kind and np.isfinite(c["rho"])]
        strong = [c["label"] for c in mine if c["lo"] > 0 or c["hi"] < 0]
        found.append(f"{kind}: mean |rho| {np.mean([abs(c['rho']) for c in mine]):.2f} over {len(mine)} measures; "
                     f"intervals excluding 0: {', '.join(strong) or 'none'}")
    return found


def _figures(corr: list[dict], variants: list[dict], groups: list[str]) -> dict:
    import plotly.graph_objects as go

    labels = list(dict.fromkeys(f"{c['kind'][:3]}. {c['label']}" for c in corr))
    z = [[next(c["rho"] for c in corr if f"{c['kind'][:3]}. {c['label']}" == lab and c["group"] == g)
          for g in groups] for lab in labels]
    text = [[next(f"{c['rho']:+.2f}<br>[{c['lo']:+.2f}, {c['hi']:+.2f}]" if np.isfinite(c["rho"]) else "n/a"
                  for c in corr if f"{c['kind'][:3]}. {c['label']}" == lab and c["group"] == g)
             for g in groups] for lab in labels]
    heat = go.Figure(go.Heatmap(z=z, x=groups, y=labels, text=text, texttemplate="%{text}", zmin=-1, zmax=1,
                                colorscale="RdBu", colorbar={"title": "Spearman rho"}))
    heat.update_layout(title="Spearman rho of each measure with the accuracy gap to bn(r) + s (95% bootstrap CI)",
                       xaxis_title="seed group (n >= 5 rows) or all", template="plotly_white", height=600)
    return {"verdict": heat}
