"""Hessian figures: top-k eigenvalues and the spectral density, several targets overlaid; per-block
bars; sharpness across training against the edge-of-stability line 2/lr (Cohen et al. 2021).

Every builder reads a result only through ``summary()`` and ``arrays()`` (the stored form), so it
draws a result loaded from a runs folder exactly as a fresh one.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from probe.figures._common import AU, PALETTE, entry_label, rank_ticks

__all__ = ["hessian_figure", "hessian_blocks_figure", "hessian_across_training", "density_floor"]

#: The density axis ends this many decades below the lowest peak of the quadrature nodes.
FLOOR_DECADES = 1.0
#: ... and never more than this many decades below the density's maximum (round-off weights).
MAX_DECADES = 9.0


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def density_floor(arrays: dict, summary: dict) -> float | None:
    """The lowest density worth drawing on a log axis: :data:`FLOOR_DECADES` below the peak of the
    lightest quadrature node (weight w over ``probes`` probes: w / (probes sigma sqrt(2 pi))), at
    most :data:`MAX_DECADES` below the maximum; what lies below is only the Gaussian tails of the
    smoothing kernel (down to 1e-135 a few sigma out), not spectrum. None without a density."""
    dens = np.asarray(arrays.get("density", []), dtype=np.float64)
    if not dens.size or not np.isfinite(dens).any() or np.nanmax(dens) <= 0:
        return None
    top = float(np.nanmax(dens))
    floor = top * 10 ** -MAX_DECADES
    w = np.asarray(arrays.get("density_weights", []), dtype=np.float64)
    sigma = (summary.get("density") or {}).get("sigma")
    if w.size and (w > 0).any() and sigma:
        probes = w.shape[0] if w.ndim == 2 else 1
        peak = float(w[w > 0].min()) / (probes * float(sigma) * np.sqrt(2 * np.pi))
        floor = max(floor, peak * 10 ** -FLOOR_DECADES)
    return min(floor, top * 0.1)


def hessian_figure(entries: Sequence[tuple[dict, Any]]):
    """Left: the top-k (and bottom-k, when computed) eigenvalues against their rank (integer
    ticks), one line per entry (sign kept: negative curvature shows below zero). Right: the SLQ
    spectral density on a log axis (the bulk near zero and the outliers on one plot) down to
    :func:`density_floor`; below it a gap, not the kernel's tails."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("extreme eigenvalues", "spectral density (SLQ)"))
    ranks, floors, tops = 1, [], []
    for i, (info, result) in enumerate(entries):
        arrays, name = result.arrays(), entry_label(info)
        top = np.asarray(arrays.get("eigenvalues", []), dtype=np.float64)
        if top.size:
            ranks = max(ranks, top.size)
            fig.add_trace(go.Scatter(x=np.arange(1, top.size + 1), y=top, mode="lines+markers", name=name,
                                     legendgroup=name, line=dict(color=_color(i)), marker=dict(size=6)),
                          row=1, col=1)
        low = np.asarray(arrays.get("smallest_eigenvalues", []), dtype=np.float64)
        if low.size:
            ranks = max(ranks, low.size)
            fig.add_trace(go.Scatter(x=np.arange(1, low.size + 1), y=low, mode="markers", name=f"{name}: smallest",
                                     legendgroup=name, marker=dict(color=_color(i), symbol="x", size=7)),
                          row=1, col=1)
        grid = np.asarray(arrays.get("density_grid", []), dtype=np.float64)
        dens = np.asarray(arrays.get("density", []), dtype=np.float64)
        floor = density_floor(arrays, result.summary())
        if grid.size and dens.size == grid.size and floor is not None:
            floors.append(floor)
            tops.append(float(np.nanmax(dens)))
            shown = [float(d) if np.isfinite(d) and d >= floor else None for d in dens]
            fig.add_trace(go.Scatter(x=grid, y=shown, mode="lines", name=f"{name}: density", connectgaps=False,
                                     legendgroup=name, showlegend=False, line=dict(color=_color(i))),
                          row=1, col=2)
    fig.update_xaxes(title="rank (1 = most extreme)", row=1, col=1, **rank_ticks(ranks))
    fig.update_yaxes(title=f"eigenvalue {AU}", row=1, col=1)
    fig.update_xaxes(title=f"eigenvalue {AU}", row=1, col=2)
    fig.update_yaxes(title="density (per unit eigenvalue)", type="log", exponentformat="power", row=1, col=2)
    if floors:
        fig.update_yaxes(range=[np.log10(min(floors)), np.log10(max(tops)) + 0.3], row=1, col=2)
    fig.update_layout(title="Hessian spectrum", template="plotly_white", legend=dict(orientation="h", y=-0.2))
    return fig


def hessian_blocks_figure(entries: Sequence[tuple[dict, Any]]):
    """Per parameter block (``blocks`` option): the block's largest eigenvalue and its trace, grouped
    bars, one colour per entry. Entries without per-block results draw nothing (a note says so)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("largest eigenvalue per block", "trace per block"))
    drawn = 0
    for i, (info, result) in enumerate(entries):
        blocks = result.summary().get("blocks") or []
        if not blocks:
            continue
        drawn += 1
        names = [b["name"] for b in blocks]
        name = entry_label(info)
        fig.add_trace(go.Bar(x=names, y=[b.get("lambda_max") for b in blocks], name=name, legendgroup=name,
                             marker_color=_color(i)), row=1, col=1)
        fig.add_trace(go.Bar(x=names, y=[(b.get("trace") or {}).get("estimate") for b in blocks], name=name,
                             legendgroup=name, showlegend=False, marker_color=_color(i),
                             error_y=dict(type="data", array=[(b.get("trace") or {}).get("stderr") or 0.0
                                                              for b in blocks])), row=1, col=2)
    title = "Hessian per block" if drawn else "Hessian per block (no per-block results: run with --blocks)"
    fig.update_xaxes(title="parameter block")
    fig.update_yaxes(title=f"largest eigenvalue {AU}", row=1, col=1)
    fig.update_yaxes(title=f"trace {AU}", row=1, col=2)
    fig.update_layout(title=title, barmode="group", template="plotly_white", legend=dict(orientation="h", y=-0.3))
    return fig


def hessian_across_training(entries: Sequence[tuple[dict, Any]]):
    """lambda_max against the checkpoint epoch, one line per run, with the run's own 2/lr (dashed,
    same colour): gradient descent on a quadratic is stable only while lambda_max < 2/lr (the edge of
    stability). Right: the trace estimate with its standard error."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    runs: dict[str, list[tuple[int, dict]]] = {}
    for info, result in entries:
        key = str(info.get("run_id") or info.get("model") or "model")
        runs.setdefault(key, []).append((int(info.get("epoch") or 0), result.summary()))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("sharpness lambda_max vs 2/lr", "trace"))
    for i, (key, rows) in enumerate(sorted(runs.items())):
        rows.sort(key=lambda t: t[0])
        epochs = [e for e, _ in rows]
        label = rows[0][1].get("model") or key
        label = f"{label} ({key})" if key != label else label
        fig.add_trace(go.Scatter(x=epochs, y=[s.get("lambda_max") for _, s in rows], mode="lines+markers",
                                 name=label, legendgroup=key, line=dict(color=_color(i))), row=1, col=1)
        lr = [(e, s.get("lr")) for e, s in rows if s.get("lr")]
        if lr:
            fig.add_trace(go.Scatter(x=[e for e, _ in lr], y=[2.0 / v for _, v in lr], mode="lines",
                                     name=f"2/lr {label}", legendgroup=key,
                                     line=dict(color=_color(i), dash="dash")), row=1, col=1)
        tr = [(e, s.get("trace") or {}) for e, s in rows]
        tr = [(e, t) for e, t in tr if t.get("estimate") is not None]
        if tr:
            fig.add_trace(go.Scatter(x=[e for e, _ in tr], y=[t["estimate"] for _, t in tr], mode="lines+markers",
                                     name=f"trace {label}", legendgroup=key, showlegend=False,
                                     line=dict(color=_color(i)),
                                     error_y=dict(type="data", array=[t.get("stderr") or 0.0 for _, t in tr])),
                          row=1, col=2)
    fig.update_xaxes(title="epoch (checkpoint)")
    fig.update_yaxes(title=f"lambda_max and 2/lr {AU}", type="log", row=1, col=1)
    fig.update_yaxes(title=f"trace {AU}", row=1, col=2)
    fig.update_layout(title="Hessian across training", template="plotly_white",
                      legend=dict(orientation="h", y=-0.2))
    return fig
