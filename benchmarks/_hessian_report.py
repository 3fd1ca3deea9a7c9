"""The summary and tables of ``benchmarks/bench_hessian.py``: ratios against ours and the target
verdicts (:func:`summarise`), and the printed report (:func:`print_report`)."""
from __future__ import annotations

import math

from benchmarks._hessian_baselines import LIBRARIES


def fmt_setting(s: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items())


def rel_err(vals, ref) -> float:
    if not vals or len(vals) < len(ref):
        return float("inf")
    return max(abs(a - b) / abs(b) for a, b in zip(vals, ref))


def ok(r) -> bool:
    return r is not None and r.get("status") == "ok"


def _total(r) -> float:
    return r["wall_s"] if ok(r) else float("inf")


def summarise(report: dict, args) -> None:
    """Ratios and target verdicts (added to the rows and to ``report["summary"]``)."""
    S = report["summary"]
    rows = {r["name"]: r for r in report["hvp"] if ok(r)}
    floors = [rows[f]["best_s"] for f in ("floor_jvp", "floor_dbl") if f in rows]
    if "ours" in rows:
        ours = rows["ours"]["best_s"]
        for r in report["hvp"]:
            if ok(r):
                r["x_ours"] = r["best_s"] / ours
        if floors:
            S.append({"quantity": "one HVP", "ours_s": ours, "floor_s": min(floors), "ratio": ours / min(floors),
                      "target": "ours / floor <= 1.3", "met": ours / min(floors) <= 1.3})
        base = [r for r in report["hvp"] if ok(r) and r["name"] in LIBRARIES]
        if base:
            b = min(base, key=lambda r: r["best_s"])
            S.append({"quantity": "one HVP vs libraries", "ours_s": ours, "baseline": b["name"], "baseline_s": b["best_s"],
                      "speedup": b["best_s"] / ours})
    for k in sorted({r["k"] for r in report["topk"]}):
        here = [r for r in report["topk"] if r["k"] == k]
        ours = next((r for r in here if r["lib"] == "ours"), None)
        base = [r for r in here if r["lib"] != "ours" and ok(r) and r.get("met")]
        for r in here:
            if ours is not None and ok(r) and ok(ours):
                r["x_ours"] = _total(r) / _total(ours)
        if ours is not None and ok(ours):
            entry = {"quantity": f"top-{k} at {args.rel_acc:g}", "ours_s": _total(ours), "ours_met": ours.get("met")}
            if base:
                b = min(base, key=_total)
                sp = _total(b) / _total(ours)
                entry.update(baseline=b["lib"], baseline_s=_total(b), speedup=sp, target="speedup >= 2",
                             met=bool(sp >= 2 and ours.get("met")))
            S.append(entry)
    for part, label in (("trace", f"trace, {args.trace_matvecs} products"),
                        ("density", f"SLQ {args.slq_probes}x{args.slq_steps}")):
        rows_ = [r for r in report[part] if ok(r)]
        ours = [r for r in rows_ if r["lib"] == "ours"]
        base = [r for r in rows_ if r["lib"] != "ours"]
        if not ours:
            continue
        fastest_ours = min(ours, key=_total)
        for r in report[part]:
            if ok(r):
                r["x_ours"] = _total(r) / _total(fastest_ours)
        if part == "trace":
            # at an equal standard error: the cheapest run of ours whose reported stderr is at most
            # that of the fastest baseline reporting one, at its full budget
            with_se = [r for r in base if r.get("stderr") is not None]
            if with_se:
                b = min(with_se, key=_total)
                fit = [o for o in ours if o.get("stderr") is not None and o["stderr"] <= b["stderr"]]
                if fit:
                    o = min(fit, key=_total)
                    sp = _total(b) / _total(o)
                    S.append({"quantity": f"trace at stderr <= {b['stderr']:.3g} ({b['name']})", "ours_s": _total(o),
                              "ours": o["name"], "baseline": b["name"], "baseline_s": _total(b), "speedup": sp,
                              "target": "speedup >= 2", "met": sp >= 2})
            ours = [o for o in ours if "budget" not in o]
            for o in ours:             # like for like: the same estimator
                same = [r for r in base if r["method"] == o["method"]]
                if same:
                    b = min(same, key=_total)
                    sp = _total(b) / _total(o)
                    S.append({"quantity": f"{label}, {o['method']}", "ours_s": _total(o), "baseline": b["name"],
                              "baseline_s": _total(b), "speedup": sp, "target": "speedup >= 2", "met": sp >= 2})
        elif base:
            b = min(base, key=_total)
            sp = _total(b) / _total(fastest_ours)
            S.append({"quantity": label, "ours_s": _total(fastest_ours), "baseline": b["name"],
                      "baseline_s": _total(b), "speedup": sp, "target": "speedup >= 2", "met": sp >= 2})


def _f(v, spec=".2f", width=8) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{width}}"
    if isinstance(v, float) and math.isinf(v):
        return f"{'inf':>{width}}"
    if spec.startswith("+"):
        return f"{v:>+{width}{spec[1:]}}"
    return f"{v:>{width}{spec}}"


def _status(r) -> str:
    return "" if ok(r) else f"{r['status']}: {r.get('message', '')}"


def print_report(rep: dict, args) -> None:
    env = rep["env"]
    print(f"threads={env['threads']} cpus={env['cpus']} torch={env['torch']} load avg at start="
          f"{env['load_avg_start'][0]:.2f}; resnet20_add, {args.n} samples 3x{args.size}x{args.size}, eval mode, "
          f"mean cross-entropy, float32; loss at the point {rep.get('fingerprint') or float('nan'):.6f} "
          f"(all workers agree: {rep['fingerprints_agree']}); watchdog {args.timeout_s:g} s / "
          f"{args.mem_cap_gib:g} GiB")
    for lib, info in rep["libraries"].items():
        print(f"  {lib}: " + (f"{info['version']} ({info['file']})" if "version" in info else f"skipped: {info['error']}"))
    if rep["hvp"]:
        print("\n1. One Hessian-vector product (best / median of "
              f"{args.hvp_repeats} after a warm-up; set-up = building the operator or graph)")
        print(f"{'library':<13} {'best s':>8} {'median s':>8} {'first s':>8} {'setup s':>8} {'peak MB':>8} "
              f"{'extra MB':>8} {'x ours':>7} {'vHv rel diff':>12}  notes")
        ref = next((r["vhv"] for r in rep["hvp"] if r["name"] == "floor_jvp" and ok(r)), None)
        for r in rep["hvp"]:
            name = "ours (4-block)" if r["name"] == "ours_block4" else r["name"]
            note = "per vector of a vmapped block of 4" if r["name"] == "ours_block4" else _status(r)
            d = abs(r["vhv"] - ref) / abs(ref) if ok(r) and ref else None
            print(f"{name:<13} {_f(r.get('best_s'), '.3f')} {_f(r.get('median_s'), '.3f')} "
                  f"{_f(r.get('first_s'), '.3f')} {_f(r.get('setup_s'), '.2f')} {_f(r.get('peak_mb'), '.0f')} "
                  f"{_f(r.get('extra_mb'), '.0f')} {_f(r.get('x_ours'), '.2f', 7)} {_f(d, '.1e', 12)}  {note}")
    ref = rep["reference"]
    if ref:
        ev = ", ".join(f"{e:.6g}" for e in ref["eigenvalues"])
        print(f"\nreference (ours, tol {args.ref_tol:g}, {args.ref_dtype}): {ev}; converged={ref['converged']}, "
              f"max residual {max(ref['residuals']):.2e}, {ref['n_hvps']} HVPs, {ref['wall_s']:.0f} s")
    if rep["topk"]:
        print(f"\n2. Top-k eigenvalues at relative accuracy {args.rel_acc:g} (first rung of each ladder that "
              f"meets it; wall includes set-up)")
        print(f"{'k':>2} {'library':<12} {'setting':<24} {'wall s':>8} {'setup s':>7} {'HVPs':>5} {'peak MB':>8} "
              f"{'extra MB':>8} {'max rel err':>11} {'met':>4} {'x ours':>7}  ladder (setting: err, s)")
        for r in rep["topk"]:
            lad = "; ".join(f"{fmt_setting(g['setting'])}: " + (f"{g['err']:.1e}, {g['wall_s']:.0f}s"
                                                              if g["status"] == "ok" else g["status"])
                            for g in r["rungs"])
            print(f"{r['k']:>2} {r['lib']:<12} {fmt_setting(r['setting']):<24} {_f(r.get('wall_s'), '.1f')} "
                  f"{_f(r.get('setup_s'), '.1f', 7)} {_f(r.get('n_hvps'), 'd', 5)} {_f(r.get('peak_mb'), '.0f')} "
                  f"{_f(r.get('extra_mb'), '.0f')} {_f(r.get('err'), '.1e', 11)} {'yes' if r.get('met') else 'NO':>4} "
                  f"{_f(r.get('x_ours'), '.2f', 7)}  {lad} {_status(r)}")
    ex = rep["exact_small"]
    if ex:
        if ok(ex):
            print(f"\n3a. Trace on tiny_add ({ex['P']} parameters, {args.small_n} samples 3x8x8): exact tr(H) = "
                  f"{ex['trace']:.6g} from the dense float64 Hessian ({ex['wall_s']:.0f} s; ||H||_F {ex['frobenius']:.4g}, "
                  f"lambda_max {ex['lambda_max']:.4g}); {args.small_seeds} estimates x {args.trace_matvecs} products each")
        else:
            print(f"\n3a. exact trace of the small model failed: {_status(ex)}")
        print(f"{'estimator':<24} {'RMS rel err':>11} {'bias rel':>9} {'sd rel':>8} {'mean stderr':>11} "
              f"{'RMS err/se':>10} {'|err|<=2se':>10} {'s/estimate':>10}  notes")
        for r in rep["trace_small"]:
            per = r["wall_s"] / args.small_seeds if ok(r) else None
            note = _status(r) or ("no stderr returned" if ok(r) and r.get("rms_z") is None else "")
            print(f"{r['name']:<24} {_f(r.get('rms_rel_err'), '.2e', 11)} {_f(r.get('bias_rel'), '+.1e', 9)} "
                  f"{_f(r.get('sd_rel'), '.1e')} {_f(r.get('mean_stderr_rel'), '.2e', 11)} {_f(r.get('rms_z'), '.2f', 10)} "
                  f"{_f(r.get('within_2se'), '.0%', 10)} {_f(per, '.2f', 10)}  {note}")
    if rep["trace"]:
        print(f"\n3b. Trace on resnet20_add, budget {args.trace_matvecs} products (wall includes set-up)")
        print(f"{'estimator':<36} {'wall s':>8} {'setup s':>7} {'HVPs':>5} {'s/HVP':>6} {'peak MB':>8} {'extra MB':>8} "
              f"{'estimate':>10} {'stderr':>9} {'x ours':>7}  notes")
        for r in rep["trace"]:
            per = r["wall_s"] / r["n_hvps"] if ok(r) and r.get("n_hvps") else None
            print(f"{r['name']:<36} {_f(r.get('wall_s'), '.1f')} {_f(r.get('setup_s'), '.1f', 7)} "
                  f"{_f(r.get('n_hvps'), 'd', 5)} {_f(per, '.2f', 6)} {_f(r.get('peak_mb'), '.0f')} {_f(r.get('extra_mb'), '.0f')} "
                  f"{_f(r.get('estimate'), '.5g', 10)} {_f(r.get('stderr'), '.3g', 9)} {_f(r.get('x_ours'), '.2f', 7)}  "
                  f"{_status(r)}")
    if rep["density"]:
        print(f"\n4. Spectral density, SLQ {args.slq_probes} probes x {args.slq_steps} steps (wall includes set-up)")
        print(f"{'library':<12} {'wall s':>8} {'setup s':>7} {'HVPs':>5} {'s/HVP':>6} {'peak MB':>8} {'extra MB':>8} "
              f"{'top node':>9} {'vs lam_1':>8} {'x ours':>7}  notes")
        for r in rep["density"]:
            per = r["wall_s"] / r["n_hvps"] if ok(r) and r.get("n_hvps") else None
            notes = "; ".join(r.get("notes", [])) if ok(r) else ("crashed: " + _status(r))
            print(f"{r['name']:<12} {_f(r.get('wall_s'), '.1f')} {_f(r.get('setup_s'), '.1f', 7)} "
                  f"{_f(r.get('n_hvps'), 'd', 5)} {_f(per, '.2f', 6)} {_f(r.get('peak_mb'), '.0f')} "
                  f"{_f(r.get('extra_mb'), '.0f')} {_f(r.get('top_node'), '.4g', 9)} "
                  f"{_f(r.get('top_node_rel_err'), '.1e')} {_f(r.get('x_ours'), '.2f', 7)}  {notes}")
    if rep["summary"]:
        print("\nSummary (ratio = fastest baseline / ours; targets: HVP within 1.3x of the floor, "
              ">= 2x the fastest library at equal accuracy)")
        for s in rep["summary"]:
            if "floor_s" in s:
                print(f"  {s['quantity']}: ours {s['ours_s']:.3f} s, floor {s['floor_s']:.3f} s, ours/floor "
                      f"{s['ratio']:.2f} [target <= 1.3: {'met' if s['met'] else 'not met'}]")
            elif "baseline" in s:
                tgt = f" [target >= 2x: {'met' if s['met'] else 'not met'}]" if "met" in s else ""
                extra = "" if s.get("ours_met", True) else " (ours did not reach the accuracy)"
                who = f" ({s['ours']})" if s.get("ours") else ""
                print(f"  {s['quantity']}: ours{who} {s['ours_s']:.2f} s, fastest baseline {s['baseline']} "
                      f"{s['baseline_s']:.2f} s: {s['speedup']:.2f}x{tgt}{extra}")
            else:
                print(f"  {s['quantity']}: ours {s['ours_s']:.2f} s; no baseline reached the accuracy")
    print(f"\ntotal {rep['total_s'] / 60:.1f} min")
