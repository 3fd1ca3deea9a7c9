"""Scripted experiments: one module per figure or table, each regenerating its outputs from the
run store into ``experiments/out/<name>/`` (``python -m experiments --help``).

Every experiment uses the probes through the public API (:func:`probe.jobs.run_probe`) and the
store; nothing here re-implements a measurement.
"""
from __future__ import annotations

from . import (fusion_table, pair_gradvar, pair_hessian, pair_interp, pair_landscape, pair_ntk, regimes,
               seed_conclusions, verdict)

__all__ = ["EXPERIMENTS", "run_experiment"]

#: name -> module (NAME, TITLE, DESCRIPTION, run(ctx)), in the order ``all`` runs them.
EXPERIMENTS = {m.NAME: m for m in (fusion_table, seed_conclusions, verdict, regimes, pair_gradvar, pair_ntk,
                                    pair_hessian, pair_landscape, pair_interp)}


def run_experiment(ctx, name: str, *, force: bool = False) -> dict:
    """Run one experiment (skipped when its outputs are done for this setting, unless ``force``);
    returns ``{"name", "skipped", "folder", "wall_s", "found"}``."""
    import json
    import time

    from ._common import is_done, write_outputs
    from probe import UserError

    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose from: {', '.join(EXPERIMENTS)} or all")
    folder = ctx.out / name
    if not force and is_done(ctx, name):
        done = json.loads((folder / "done.json").read_text())
        return {"name": name, "skipped": True, "folder": str(folder), "wall_s": done.get("wall_s"),
                "found": done.get("found", [])}
    module = EXPERIMENTS[name]
    t0 = time.perf_counter()
    outcome = module.run(ctx)
    wall = time.perf_counter() - t0
    write_outputs(ctx, name, module.TITLE, outcome, wall)
    return {"name": name, "skipped": False, "folder": str(folder), "wall_s": wall, "found": outcome.found}
