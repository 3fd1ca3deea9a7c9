"""(e) Sharpness across training for the comparison pair: Hessian top eigenvalue, trace and
density at every checkpoint, lambda_max against the edge-of-stability line 2/lr."""
from __future__ import annotations

from ._common import Context, fmt, last_entries, Outcome, pair_runs, probe_figures, probe_rows

NAME = "pair_hessian"
TITLE = "Hessian lambda_max, trace and sharpness across training, add vs mul"
DESCRIPTION = ("probe hessian at every checkpoint of add_resnet and mul_resnet: the top eigenvalues, the "
               "Hutch++ trace with its standard error and the SLQ density; lambda_max against 2/lr.")


def run(ctx: Context) -> Outcome:
    runs = pair_runs(ctx)
    params = ({"k": 3, "trace_matvecs": 30, "density_probes": 1, "density_steps": 20} if ctx.quick
              else {"k": 5, "trace_matvecs": 100})
    entries, rows, ids = probe_rows(ctx, "hessian", params, runs, checkpoint="all", n=64 if ctx.quick else 200)
    for row in rows:
        lr = row.get("lr")
        row["two_over_lr"] = 2.0 / lr if lr else None
    figures = probe_figures("hessian", last_entries(entries), "spectrum", across=entries)
    found = []
    for model in runs:
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r.get("epoch") or 0)
        if mine:
            first, last = mine[0], mine[-1]
            found.append(f"{model}: lambda_max {fmt(first['lambda_max'])} at epoch {first['epoch']} -> "
                         f"{fmt(last['lambda_max'])} at epoch {last['epoch']} (2/lr there "
                         f"{fmt(last.get('two_over_lr'))}); trace {fmt(last.get('trace.estimate'))} +- "
                         f"{fmt(last.get('trace.stderr'))}")
    return Outcome(figures, rows, list(runs.values()), ids, found)
