"""(g) Input-space interpolation for the comparison pair (the FMMNet smoothness claim): outputs
along mixup paths between test samples, across training."""
from __future__ import annotations

from ._common import Context, fmt, last_entries, Outcome, pair_runs, probe_figures, probe_rows

NAME = "pair_interp"
TITLE = "Input-space interpolation, add vs mul"
DESCRIPTION = ("probe interp at every checkpoint of add_resnet and mul_resnet: deviation of the logits from "
               "the chord between the end outputs, fitted polynomial degree, extra class changes, loss barrier.")


def run(ctx: Context) -> Outcome:
    runs = pair_runs(ctx)
    params = ({"pairs": 32, "steps": 17, "max_degree": 8, "triples": 2, "plane_resolution": 21} if ctx.quick
              else {})
    entries, rows, ids = probe_rows(ctx, "interp", params, runs, checkpoint="all", n=128 if ctx.quick else 256)
    figures = probe_figures("interp", last_entries(entries), "paths", across=entries)
    found = []
    for model, rid in runs.items():
        mine = sorted((r for r in rows if r["run_id"] == rid), key=lambda r: r.get("epoch") or 0)
        if mine:
            r = mine[-1]
            found.append(f"{model} epoch {r['epoch']}: max deviation from linear (mean over paths) same-class "
                         f"{fmt(r.get('same_class.deviation_max_mean'))}, different-class "
                         f"{fmt(r.get('different_class.deviation_max_mean'))}; mean degree "
                         f"{fmt(r.get('all.degree_mean'))}; extra class change "
                         f"{fmt(r.get('all.extra_change_fraction'))}")
    return Outcome(figures, rows, list(runs.values()), ids, found)
