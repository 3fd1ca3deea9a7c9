"""(c) Gradient noise and update size of the comparison pair at initialisation and after
training: gradient SNR, relative update size per step."""
from __future__ import annotations

from ._common import Context, fmt, Outcome, pair_runs, probe_figures, probe_rows

NAME = "pair_gradvar"
TITLE = "Gradient variance and relative update size, add vs mul"
DESCRIPTION = ("probe gradvar at init and at the last epoch of add_resnet and mul_resnet: gradient norm, "
               "trace of the gradient covariance, SNR, relative update size.")


def run(ctx: Context) -> Outcome:
    runs = pair_runs(ctx)
    params = {"batches": 4, "batch_size": 16, "seeds": 2} if ctx.quick else {}
    entries, rows, ids = [], [], []
    for when in ("init", "last"):
        e, r, i = probe_rows(ctx, "gradvar", params, runs, checkpoint=when, n=128 if ctx.quick else 512)
        for row in r:
            row["when"] = when
        entries, rows, ids = entries + e, rows + r, ids + i
    figures = probe_figures("gradvar", entries, "gradvar")
    found = [f"{r['model']} {r['when']}: SNR {fmt(r.get('aggregates.snr'))}, relative update "
             f"{fmt(r.get('aggregates.rel_update'))}, gradient norm {fmt(r.get('aggregates.grad_norm'))}" for r in rows]
    return Outcome(figures, rows, list(runs.values()), ids, found)
