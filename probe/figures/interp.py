"""Figures of the input-space interpolation probe (:mod:`probe.probes.interp`); pure functions, no I/O.

* :func:`interp_paths_figure` (the probe's registered builder): deviation from linearity against
  ``t`` (mean over paths with the interquartile band) and the mixup loss above its chord,
  same-class and different-class pairs side by side, several entries overlaid;
* :func:`interp_planes_figure`: per entry and triple, the predicted class and the largest
  probability over the plane through the three samples, the samples marked;
* :func:`interp_degree_figure`: histogram of the fitted polynomial degree per entry;
* :func:`interp_across_training`: the summary numbers against the checkpoint epoch, one line per run.

Every builder reads a result only through ``summary()`` and ``arrays()`` (the stored form).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from probe.figures._common import PALETTE, entry_label

__all__ = ["interp_paths_figure", "interp_planes_figure", "interp_degree_figure", "interp_across_training"]

_GROUPS = (("same_class", "same class"), ("different_class", "different class"))
_MAX_PLANE_ROWS = 6


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)}, {int(h[2:4], 16)}, {int(h[4:6], 16)}, {alpha})"


def _band(fig, t, rows: np.ndarray, name: str, color: str, row: int, col: int, show: bool) -> None:
    """Mean of ``rows`` (paths x T) over paths (NaN paths left out), with the 25-75% band."""
    import plotly.graph_objects as go

    ok = np.isfinite(rows).all(axis=1)
    rows = rows[ok]
    if not len(rows):
        return
    lo, hi = np.percentile(rows, 25, axis=0), np.percentile(rows, 75, axis=0)
    fig.add_trace(go.Scatter(x=np.concatenate([t, t[::-1]]), y=np.concatenate([hi, lo[::-1]]), fill="toself",
                             fillcolor=_rgba(color, 0.15), line=dict(width=0), hoverinfo="skip", showlegend=False,
                             legendgroup=name), row=row, col=col)
    fig.add_trace(go.Scatter(x=t, y=rows.mean(axis=0), mode="lines", name=name, legendgroup=name, showlegend=show,
                             line=dict(color=color)), row=row, col=col)


def interp_paths_figure(entries: Sequence[tuple[dict, Any]]):
    """Top: relative deviation from the chord ``dev(t)`` (mean over paths, band: 25-75%); bottom:
    the mixup loss above the straight line between its end values; left same-class pairs, right
    different-class pairs; one colour per entry."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, shared_xaxes=True, subplot_titles=(
        "deviation from linear: same class", "deviation from linear: different class",
        "mixup loss above its chord: same class", "mixup loss above its chord: different class"))
    drawn = 0
    for i, (info, result) in enumerate(entries):
        a = result.arrays()
        t = np.asarray(a["t"], dtype=np.float64)
        same = np.asarray(a["pair_same"], dtype=bool)
        dev = np.asarray(a["deviation"], dtype=np.float64)
        loss = np.asarray(a["loss"], dtype=np.float64)
        excess = loss - ((1 - t) * loss[:, :1] + t * loss[:, -1:]) if loss.size else loss
        name, shown = entry_label(info), False
        for col, mask in ((1, same), (2, ~same)):
            if not mask.any():
                continue
            _band(fig, t, dev[mask], name, _color(i), 1, col, not shown)
            _band(fig, t, excess[mask], name, _color(i), 2, col, False)
            shown = True
            drawn += 1
    if not drawn:
        fig.add_trace(go.Scatter(x=[], y=[], name="no paths"))
    fig.update_xaxes(title="t (x = (1 - t) x_a + t x_b)")
    fig.update_yaxes(title="||f - chord|| / ||f(x_b) - f(x_a)|| (ratio)", row=1)
    fig.update_yaxes(title="loss - chord (nats)", row=2)
    fig.update_layout(title="Outputs along mixup paths between test samples", template="plotly_white",
                      legend=dict(orientation="h", y=-0.15))
    return fig


def interp_planes_figure(entries: Sequence[tuple[dict, Any]]):
    """One row per (entry, triple), at most six: left the predicted class, right the largest
    softmax probability over the plane ``x_a + u (x_b - x_a) + v (x_c - x_a)``; the three samples
    at (0, 0), (1, 0), (0, 1) marked with their labels."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = []
    for info, result in entries:
        a = result.arrays()
        for k in range(len(a["plane_index"])):
            rows.append((info, a, k))
    rows = rows[:_MAX_PLANE_ROWS]
    if not rows:
        fig = go.Figure(go.Heatmap(z=[[0]], showscale=False, opacity=0))
        fig.add_annotation(text="no planes computed (triples = 0)", showarrow=False, xref="paper", yref="paper",
                           x=0.5, y=0.5)
        fig.update_layout(title="Decision regions on planes through three samples", template="plotly_white")
        return fig
    titles = []
    for info, a, k in rows:
        lab = entry_label(info)
        cls = ", ".join(str(int(c)) for c in a["plane_labels"][k])
        titles += [f"{lab}: predicted class (labels {cls})", f"{lab}: max probability"]
    fig = make_subplots(rows=len(rows), cols=2, subplot_titles=titles, horizontal_spacing=0.12,
                        vertical_spacing=min(0.08, 0.3 / len(rows)))
    n_classes = max(int(np.max(a["plane_pred"])) + 1 for _, a, _ in rows)
    for r, (info, a, k) in enumerate(rows, start=1):
        u, v = np.asarray(a["plane_u"], dtype=np.float64), np.asarray(a["plane_v"], dtype=np.float64)
        pred = np.asarray(a["plane_pred"][k])
        conf = np.asarray(a["plane_maxprob"][k], dtype=np.float64)
        fig.add_trace(go.Heatmap(x=u, y=v, z=pred, zmin=0, zmax=max(n_classes - 1, 1), colorscale="Turbo",
                                 showscale=False, customdata=conf,
                                 hovertemplate="u %{x:.3g}, v %{y:.3g}<br>class %{z}<br>p %{customdata:.3f}"
                                               "<extra></extra>"), row=r, col=1)
        fig.add_trace(go.Heatmap(x=u, y=v, z=conf, zmin=0, zmax=1, colorscale="Viridis", showscale=r == 1,
                                 colorbar=dict(title="p max", len=0.3, y=1, yanchor="top"),
                                 hovertemplate="u %{x:.3g}, v %{y:.3g}<br>p %{z:.3f}<extra></extra>"), row=r, col=2)
        labels = [f"{s} (y={int(c)})" for s, c in zip("abc", a["plane_labels"][k])]
        for col in (1, 2):
            fig.add_trace(go.Scatter(x=[0, 1, 0], y=[0, 0, 1], mode="markers+text", text=labels,
                                     textposition="top center", showlegend=False, hoverinfo="text",
                                     marker=dict(color="white", size=9, line=dict(color="black", width=1.5)),
                                     textfont=dict(color="white")), row=r, col=col)
    fig.update_xaxes(title="u (towards b)")
    fig.update_yaxes(title="v (towards c)")
    fig.update_layout(title="Decision regions on planes through three samples", template="plotly_white",
                      height=max(400, 330 * len(rows)))
    return fig


def interp_degree_figure(entries: Sequence[tuple[dict, Any]]):
    """Fraction of paths per fitted polynomial degree (the last bar: no degree up to max_degree fits),
    grouped bars, one colour per entry; same-class paths solid, different-class hatched."""
    import plotly.graph_objects as go

    fig = go.Figure()
    top = max([int(r.summary()["max_degree"]) + 1 for _, r in entries] or [1])
    cats = [str(d) for d in range(top)] + ["above"]
    for i, (info, result) in enumerate(entries):
        a, s = result.arrays(), result.summary()
        deg = np.asarray(a["degree"], dtype=np.int64)
        same = np.asarray(a["pair_same"], dtype=bool)
        above = deg > int(s["max_degree"])
        name = entry_label(info)
        for mask, kind, pattern in ((same, "same class", ""), (~same, "different class", "/")):
            if not mask.any():
                continue
            counts = [float(np.mean((deg[mask] == d) & ~above[mask])) for d in range(top)]
            counts.append(float(np.mean(above[mask])))
            fig.add_trace(go.Bar(x=cats, y=counts, name=f"{name}: {kind}", legendgroup=name,
                                 marker=dict(color=_color(i), pattern=dict(shape=pattern))))
    if not fig.data:
        fig.add_trace(go.Bar(x=cats, y=[0] * len(cats), name="no paths"))
    fig.update_layout(title="Lowest Chebyshev degree fitting each path's logits", barmode="group",
                      template="plotly_white", xaxis=dict(title="degree", type="category"),
                      yaxis=dict(title="fraction of paths"), legend=dict(orientation="h", y=-0.2))
    return fig


def interp_across_training(entries: Sequence[tuple[dict, Any]]):
    """The summary numbers against the checkpoint epoch, one colour per run; same-class solid,
    different-class dashed: mean maximal deviation, mean degree, fraction of paths with an extra
    class change, mean loss barrier."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    runs: dict[str, list[tuple[int, dict, str]]] = {}
    for info, result in entries:
        key = str(info.get("run_id") or info.get("model") or "model")
        runs.setdefault(key, []).append((int(info.get("epoch") or 0), result.summary(), info.get("model") or key))
    panels = (("deviation_max_mean", "max deviation (mean over paths)"), ("degree_mean", "fitted degree (mean)"),
              ("extra_change_fraction", "paths with an extra class change"), ("barrier_mean", "loss barrier (mean)"))
    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in panels])
    for i, (key, rows) in enumerate(sorted(runs.items())):
        rows.sort(key=lambda r: r[0])
        label = rows[0][2]
        label = f"{label} ({key})" if key != label else label
        epochs = [e for e, _, _ in rows]
        first = True
        for group, kind, dash in (("same_class", "same class", "solid"), ("different_class", "different class", "dash")):
            if not any((s.get(group) or {}).get("n") for _, s, _ in rows):
                continue
            for p, (metric, _) in enumerate(panels):
                fig.add_trace(go.Scatter(x=epochs, y=[(s.get(group) or {}).get(metric) for _, s, _ in rows],
                                         mode="lines+markers", name=f"{label}: {kind}", legendgroup=f"{key}{group}",
                                         showlegend=p == 0, line=dict(color=_color(i), dash=dash)),
                              row=p // 2 + 1, col=p % 2 + 1)
            first = False
        if first:                                              # a run without paths still gets a trace
            fig.add_trace(go.Scatter(x=epochs, y=[None] * len(epochs), name=label), row=1, col=1)
    if not fig.data:
        fig.add_trace(go.Scatter(x=[], y=[], name="no results"), row=1, col=1)
    fig.update_xaxes(title="epoch (checkpoint)")
    for p, unit in enumerate(("deviation (ratio)", "degree", "fraction of paths", "barrier (nats)")):
        fig.update_yaxes(title=unit, row=p // 2 + 1, col=p % 2 + 1)
    fig.update_layout(title="Input-space interpolation across training", template="plotly_white",
                      legend=dict(orientation="h", y=-0.15))
    return fig
