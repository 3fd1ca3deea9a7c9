"""Regimes: does multiplicative fusion fail by optimisation or by generalisation, measured per
regime (data set x training-set size x depth) with a protocol that can return either answer.

For every regime of :func:`experiments._regimes.settings` the baseline ``fmm01`` (``bn(r) + s``),
the plain product ``fmm18`` (``bn(r) * bn(s)``) and the rows that recover most of the seed's gap
(``fmm08``, ``fmm14``, ``fmm30``, ``fmm38``) are trained over several seeds, and each run's last
checkpoint is measured in eval mode on its own training samples and on the test split. Then:

* **gap split**: each variant's test-error gap to the baseline splits into the part its training
  error already shows (optimisation) and the rest (generalisation), with a bootstrap interval
  over seeds on the gap and on the optimisation share;
* **matched training loss**: whichever side of a pair fits worse is re-trained over longer
  schedules (``Settings.extend``) until its training loss reaches the other's; a gap that closes
  there is optimisation, one that persists is generalisation (a side whose training loss stays
  above 0.9 of a uniform guess's (ln K) does not train at all: that is read as optimisation without
  re-training it);
* **trainability at depth**: which measure at initialisation (signal-propagation slope over the
  blocks, NTK condition number, Hessian lambda_max, gradient SNR, gate saturation) goes with the
  final training loss, per depth, Spearman's rho with Holm's correction over the measures tested
  together; the same init-time measures against test error per regime give each regime's
  strongest predictor. These are *predictive* (taken before training); the ``verdict``
  experiment's correlations are *descriptive* (after training).

The numbers are stored in the run catalog as findings (``regimes`` / ``cells``, ``verdict``,
``trainability``, ``init_predictors``), which the explorer's Findings page draws. A regime whose
data set is not installed is skipped with one line saying how to get it.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._common import Context, Outcome, fmt, train_many
from ._regimes import (BASELINE, MATCH_TOLERANCE, Regime, Settings, answer_for, extended_config, gap_split,
                       holm, is_trained, matched_reading, regime_config, settings, spearman_p)
from probe import UserError
from probe import to_jsonable as _clean   # NaN / inf -> None: a missing number, drawn as a gap
from probe.companions import load

NAME = "regimes"
TITLE = "Regimes: optimisation or generalisation, per data set, training-set size and depth"
DESCRIPTION = ("The pair and the recovering rows trained over a grid of regimes (data, training-set size, depth) "
               "with 3+ seeds; test error split into training error and generalisation gap, a matched-training-loss "
               "comparison, and which measure at initialisation predicts where a variant stops training.")

#: init-time measures tested for trainability and per regime: key -> label
INIT_MEASURES = {"signal_slope": "signal slope", "ntk_cond": "NTK cond", "lambda_max": "Hessian l_max",
                 "grad_snr": "grad SNR", "sat_frac": "gate sat. frac"}


# --- availability -------------------------------------------------------------------------------


def missing_data(data: str) -> str | None:
    """None when data set ``data`` can be loaded here, else one line saying how to get it."""
    if data in ("digits", "synthetic"):
        return None
    from probe import find_data

    if find_data(data) is not None:
        return None
    how = {"fashion-mnist": "apt-get install dataset-fashion-mnist (or make data)"}.get(
        data, "put its files under $PROBE_DATA or ./data")
    return f"{data} not found: {how}"


# --- measuring runs -----------------------------------------------------------------------------


class _Evaluator:
    """Eval-mode loss and error of a run's last checkpoint on its training samples and its test
    split; the data of each recipe is loaded once."""

    def __init__(self, store):
        self.store = store
        self._data: dict[tuple, Any] = {}

    def data(self, cfg):
        from probe import load_data

        key = (cfg.data, cfg.data_root, cfg.image_size, cfg.limit_train, cfg.limit_test)
        if key not in self._data:
            self._data[key] = load_data(cfg.data, cfg.data_root, image_size=cfg.image_size, seed=cfg.seed,
                                        limit_train=cfg.limit_train, limit_test=cfg.limit_test)
        return self._data[key]

    def __call__(self, run_id: str) -> dict:
        from probe import evaluate, load_run_model
        from probe import TrainConfig

        run = self.store.get_run(run_id)
        status = run["status"]
        nan = {"train_loss": None, "train_err": None, "test_loss": None, "test_err": None}
        if self.store.latest_checkpoint(run_id) is None:
            return {"status": status, **nan}
        model, run, epoch = load_run_model(self.store, run_id, "last")
        cfg = TrainConfig.from_dict(run["config"])
        d = self.data(cfg)
        out = {"status": status, "epoch": epoch}
        for split, x, y in (("train", d.x_train, d.y_train), ("test", d.x_test, d.y_test)):
            m = evaluate(model, x, y, cfg.eval_batch_size)
            finite = math.isfinite(m["loss"])
            out[f"{split}_loss"] = m["loss"] if finite else None
            out[f"{split}_err"] = 100.0 - m["top1"]
        return out


def _cells(ctx: Context, S: Settings, regimes: list[Regime], runs: dict, previous: dict) -> list[dict]:
    """One row per run: regime, variant, seed and its eval-mode train / test loss and error
    (reused from the previously stored finding for the same run id)."""
    seed_fusion = load("models.seed_table").seed_fusion

    evaluate = _Evaluator(ctx.store)
    rows = []
    keys = [(r, v, s) for r in regimes for v in S.variants for s in S.seeds]
    for i, (r, v, s) in enumerate(keys):
        rid = runs[(r.name, v, s)]
        m = previous.get(rid)
        if m is None or m.get("status") != ctx.store.get_run(rid)["status"]:
            m = evaluate(rid)
        rows.append({"regime": r.name, "data": r.data, "n_train": r.n_train, "depth": r.depth,
                     "image_size": r.image_size, "epochs": r.epochs, "variant": v, "formula": seed_fusion(v).formula,
                     "seed": s, "run_id": rid, **{k: m.get(k) for k in ("status", "train_loss", "train_err",
                                                                         "test_loss", "test_err")}})
        if ctx.progress is not None:
            ctx.progress("regimes: evaluating runs", i + 1, len(keys))
    return rows


def _arr(rows: list[dict], key: str, seeds) -> np.ndarray:
    by = {r["seed"]: r.get(key) for r in rows}
    return np.array([np.nan if by.get(s) is None else float(by[s]) for s in seeds])


def _nanmean(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


# --- the matched-training-loss comparison -------------------------------------------------------


def _matched(ctx: Context, S: Settings, regimes: list[Regime], cells: list[dict]) -> dict:
    """``{(regime, variant): reading}`` for the pairs of ``S.matched``: the worse-fitting side
    re-trained over ``S.extend`` times its epochs (trained here where missing), its matched gap
    with a bootstrap interval."""
    want = []
    plan = {}
    for r in regimes:
        here = [c for c in cells if c["regime"] == r.name]
        base = [c for c in here if c["variant"] == BASELINE]
        for v in S.variants:
            if v == BASELINE or (S.matched is not None and v not in S.matched):
                continue
            var = [c for c in here if c["variant"] == v]
            lb, lv = _nanmean(_arr(base, "train_loss", S.seeds)), _nanmean(_arr(var, "train_loss", S.seeds))
            if not (math.isfinite(lb) and math.isfinite(lv)):
                plan[(r.name, v)] = None
                continue
            worse = v if lv > lb else BASELINE
            target = min(lb, lv)
            if max(lb, lv) <= target * MATCH_TOLERANCE:   # already matched: nothing to re-train
                plan[(r.name, v)] = ("already", worse, target)
                continue
            if not is_trained(max(lb, lv)):               # one side sits at chance: a longer schedule
                plan[(r.name, v)] = ("untrained", worse, target)   # of the same recipe is not the question
                continue
            plan[(r.name, v)] = ("extend", worse, target)
            want += [(r, worse, s, f) for f in S.extend for s in S.seeds]
    want = list(dict.fromkeys(want))
    ids = train_many(ctx, [extended_config(r, w, s, f) for r, w, s, f in want], desc="regimes: matched loss")
    extended = dict(zip([(r.name, w, s, f) for r, w, s, f in want], ids))
    evaluate = _Evaluator(ctx.store)
    measured = {k: evaluate(rid) for k, rid in extended.items()}
    out = {}
    for r in regimes:
        here = [c for c in cells if c["regime"] == r.name]
        base = [c for c in here if c["variant"] == BASELINE]
        for v in S.variants:
            if (r.name, v) not in plan:
                continue
            p = plan[(r.name, v)]
            var = [c for c in here if c["variant"] == v]
            if p is None:
                out[(r.name, v)] = {"status": "not run", "matched_gap": None, "lo": None, "hi": None}
                continue
            kind, worse, target = p
            bt, vt = _arr(base, "test_err", S.seeds), _arr(var, "test_err", S.seeds)
            if kind == "untrained":
                out[(r.name, v)] = {"status": "does not train", "factor": None, "worse": worse, "target_loss": target,
                                    "train_loss": None, "matched_gap": None, "remaining": None, "lo": None,
                                    "hi": None}
                continue
            if kind == "already":
                split = gap_split(bt, _arr(base, "train_err", S.seeds), vt, _arr(var, "train_err", S.seeds),
                                  n_boot=S.n_boot)
                out[(r.name, v)] = {"status": "already matched", "factor": 1, "worse": worse, "target_loss": target,
                                    "train_loss": target, "matched_gap": split["test_gap"], "remaining": 1.0,
                                    "lo": split["test_gap_lo"], "hi": split["test_gap_hi"]}
                continue
            better_test = _nanmean(vt if worse == BASELINE else bt)
            worse_test = _nanmean(bt if worse == BASELINE else vt)
            tries = []
            for f in S.extend:
                ms = [measured[(r.name, worse, s, f)] for s in S.seeds]
                loss = _nanmean(np.array([np.nan if m["train_loss"] is None else m["train_loss"] for m in ms]))
                err = _nanmean(np.array([np.nan if m["test_err"] is None else m["test_err"] for m in ms]))
                tries.append((f, loss, err))
            reading = matched_reading(target, tries, worse_test - better_test, better_test)
            ext = np.array([np.nan if measured[(r.name, worse, s, reading["factor"])]["test_err"] is None
                            else measured[(r.name, worse, s, reading["factor"])]["test_err"] for s in S.seeds])
            zeros = np.zeros(len(S.seeds))
            if worse == BASELINE:                        # variant minus baseline, the baseline extended
                split = gap_split(ext, zeros, vt, zeros, n_boot=S.n_boot)
            else:
                split = gap_split(bt, zeros, ext, zeros, n_boot=S.n_boot)
            out[(r.name, v)] = {**reading, "worse": worse, "target_loss": target, "matched_gap": split["test_gap"],
                                "lo": split["test_gap_lo"], "hi": split["test_gap_hi"],
                                "run_ids": [extended[(r.name, worse, s, reading["factor"])] for s in S.seeds]}
    return out


# --- measures at initialisation -----------------------------------------------------------------


def _signal_slope(result) -> float | None:
    """|slope| of log10 of the block outputs' activation variance over the block index, at
    initialisation (mean over the probe's initialisations): how fast the forward signal grows
    or decays with depth (0: depth-stable)."""
    v = np.asarray(result.act_var_mean, dtype=np.float64)
    keep = np.isfinite(v) & (v > 0)
    if keep.sum() < 2:
        return None
    x = np.arange(1, len(v) + 1, dtype=np.float64)[keep]
    return float(abs(np.polyfit(x, np.log10(v[keep]), 1)[0]))


def _init_measures(ctx: Context, S: Settings, runs: dict, regimes: list[Regime]) -> dict:
    """``{(depth, variant, seed): {measure: value}}``, each measured at the initialisation of one
    run per depth (the first regime of that depth: the initialisation does not depend on the
    training-set size), through the stored probe rows."""
    from probe.headline import headline, measure
    from probe import load_result

    first: dict[int, Regime] = {}
    for r in regimes:
        first.setdefault(r.depth, r)
    keys = [(d, v, s) for d, r in first.items() for v in S.variants for s in S.seeds]
    out = {}
    for i, (d, v, s) in enumerate(keys):
        rid = runs[(first[d].name, v, s)]
        ids = measure(ctx.store, rid, checkpoint="init", quick=True, probes=S.init_probes, log=ctx.log)
        numbers = headline(ctx.store, ids)
        m = {k: numbers.get(k) for k in INIT_MEASURES if k != "signal_slope"}
        m["signal_slope"] = _signal_slope(load_result(ctx.store, ids["gradvar"])[1]) if "gradvar" in ids else None
        m["probe_ids"] = sorted(ids.values())
        m["data_regime"] = first[d].name
        out[(d, v, s)] = m
        if ctx.progress is not None:
            ctx.progress("regimes: probes at initialisation", i + 1, len(keys))
    return out


def _tests(points: list[tuple[dict, float]], group: Any) -> list[dict]:
    """Spearman of each init measure with an outcome over ``points`` ((measures, outcome)),
    Holm-corrected over the measures of this group."""
    rows = []
    for key, label in INIT_MEASURES.items():
        x = [np.nan if m.get(key) is None else m[key] for m, _ in points]
        t = spearman_p(x, [y for _, y in points])
        rows.append({"group": group, "measure": key, "label": label, **t})
    for r, p in zip(rows, holm([r["p"] for r in rows])):
        r["p_holm"] = p
    return rows


def _strongest(tests: list[dict]) -> dict | None:
    ok = [t for t in tests if t.get("p_holm") is not None]
    return min(ok, key=lambda t: (t["p_holm"], -abs(t["rho"]))) if ok else None


# --- the experiment -----------------------------------------------------------------------------


def run(ctx: Context) -> Outcome:
    S = settings(ctx.quick)
    regimes, found = [], []
    for r in S.regimes:
        why = missing_data(r.data)
        if why is None:
            regimes.append(r)
        elif not any(why in line for line in found):
            found.append(f"regimes on {r.data} skipped: {why}")
    if not regimes:
        raise UserError("no regime can run: " + "; ".join(found))
    for line in found:
        ctx.log(line)
    keys = [(r, v, s) for r in regimes for s in S.seeds for v in S.variants]
    ids = train_many(ctx, [regime_config(r, v, s) for r, v, s in keys], desc="regimes: training")
    runs = {(r.name, v, s): rid for (r, v, s), rid in zip(keys, ids)}
    previous = _previous_cells(ctx)
    cells = _cells(ctx, S, regimes, runs, previous)
    matched = _matched(ctx, S, regimes, cells)
    primary = [r for r in regimes if r.data != "digits"] or regimes
    init = _init_measures(ctx, S, runs, primary) if S.init_probes else {}

    verdict_rows, init_tests = [], []
    for r in regimes:
        here = [c for c in cells if c["regime"] == r.name]
        base = [c for c in here if c["variant"] == BASELINE]
        pts = [(init[(r.depth, c["variant"], c["seed"])], c["test_err"]) for c in here
               if (r.depth, c["variant"], c["seed"]) in init and c["test_err"] is not None]
        tests = _tests(pts, r.name) if pts else []
        init_tests += tests
        best = _strongest(tests)
        for v in S.variants:
            if v == BASELINE:
                continue
            var = [c for c in here if c["variant"] == v]
            split = gap_split(_arr(base, "test_err", S.seeds), _arr(base, "train_err", S.seeds),
                              _arr(var, "test_err", S.seeds), _arr(var, "train_err", S.seeds), n_boot=S.n_boot)
            m = matched.get((r.name, v))
            verdict_rows.append({
                "regime": r.name, "data": r.data, "n_train": r.n_train, "depth": r.depth, "variant": v,
                "formula": var[0]["formula"], "n_seeds": split["n_seeds"],
                "trained": sum(is_trained(c["train_loss"]) for c in var),
                "test_gap": split["test_gap"], "test_gap_lo": split["test_gap_lo"], "test_gap_hi": split["test_gap_hi"],
                "train_gap": split["train_gap"], "opt_share": split["opt_share"],
                "opt_share_lo": split["opt_share_lo"], "opt_share_hi": split["opt_share_hi"],
                "matched_status": m["status"] if m else "not run",
                "matched_factor": m.get("factor") if m else None,
                "matched_gap": m.get("matched_gap") if m else None,
                "matched_gap_lo": m.get("lo") if m else None, "matched_gap_hi": m.get("hi") if m else None,
                "matched_remaining": m.get("remaining") if m else None,
                "predictor": best["label"] if best else None,
                "predictor_rho": best["rho"] if best else None,
                "predictor_p_holm": best["p_holm"] if best else None,
                "answer": answer_for(split, m)})

    train_rows, depth_tests = _trainability(S, primary, cells, init)
    paragraph = _paragraph(verdict_rows, train_rows)
    findings = {
        "cells": {"kind": "cells", "title": "Every run: eval-mode training and test error per regime", "rows": cells},
        "verdict": {"kind": "verdict", "title": "The verdict per regime (variant minus bn(r) + s, test error points)",
                    "baseline": BASELINE, "paragraph": paragraph, "rows": _clean(verdict_rows)},
        "trainability": {"kind": "trainability", "title": "Trainability over depth and its predictors at "
                         "initialisation", "rows": _clean(train_rows), "tests": _clean(depth_tests)},
        "init_predictors": {"kind": "correlations", "title": "Measures at initialisation against test error, per "
                            "regime (Spearman, Holm over the 5 measures)", "when": "init",
                            "rows": _clean([{**t, "kind": "init", "lo": None, "hi": None} for t in init_tests])},
    }
    for name, payload in findings.items():
        ctx.store.save_finding(NAME, name, _clean(payload))
    found += _found(verdict_rows, depth_tests, paragraph, train_rows)
    probe_ids = sorted({p for m in init.values() for p in m["probe_ids"]})
    run_ids = sorted(set(runs.values()) | {rid for m in matched.values() for rid in (m.get("run_ids") or [])})
    return Outcome(_figures(findings), cells, run_ids, probe_ids, found,
                   tables={"verdict": verdict_rows, "trainability": train_rows, "depth_tests": depth_tests,
                           "init_predictors": init_tests})


def _previous_cells(ctx: Context) -> dict:
    """{run id: measured row} of the last stored ``cells`` finding (runs are immutable once
    finished, so their numbers are reused)."""
    try:
        found = ctx.store.get_finding(NAME, "cells")
    except (UserError, AttributeError):
        return {}
    rows = ((found or {}).get("payload") or {}).get("rows") or []
    return {r["run_id"]: r for r in rows if isinstance(r, dict) and isinstance(r.get("run_id"), str)}


def _trainability(S: Settings, regimes: list[Regime], cells: list[dict], init: dict) -> tuple[list[dict], list[dict]]:
    """Rows (depth, variant, seed): mean final training loss over the regimes of that depth,
    whether every one of them trained, and the init measures; tests per depth and pooled."""
    rows = []
    for d in dict.fromkeys(r.depth for r in regimes):
        names = {r.name for r in regimes if r.depth == d}
        for v in S.variants:
            for s in S.seeds:
                mine = [c for c in cells if c["regime"] in names and c["variant"] == v and c["seed"] == s]
                losses = np.array([np.nan if c["train_loss"] is None else c["train_loss"] for c in mine])
                m = init.get((d, v, s), {})
                rows.append({"depth": d, "variant": v, "seed": s,
                             "trained": bool(mine) and all(is_trained(c["train_loss"]) for c in mine),
                             "train_loss": _nanmean(losses) if np.isfinite(losses).any() else None,
                             "measures": {k: m.get(k) for k in INIT_MEASURES}})
    tests = []
    for d in [*dict.fromkeys(r["depth"] for r in rows), "all"]:
        pts = [(r["measures"], r["train_loss"]) for r in rows
               if (d == "all" or r["depth"] == d) and r["train_loss"] is not None]
        tests += [{"depth": t["group"], **{k: v for k, v in t.items() if k != "group"}} for t in _tests(pts, d)]
    return rows, tests


def _paragraph(verdict_rows: list[dict], train_rows: list[dict]) -> str:
    """The one-paragraph answer for the pair (fmm18 against the baseline), built from the rows."""
    pair = [r for r in verdict_rows if r["variant"] == "fmm18"]
    if not pair:
        return "The pair was not measured."
    by = {}
    for r in pair:
        by.setdefault(r["answer"], []).append(r["regime"])
    parts = [f"{ans} in {', '.join(names)}" for ans, names in sorted(by.items())]
    dead = sorted({(r["depth"]) for r in train_rows if r["variant"] == "fmm18" and not r["trained"]})
    live = sorted({(r["depth"]) for r in train_rows if r["variant"] == "fmm18" and r["trained"]})
    text = (f"bn(r) * bn(s) against bn(r) + s, read per regime from the gap split and the matched-training-loss "
            f"comparison: {'; '.join(parts)}.")
    if dead:
        text += (f" At depth {', '.join(map(str, dead))} some fmm18 runs do not train at all (eval-mode training "
                 f"loss above 0.9 ln 10): there multiplication fails by optimisation before generalisation can be asked.")
    if live:
        text += f" fmm18 trains at depth {', '.join(map(str, live))} in at least one seed."
    return text


def _found(verdict_rows, depth_tests, paragraph, train_rows) -> list[str]:
    out = []
    for r in verdict_rows:
        out.append(f"{r['regime']:<18} {r['variant']} {r['formula']:<24} gap {fmt(r['test_gap'], '+.1f')} "
                   f"[{fmt(r['test_gap_lo'], '+.1f')}, {fmt(r['test_gap_hi'], '+.1f')}] opt. share "
                   f"{fmt(r['opt_share'], '.2f')} [{fmt(r['opt_share_lo'], '.2f')}, {fmt(r['opt_share_hi'], '.2f')}] "
                   f"matched: {r['matched_status']} {fmt(r['matched_gap'], '+.1f')} -> {r['answer']}")
    for t in depth_tests:
        if t["depth"] == "all" or t.get("p_holm") is not None and t["p_holm"] < 0.05:
            out.append(f"trainability depth {t['depth']}: {t['label']} rho {fmt(t['rho'], '+.2f')} "
                       f"p {fmt(t['p'], '.2g')} p_holm {fmt(t['p_holm'], '.2g')} n={t['n']}")
    out.append(paragraph)
    return out


def _figures(findings: dict) -> dict:
    from probe.figures.findings import finding_figures

    figs = {}
    for name, payload in findings.items():
        for i, fig in enumerate(finding_figures(_clean(payload))):
            figs[f"{name}_{i}" if i else name] = fig
    return figs
