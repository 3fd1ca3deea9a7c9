"""The main job: train ``add_resnet`` and ``mul_resnet`` on the embedded digits data and compare.

Run by ``make demo`` / ``probe demo``. Every result lands in the run store, so the explorer and
the experiment scripts can read it back.
"""
from __future__ import annotations

import sys
import time

from probe._cli_util import format_table
from probe.train import TrainConfig, train

__all__ = ["DEMO_MODELS", "demo_config", "run_demo"]

DEMO_MODELS = ("add_resnet", "mul_resnet")


def demo_config(model: str, *, quick: bool = False, epochs: int | None = None) -> TrainConfig:
    """The demo recipe: digits, SGD(0.9) lr 0.05 cosine, wd 5e-4, batch 64, seed 0, CPU or CUDA."""
    return TrainConfig(model=model, data="digits", epochs=epochs or (2 if quick else 12), batch_size=64, lr=0.05,
                       momentum=0.9, weight_decay=5e-4, schedule="cosine", seed=0,
                       limit_train=512 if quick else None)


def run_demo(runs: str | None = None, *, quick: bool = False, quiet: bool = False,
             epochs: int | None = None) -> dict:
    from probe.store import RunStore

    store = RunStore(runs)
    t0 = time.perf_counter()
    rows = []
    for name in DEMO_MODELS:
        if not quiet:
            print(f"== training {name} on digits ==", file=sys.stderr)
        result = train(demo_config(name, quick=quick, epochs=epochs), store, quiet=quiet)
        run = store.get_run(result.run_id)
        rows.append({"model": name, "run_id": result.run_id,
                     "fusion": run["config"]["resolved"]["model"]["kwargs"].get("fusion")
                     or ("add,r=bn,s=id" if name == "add_resnet" else "mul,r=bn@b=init:1,s=bn@b=init:1"),
                     "best_acc": result.best_acc, "best_epoch": result.best_epoch, "final_acc": result.final_acc,
                     "train_time_s": result.train_time_s})
    table = format_table(rows, [("model", "model"), ("best_acc", "best top-1"), ("best_epoch", "at epoch"),
                                ("final_acc", "final top-1"), ("train_time_s", "train s"), ("run_id", "run")],
                         floatfmt="{:.2f}")
    text = (f"add vs mul residual fusion on digits ({'quick' if quick else 'full'} demo)\n\n{table}\n\n"
            f"results: {store.root} (catalog.sqlite)\n"
            f"curves:  probe show {rows[0]['run_id']} --runs {store.root}\n"
            f"all:     probe runs --runs {store.root}")
    return {"data": {"runs_root": str(store.root), "models": rows, "wall_time_s": time.perf_counter() - t0},
            "text": text}
