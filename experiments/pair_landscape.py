"""(f) 2D weight-space loss landscapes of the comparison pair: filter-normalised random planes
(Li et al.) around each trained model, with the diagnostics that make them comparable."""
from __future__ import annotations

from ._common import Context, fmt, Outcome, pair_runs, probe_figures, probe_rows

NAME = "pair_landscape"
TITLE = "2D loss landscapes, add vs mul"
DESCRIPTION = ("probe surface (random filter-normalised directions, seed 123, biases and BN held fixed) at "
               "the last epoch of add_resnet and mul_resnet; the loss rise over the plane as a sharpness number.")


def run(ctx: Context) -> Outcome:
    runs = pair_runs(ctx)
    params = {"grid": "-1:1:11" if ctx.quick else "-1:1:51"}
    entries, rows, ids = probe_rows(ctx, "surface", params, runs, n=128 if ctx.quick else 256)
    for row, (_, result) in zip(rows, entries):
        # the mean rise of the loss over the |a|, |b| <= 0.5 square: a sharpness number per model
        row["rise_half"] = result.mean_rise(0.5)
    figures = probe_figures("surface", entries, "contours")
    found = [f"{r['model']}: centre loss {fmt(r['centre_loss'])}, mean rise over |a|,|b| <= 0.5 "
             f"{fmt(r.get('rise_half'))}, max over the plane {fmt(r.get('loss_scale.max'))}" for r in rows]
    return Outcome(figures, rows, list(runs.values()), ids, found)
