"""(d) NTK spectra of the comparison pair at initialisation and after training, and the
eigenlearning prediction of kernel regression's test error next to the measured one."""
from __future__ import annotations

from ._common import Context, fmt, Outcome, pair_runs, probe_figures, probe_rows

NAME = "pair_ntk"
TITLE = "NTK spectra, add vs mul, and eigenlearning predicted vs measured"
DESCRIPTION = ("Empirical NTK (trace kernel) of add_resnet and mul_resnet at init and at the last epoch: "
               "lambda_max, condition number, effective rank, and the eigenlearning prediction of kernel "
               "regression's test MSE against the measured one.")


def _eigenlearning(summary: dict) -> dict:
    rows = (summary.get("eigenlearning") or {}).get("rows") or []
    last = rows[-1] if rows else {}
    return {"el_n": last.get("n"), "el_predicted_mse": last.get("predicted_test_mse"),
            "el_measured_mse": last.get("measured_test_mse")}


def run(ctx: Context) -> Outcome:
    runs = pair_runs(ctx)
    n = 32 if ctx.quick else 128
    entries, rows, ids = [], [], []
    for when in ("init", "last"):
        e, r, i = probe_rows(ctx, "ntk", {"trials": 4 if ctx.quick else 10}, runs, checkpoint=when, n=n)
        for row, (_, result) in zip(r, e):
            row["when"] = when
            row.update(_eigenlearning(result.summary()))
        entries += e
        rows += r
        ids += i
    figures = probe_figures("ntk", entries, "spectra", across=entries)
    found = []
    for row in rows:
        found.append(f"{row['model']} {row['when']}: lambda_max {fmt(row.get('spectrum.lambda_max'))}, condition "
                     f"number {fmt(row.get('spectrum.condition_number'), '.3g')}, effective rank "
                     f"{fmt(row.get('spectrum.effective_rank'), '.3g')}; eigenlearning MSE predicted "
                     f"{fmt(row.get('el_predicted_mse'))} vs measured {fmt(row.get('el_measured_mse'))}")
    return Outcome(figures, rows, list(runs.values()), ids, found)
