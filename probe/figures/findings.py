"""Figures of stored findings: an experiment's numbers (:meth:`probe.store.RunStore.save_finding`)
drawn again from the numbers alone.

A finding is a JSON object with a ``kind``; :data:`FINDING_KINDS` lists the kinds drawn here, each
with a fixed shape (:func:`validate_finding`). Every error and accuracy is in percent (0-100); any
number may be ``None`` (missing): it is drawn as a gap or written ``n/a``. Text from a finding is
only ever shown as text (escaped for plotly's labels), never as markup.

Kinds:

``cells``
    one row per trained cell (regime, data, n_train, depth, image_size, epochs, variant, formula,
    seed, run_id, status, train_loss, train_err, test_loss, test_err; train_* measured in eval mode
    on the training set): per regime, each variant's train and test error (mean and sd over seeds),
    the baseline ``fmm01`` first, the generalisation gap written on the test bar.
``verdict``
    one row per regime and variant (test gap to the baseline in points with its interval, its
    training part, the optimisation share, the matched-training comparison, a predictor and the
    answer): per regime, the test gap split into its training and generalisation parts.
``trainability``
    one row per depth, variant and seed (trained or not, final training loss, measures at
    initialisation) and the rank-correlation tests of each measure: the final training loss over
    depth, and a heat table of rho per depth and measure.
``seed_table``
    one row per seed variant (its Caltech-101 accuracy and the reproduced accuracy over seeds):
    reproduced against published, with Spearman's rho and its interval.
``correlations``
    one row per measure and group: a heatmap of Spearman's rho with its interval and the
    Holm-corrected p-value.
"""
from __future__ import annotations

import html
import json
import math
from typing import Any, Callable, Mapping, Sequence

from probe.figures._common import PALETTE
from probe.store.finding_shapes import FINDING_KINDS, FINDING_SHAPES, validate_finding

__all__ = ["FINDING_KINDS", "BASELINE", "validate_finding", "finding_figures", "finding_tables", "cells_figure",
           "verdict_figure", "trainability_loss_figure", "trainability_tests_figure", "seed_table_figure",
           "correlations_figure"]

#: The variant every cells figure shows first (the residual addition).
BASELINE = "fmm01"


def _require(payload: Any, kind: str) -> Mapping:
    problem = validate_finding(payload)
    if problem is None and payload["kind"] != kind:
        problem = f"a {payload['kind']} finding is not a {kind} finding"
    if problem:
        raise ValueError(problem)
    return payload


# --------------------------------------------------------------------------------------------------
# helpers


def _num(v: Any) -> float | None:
    """A finite float, or None for a missing or non-finite number."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def _esc(text: Any) -> str:
    """Text from a finding for plotly's labels (which read a few HTML tags): shown as written."""
    return html.escape(str(text), quote=False)


def _fmt(v: Any, spec: str = ".1f") -> str:
    f = _num(v)
    return "n/a" if f is None else format(f, spec)


def _mean_sd(values: Sequence[Any]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (None below two values) and count of the present values."""
    xs = [x for x in map(_num, values) if x is not None]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, sd, len(xs)


def _count(v: Any) -> str:
    return "n/a" if v is None else str(v)


def _sub(a: Any, b: Any) -> float | None:
    a, b = _num(a), _num(b)
    return None if a is None or b is None else a - b


def _empty(fig, text: str = "no rows in this finding"):
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def _layout(fig, title: str, **kw):
    fig.update_layout(title=_esc(title), template="plotly_white", legend=dict(orientation="h", y=-0.15), **kw)
    return fig


# --------------------------------------------------------------------------------------------------
# builders


def cells_figure(payload: Mapping):
    """``cells``: per regime (one panel each), the train error (eval mode, on the training set) and
    the test error of every variant, mean over seeds with +/- sd bars, the baseline first; the test
    bar carries the generalisation gap (mean over seeds of test minus train error)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = _require(payload, "cells")["rows"]
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    fig = make_subplots(rows=max(1, len(regimes)), cols=1, subplot_titles=[_esc(g) for g in regimes] or None,
                        vertical_spacing=min(0.1, 0.6 / max(1, len(regimes))))
    if not regimes:
        return _layout(_empty(fig), payload["title"])
    for i, regime in enumerate(regimes, start=1):
        mine = [r for r in rows if r["regime"] == regime]
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        if BASELINE in variants:
            variants.remove(BASELINE)
            variants.insert(0, BASELINE)
        stats = []
        for v in variants:
            cells = [r for r in mine if r["variant"] == v]
            train, test = _mean_sd([r["train_err"] for r in cells]), _mean_sd([r["test_err"] for r in cells])
            gap = _mean_sd([_sub(r["test_err"], r["train_err"]) for r in cells])[0]
            stats.append({"variant": v, "formula": cells[0]["formula"], "train": train, "test": test, "gap": gap,
                          "seeds": len(cells)})
        x = [_esc(s["variant"]) for s in stats]
        hover = [[_esc(s["formula"]), s["seeds"]] for s in stats]
        for which, label, color in (("train", "train error (eval mode)", PALETTE[0]),
                                    ("test", "test error", PALETTE[1])):
            means = [s[which][0] for s in stats]
            text = [f"{_fmt(s[which][0])}" + (f" (gap {_fmt(s['gap'], '+.1f')})" if which == "test" else "")
                    for s in stats]
            fig.add_trace(go.Bar(
                x=x, y=means, name=label, legendgroup=which, showlegend=i == 1, marker_color=color,
                error_y=dict(type="data", array=[s[which][1] for s in stats], visible=True),
                text=text, textposition="outside", customdata=hover,
                hovertemplate=(f"%{{x}} %{{customdata[0]}}<br>{label}: %{{y:.2f}}%<br>"
                               "cells: %{customdata[1]}<extra></extra>")), row=i, col=1)
        fig.update_yaxes(title_text="error (%)", row=i, col=1)
        fig.update_xaxes(title_text="variant (fusion)", row=i, col=1)
    return _layout(fig, payload["title"], barmode="group", height=140 + 320 * len(regimes))


def verdict_figure(payload: Mapping):
    """``verdict``: per regime and variant, the test gap to the baseline (points) as stacked bars
    of its training part (``train_gap``) and its generalisation part (``test_gap - train_gap``),
    with the interval ``[test_gap_lo, test_gap_hi]`` on the total; a gap whose training part is
    missing is one unsplit bar."""
    import plotly.graph_objects as go

    finding = _require(payload, "verdict")
    rows = finding["rows"]
    fig = go.Figure()
    if not rows:
        return _layout(_empty(fig), finding["title"])
    x = [[_esc(r["regime"]) for r in rows], [_esc(r["variant"]) for r in rows]]
    total = [_num(r["test_gap"]) for r in rows]
    train = [_num(r["train_gap"]) for r in rows]
    split = [t is not None and tr is not None for t, tr in zip(total, train)]
    hover = [[_esc(r["formula"]), _esc(r["answer"]), _fmt(r["opt_share"], ".2f"), _esc(r["predictor"] or "none"),
              _fmt(r["predictor_rho"], "+.2f"), r["n_seeds"]] for r in rows]
    template = ("%{x} %{customdata[0]}<br>%{fullData.name}: %{y:+.1f} points<br>optimisation share "
                "%{customdata[2]}; predictor %{customdata[3]} (rho %{customdata[4]})<br>seeds: %{customdata[5]}"
                "<br>%{customdata[1]}<extra></extra>")
    parts = (("training part (train error gap)", [tr if ok else None for tr, ok in zip(train, split)], PALETTE[0]),
             ("generalisation part (test gap - train gap)",
              [t - tr if ok else None for t, tr, ok in zip(total, train, split)], PALETTE[1]),
             ("test gap (not split)", [t if not ok else None for t, ok in zip(total, split)], PALETTE[7]))
    for name, y, color in parts:
        fig.add_trace(go.Bar(x=x, y=y, name=name, marker_color=color, customdata=hover, hovertemplate=template))
    lo = [_num(r["test_gap_lo"]) for r in rows]
    hi = [_num(r["test_gap_hi"]) for r in rows]
    fig.add_trace(go.Scatter(
        x=x, y=total, mode="markers", name="test gap (interval)", marker=dict(color="black", symbol="diamond"),
        error_y=dict(type="data", symmetric=False, visible=True,
                     array=[h - t if h is not None and t is not None else None for h, t in zip(hi, total)],
                     arrayminus=[t - low if low is not None and t is not None else None for low, t in zip(lo, total)]),
        text=[f"{_fmt(t, '+.1f')} [{_fmt(low, '+.1f')}, {_fmt(h, '+.1f')}]" for t, low, h in zip(total, lo, hi)],
        customdata=hover, hovertemplate="%{x}: test gap %{text}<br>%{customdata[1]}<extra></extra>"))
    return _layout(fig, f"{finding['title']} (gaps to {finding['baseline']}, points)", barmode="relative",
                   xaxis_title="regime / variant",
                   yaxis_title="test error minus the baseline's (points)", height=520)


def _depth_key(d: Any) -> tuple:
    return (1, 0) if not isinstance(d, int) else (0, d)


def trainability_loss_figure(payload: Mapping):
    """``trainability``: the final training loss over depth, one colour per variant: the mean over
    seeds as a line, each seed as a marker (a circle when it trained, a cross when it did not, an
    open circle when unknown); a log axis when every loss is positive."""
    import plotly.graph_objects as go

    finding = _require(payload, "trainability")
    rows = finding["rows"]
    fig = go.Figure()
    if not rows:
        return _layout(_empty(fig), f"{finding['title']}: final training loss")
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        color = PALETTE[i % len(PALETTE)]
        mine = [r for r in rows if r["variant"] == variant]
        depths = sorted({r["depth"] for r in mine if r["depth"] is not None})
        means = [_mean_sd([r["train_loss"] for r in mine if r["depth"] == d])[0] for d in depths]
        fig.add_trace(go.Scatter(x=depths, y=means, mode="lines", name=f"{_esc(variant)} (mean)",
                                 legendgroup=variant, line=dict(color=color)))
        for trained, label, symbol in ((True, "trained", "circle"), (False, "not trained", "x"),
                                       (None, "unknown", "circle-open")):
            seeds = [r for r in mine if r["trained"] is trained]
            if not seeds:
                continue
            fig.add_trace(go.Scatter(
                x=[r["depth"] for r in seeds], y=[_num(r["train_loss"]) for r in seeds], mode="markers",
                name=f"{_esc(variant)} {label}", legendgroup=variant,
                marker=dict(color=color, symbol=symbol, size=9), customdata=[[r["seed"]] for r in seeds],
                hovertemplate=f"{_esc(variant)} depth %{{x}} seed %{{customdata[0]}}: loss %{{y:.4g}} ({label})"
                              "<extra></extra>"))
    losses = [_num(r["train_loss"]) for r in rows]
    positive = [v for v in losses if v is not None]
    log = bool(positive) and all(v > 0 for v in positive)
    return _layout(fig, f"{finding['title']}: final training loss", xaxis_title="depth",
                   yaxis=dict(title="final training loss", type="log" if log else "linear"))


def trainability_tests_figure(payload: Mapping):
    """``trainability``: a heat table of Spearman's rho per depth (rows, ``all`` last) and measure
    (columns), each cell written ``rho``, ``p_holm`` and ``n``; missing cells are ``n/a``."""
    import plotly.graph_objects as go

    finding = _require(payload, "trainability")
    tests = finding["tests"]
    fig = go.Figure()
    if not tests:
        return _layout(_empty(fig, "no tests in this finding"), f"{finding['title']}: rank correlations")
    depths = sorted(dict.fromkeys(t["depth"] for t in tests), key=_depth_key)
    measures = list(dict.fromkeys(t["measure"] for t in tests))
    cell = {(t["depth"], t["measure"]): t for t in tests}
    z, text = [], []
    for d in depths:
        z.append([_num(cell[(d, m)]["rho"]) if (d, m) in cell else None for m in measures])
        text.append([f"{_fmt(cell[(d, m)]['rho'], '+.2f')}<br>p_holm={_fmt(cell[(d, m)]['p_holm'], '.3g')}<br>"
                     f"n={_count(cell[(d, m)]['n'])}" if (d, m) in cell else "n/a" for m in measures])
    fig.add_trace(go.Heatmap(z=z, x=[_esc(m) for m in measures], y=[f"depth {d}" for d in depths], text=text,
                             texttemplate="%{text}", zmin=-1, zmax=1, colorscale="RdBu",
                             colorbar=dict(title="Spearman rho")))
    return _layout(fig, f"{finding['title']}: rank correlation of each measure with trainability",
                   height=200 + 60 * len(depths), xaxis_title="measure",
                   yaxis=dict(autorange="reversed", title="network depth (blocks)"))


def seed_table_figure(payload: Mapping):
    """``seed_table``: the seed's Caltech-101 accuracy (x) against the reproduced accuracy (y, +/- sd
    over seeds), one colour per group, hover the id and formula; the title gives rho [lo, hi]."""
    import plotly.graph_objects as go

    finding = _require(payload, "seed_table")
    rows = finding["rows"]
    fig = go.Figure()
    for i, group in enumerate(dict.fromkeys(r["group"] for r in rows)):
        mine = [r for r in rows if r["group"] == group]
        fig.add_trace(go.Scatter(
            x=[_num(r["caltech"]) for r in mine], y=[_num(r["acc_mean"]) for r in mine], mode="markers",
            name=_esc(group), marker=dict(color=PALETTE[i % len(PALETTE)], size=9),
            error_y=dict(type="data", array=[_num(r["acc_sd"]) for r in mine], visible=True),
            customdata=[[_esc(r["id"]), _esc(r["formula"]), r["n_seeds"]] for r in mine],
            hovertemplate=("%{customdata[0]} %{customdata[1]}<br>Caltech-101 %{x:.1f}%<br>reproduced %{y:.1f}% "
                           "(%{customdata[2]} seeds)<extra></extra>")))
    if not rows:
        _empty(fig)
    title = (f"{finding['title']}: {finding['protocol']}, Spearman rho {_fmt(finding['rho'], '.2f')} "
             f"[{_fmt(finding['lo'], '.2f')}, {_fmt(finding['hi'], '.2f')}], n={_count(finding['n'])}")
    return _layout(fig, title, xaxis_title="the seed's Caltech-101 top-1 (%)",
                   yaxis_title="reproduced top-1 (%, mean +/- sd over seeds)", height=520)


def correlations_figure(payload: Mapping):
    """``correlations``: a heatmap of Spearman's rho per measure (rows, labelled ``kind. label``)
    and group (columns), each cell written ``rho [lo, hi] p_holm=..``; missing cells are ``n/a``."""
    import plotly.graph_objects as go

    finding = _require(payload, "correlations")
    rows = finding["rows"]
    fig = go.Figure()
    title = f"{finding['title']} (measured at {finding['when']})"
    if not rows:
        return _layout(_empty(fig), title)
    label = {r["measure"]: f"{r['kind'][:3]}. {r['label']}" for r in rows}
    measures = list(dict.fromkeys(r["measure"] for r in rows))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    cell = {(r["measure"], r["group"]): r for r in rows}
    z, text = [], []
    for m in measures:
        z.append([_num(cell[(m, g)]["rho"]) if (m, g) in cell else None for g in groups])
        text.append([(f"{_fmt(c['rho'], '+.2f')} [{_fmt(c['lo'], '+.2f')}, {_fmt(c['hi'], '+.2f')}]<br>"
                      f"p_holm={_fmt(c['p_holm'], '.3g')}") if (c := cell.get((m, g))) else "n/a" for g in groups])
    fig.add_trace(go.Heatmap(z=z, x=[_esc(g) for g in groups], y=[_esc(label[m]) for m in measures], text=text,
                             texttemplate="%{text}", zmin=-1, zmax=1, colorscale="RdBu",
                             colorbar=dict(title="Spearman rho")))
    return _layout(fig, title, xaxis_title="group", height=220 + 45 * len(measures),
                   yaxis=dict(autorange="reversed", title="measure"))


_FIGURES: dict[str, tuple[Callable, ...]] = {
    "cells": (cells_figure,),
    "verdict": (verdict_figure,),
    "trainability": (trainability_loss_figure, trainability_tests_figure),
    "seed_table": (seed_table_figure,),
    "correlations": (correlations_figure,),
}
assert set(_FIGURES) == set(FINDING_KINDS)


def finding_figures(payload: Mapping) -> list:
    """The figures of a finding (one, two for ``trainability``); ValueError with
    :func:`validate_finding`'s line when the payload is not a finding of a kind drawn here."""
    problem = validate_finding(payload)
    if problem:
        raise ValueError(problem)
    return [build(payload) for build in _FIGURES[payload["kind"]]]


def _flat(row: Mapping, prefix: str = "") -> dict[str, Any]:
    """A row with scalar cells only: nested objects become dotted columns, lists JSON text."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Mapping) and not prefix:
            out.update(_flat(value, f"{key}."))
        elif isinstance(value, (Mapping, list)):
            out[f"{prefix}{key}"] = json.dumps(value)
        else:
            out[f"{prefix}{key}"] = value
    return out


def finding_tables(payload: Mapping) -> list[tuple[str, list[dict[str, Any]]]]:
    """``(name, rows)`` for each list of rows in a finding (``rows``, and ``tests`` of a trainability
    finding), each row flat (a nested object such as ``measures`` becomes ``measures.<key>``
    columns). Any finding object works, whatever its kind; a field that is not a list of objects
    gives no table."""
    names = list(FINDING_SHAPES[payload["kind"]][1]) if payload.get("kind") in FINDING_SHAPES else ["rows"]
    out = []
    for name in names:
        rows = payload.get(name)
        if isinstance(rows, list) and all(isinstance(r, Mapping) for r in rows):
            out.append((name, [_flat(r) for r in rows]))
    return out
