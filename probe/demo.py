"""The main job: train ``add_resnet`` and ``mul_resnet`` (WRN-10-2, the seed's block, fusion fmm01
bn(r) + s vs fmm18 bn(r) * bn(s)) on the embedded digits data and compare.

Run by ``make demo`` / ``probe demo``. Every result lands in the run store, so the explorer and
the experiment scripts can read it back.
"""
from __future__ import annotations

import time

from probe.text import format_table
from probe.companions import load
from probe.errors import UserError
from probe.training import TrainConfig, train

__all__ = ["DEMO_MODELS", "QUICK", "demo_config", "run_demo"]

DEMO_MODELS = ("add_resnet", "mul_resnet")


#: The quick recipe's sizes: 4 epochs over a class-balanced 768 of digits' 1,347 training images in
#: batches of 32 at lr 0.05 (96 steps). Both models train in it (seed 0, measured: add_resnet 96.7 to
#: 96.9%, mul_resnet 91.6 to 92.7% final test top-1, the spread from the thread count's rounding); at 2
#: epochs of 512 in batches of 64 (16 steps) mul_resnet stayed at chance (10.9%), so the comparison
#: compared a trained model with an untrained one.
QUICK = {"epochs": 4, "limit_train": 768, "batch_size": 32, "lr": 0.05}


def demo_config(model: str, *, quick: bool = False, epochs: int | None = None) -> TrainConfig:
    """The demo recipe: digits, SGD(0.9) lr 0.02 cosine, wd 5e-4, batch 64, 12 epochs, seed 0, CPU or
    CUDA; ``quick``: 4 epochs on 768 training images, batch 32, lr 0.05 (:data:`QUICK`)."""
    sizes = QUICK if quick else {"epochs": 12, "limit_train": None, "batch_size": 64, "lr": 0.02}
    return TrainConfig(model=model, data="digits", epochs=epochs if epochs is not None else sizes["epochs"],
                       batch_size=sizes["batch_size"], lr=sizes["lr"],
                       momentum=0.9, weight_decay=5e-4, schedule="cosine", seed=0,
                       limit_train=sizes["limit_train"])


def run_demo(runs: str | None = None, *, quick: bool = False, epochs: int | None = None,
             progress=None, log=None, on_epoch=None) -> dict:
    """Train the pair, probe both, and return ``{"data": ..., "text": ...}``. ``log(line)`` gets a
    line per stage, ``on_epoch`` / ``progress`` go to the trainer and the probes."""
    from probe.store import RunStore

    say = log or (lambda line: None)
    store = RunStore(runs)
    t0 = time.perf_counter()
    rows = []
    for name in DEMO_MODELS:
        say(f"== training {name} on digits ==")
        result = train(demo_config(name, quick=quick, epochs=epochs), store, on_epoch=on_epoch, progress=progress)
        run = store.get_run(result.run_id)
        rows.append({"model": name, "run_id": result.run_id,
                     "fusion": run["config"]["resolved"]["model"]["kwargs"].get("fusion")
                     or _fusion_name(name),
                     "best_acc": result.best_acc, "best_epoch": result.best_epoch, "final_acc": result.final_acc,
                     "train_time_s": result.train_time_s})
    ntk_rows = _ntk_section(store, rows, n=32 if quick else 128, say=say, progress=progress)
    side = _side_by_side(store, rows, ntk_rows, quick=quick, say=say, progress=progress)
    table = format_table(rows, [("model", "model"), ("best_acc", "best top-1"), ("best_epoch", "at epoch"),
                                ("final_acc", "final top-1"), ("train_time_s", "train s"), ("run_id", "run")],
                         floatfmt="{:.2f}")
    ntk_table = format_table(ntk_rows, [
        ("model", "model"), ("when", "when"), ("lambda_max", "NTK lambda_max"), ("condition_number", "cond"),
        ("effective_rank", "eff. rank"), ("alignment", "align"), ("el_n", "n"),
        ("el_predicted", "EL pred. MSE"), ("el_measured", "KRR meas. MSE"), ("net_test_err", "net test err %"),
        ("error", "note")])
    shown = [{k: ("n/a" if v is None else v) for k, v in r.items()} for r in side]
    side_table = format_table(shown, [("kind", "kind"), ("label", "measure")]
                              + [(r["model"], r["model"]) for r in rows], floatfmt="{:.4g}")
    text = (f"add vs mul residual fusion on digits ({'quick' if quick else 'full'} demo)\n\n{table}\n\n"
            f"Every probe at the last epoch, read back from the store (optimisation: can the loss be driven "
            f"down; generalisation: what function is learnt; `n/a` where the model has no such part):\n\n"
            f"{side_table}\n\n"
            f"Empirical NTK (trace kernel / outputs, {ntk_rows[0]['n_inputs'] if ntk_rows else 0} train inputs) at init and "
            f"after training; eigenlearning (EL) predicted test MSE of kernel regression with that kernel at n "
            f"training points vs measured kernel regression, next to the trained network's test error:\n\n"
            f"{ntk_table}\n\n"
            f"results: {store.root} (catalog.sqlite)\n"
            f"curves:  probe show {rows[0]['run_id']} --runs {store.root}\n"
            f"all:     probe runs --runs {store.root}\n"
            f"explore: probe explore --runs {store.root}")
    return {"data": {"runs_root": str(store.root), "models": rows, "ntk": ntk_rows, "side_by_side": side,
                     "wall_time_s": time.perf_counter() - t0},
            "text": text}


def _side_by_side(store, rows: list[dict], ntk_rows: list[dict], *, quick: bool, say, progress) -> list[dict]:
    """One row per headline measure (:mod:`probe.headline`), one column per model: every probe
    run at the last epoch (the NTK there is the NTK section's), the numbers read back from the
    store. ``row["probe_ids"][model]`` names the stored rows each column came from. A model on
    which a probe fails gets None there and a note (its other numbers stand)."""
    from probe.headline import MEASURES, PROBES, headline, measure

    columns: dict[str, dict] = {}
    sources: dict[str, dict] = {}
    for row in rows:
        done = {"ntk": r["probe_id"] for r in ntk_rows
                if r["model"] == row["model"] and r["when"] != "init" and r.get("probe_id")}
        ids = dict(done)
        for name in PROBES:
            if name in ids:
                continue
            try:
                ids.update(measure(store, row["run_id"], quick=quick, probes=(name,), progress=progress, log=say))
            except UserError as e:
                say(f"   {name} failed on {row['model']}: {e}")
        columns[row["model"]] = headline(store, ids)
        sources[row["model"]] = ids
    return [{"kind": m.kind, "key": m.key, "label": m.label,
             **{model: columns[model][m.key] for model in columns},
             "probe_ids": {model: sources[model].get(m.probe) for model in columns}} for m in MEASURES]


def _fusion_name(name: str) -> str:
    """The fusion(s) of a registered model as built by default (counted on the meta device)."""
    import torch
    create_model = load("models").create_model

    with torch.device("meta"):
        model = create_model(name)
    return ", ".join(sorted({m.fusion.spec.name for m in model.modules() if hasattr(m, "fusion")}))


def _ntk_section(store, rows: list[dict], *, n: int, say, progress) -> list[dict]:
    from probe.jobs import run_probe

    out = []
    for row in rows:
        for when in ("init", "last"):
            say(f"== NTK of {row['model']} ({when}) ==")
            try:
                outcome = run_probe(store, "ntk", {"trials": 10}, run=row["run_id"], checkpoint=when, n=n,
                                    progress=progress)[0]
                r = outcome.to_json()
            except UserError as e:  # e.g. a diverged model whose kernel is not finite: say so, go on
                out.append({"model": row["model"], "when": when, "n_inputs": n, "lambda_max": None,
                            "error": str(e), "net_test_err": None if when == "init" else 100.0 - row["final_acc"]})
                say(f"   NTK of {row['model']} ({when}) failed: {e}")
                continue
            el = r.get("eigenlearning", {}).get("rows", [])
            last = el[-1] if el else {}
            out.append({"model": row["model"], "when": "init" if when == "init" else f"epoch {r['epoch']}",
                        "n_inputs": n, "lambda_max": r["top_eigenvalues"][0],
                        "condition_number": r["spectrum"]["condition_number"],
                        "effective_rank": r["spectrum"]["effective_rank"], "alignment": r["spectrum"]["alignment"],
                        "el_n": last.get("n"), "el_predicted": last.get("predicted_test_mse"),
                        "el_measured": last.get("measured_test_mse"),
                        "net_test_err": None if when == "init" else 100.0 - row["final_acc"],
                        "probe_id": r.get("probe_id")})
    return out
