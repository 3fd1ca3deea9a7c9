"""Loss-surface figures: 2D contours, 3D surfaces, 1D curves of several entries overlaid, and the
training trajectory on its PCA plane.

Every builder reads a result only through ``summary()`` and ``arrays()`` (the stored form). The
diagnostics that answer "my plot looks wrong" are on every figure: the centre loss (the model's
own loss on the subset), the direction norms relative to the weights and their cosine, and the
finite fraction. Non-finite losses are NaN in the arrays and drawn as gaps, never as zeros.
Arrays are (n_a, n_b) with ``loss[i, j]`` at (alpha[i], beta[j]); plotly wants z[row = y][col =
x], so z is the transpose with alpha on the x axis.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from probe.figures._common import PALETTE, entry_label

__all__ = ["surface_figure", "surface_3d", "surface_curves", "surface_trajectory", "diagnostics_line"]

_MAX_PANELS = 6
_LOG_RATIO = 50.0        # draw log10(loss) when the finite losses span more than this factor


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _g(v, fmt: str = ".4g") -> str:
    return "n/a" if v is None else format(v, fmt)


def diagnostics_line(summary: dict) -> str:
    """One line: centre loss, direction norms (relative to |theta|), cosine, finite fraction."""
    rel = summary.get("relative_norms") or []
    norms = ", ".join(f"|d{i + 1}| {_g(v, '.3g')} ({_g(r, '.2g')}|θ|)"
                      for i, (v, r) in enumerate(zip(summary.get("direction_norms") or [], rel)))
    cos = summary.get("cosine")
    sc = summary.get("loss_scale") or {}
    finite = sc.get("finite_fraction")
    parts = [f"centre loss {_g(summary.get('centre_loss'))}", norms]
    if cos is not None:
        parts.append(f"cos {cos:.2g}")
    if finite is not None and finite < 1:
        parts.append(f"finite {100 * finite:.0f}%")
    return ", ".join(p for p in parts if p)


def _two_d(entries) -> list[tuple[dict, Any]]:
    return [(info, r) for info, r in entries if "beta" in r.arrays()]


def _z(loss: np.ndarray) -> tuple[np.ndarray, str]:
    """(what to draw (n_b, n_a), its name): log10 when the loss spans more than _LOG_RATIO."""
    finite = loss[np.isfinite(loss)]
    z = np.asarray(loss, dtype=np.float64).T.copy()
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > _LOG_RATIO:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log10(z), "log10 loss"
    return z, "loss"


def _panel_title(info: dict, summary: dict) -> str:
    label = entry_label(info)
    return f"{label}: {summary.get('directions', '')}<br><sub>{diagnostics_line(summary)}</sub>"


def _empty(title: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=title, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, template="plotly_white")
    return fig


#: the directions' unit: a step of 1 moves the weights by the direction's norm (filter-normalised)
_UNIT = "× |d|"


def _colorbar(title: str, xdom, ydom) -> dict:
    """A colour bar beside its own panel: every panel has its own scale (an additive and a
    multiplicative model's losses can differ by orders of magnitude; one shared bar would clip one
    of them)."""
    return dict(title=title, x=xdom[1] + 0.01, xanchor="left", y=(ydom[0] + ydom[1]) / 2, yanchor="middle",
                len=(ydom[1] - ydom[0]) * 0.9, thickness=12)


def _contours(entries, title: str, trajectory: bool):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    shown = entries[:_MAX_PANELS]
    cols = min(3, len(shown))
    rows = -(-len(shown) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[_panel_title(i, r.summary()) for i, r in shown],
                        horizontal_spacing=0.14, vertical_spacing=0.16)
    for k, (info, result) in enumerate(shown):
        a, s = result.arrays(), result.summary()
        z, zname = _z(np.asarray(a["loss"]))
        row, col = k // cols + 1, k % cols + 1
        panel = fig.get_subplot(row, col)
        fig.add_trace(go.Contour(x=a["alpha"], y=a["beta"], z=z, connectgaps=False, ncontours=25,
                                 colorscale="Viridis", showscale=True, name=entry_label(info),
                                 colorbar=_colorbar(zname, panel.xaxis.domain, panel.yaxis.domain),
                                 contours=dict(coloring="heatmap"),
                                 hovertemplate="a %{x:.3g}<br>b %{y:.3g}<br>" + zname + " %{z:.4g}<extra></extra>"),
                      row=row, col=col)
        fig.add_trace(go.Scatter(x=[0.0], y=[0.0], mode="markers", marker=dict(symbol="x", color="white", size=9),
                                 name="centre", showlegend=False,
                                 hovertext=f"centre loss {_g(s.get('centre_loss'))}"), row=row, col=col)
        t = a.get("trajectory")
        if trajectory and t is not None and np.asarray(t).ndim == 2 and np.asarray(t).shape[1] >= 2:
            t = np.asarray(t)
            epochs = np.asarray(a.get("trajectory_epochs", np.arange(len(t))))
            fig.add_trace(go.Scatter(x=t[:, 0], y=t[:, 1], mode="lines+markers+text", text=[str(e) for e in epochs],
                                     textposition="top center", line=dict(color="#d62728"),
                                     marker=dict(size=6, color="#d62728"), name=f"{entry_label(info)}: trajectory"),
                          row=row, col=col)
        fig.update_xaxes(title=f"a (direction 1, {_UNIT})", constrain="domain", row=row, col=col)
        fig.update_yaxes(title=f"b (direction 2, {_UNIT})", scaleanchor=panel.xaxis.plotly_name.replace("axis", ""),
                         scaleratio=1, constrain="domain", row=row, col=col)      # equal aspect: a basin as it is
    more = f" (first {_MAX_PANELS} of {len(entries)})" if len(entries) > _MAX_PANELS else ""
    fig.update_layout(title=title + more, template="plotly_white", height=420 * rows + 80, width=460 * cols + 120,
                      margin=dict(t=120), legend=dict(orientation="h", y=-0.15))
    return fig


def surface_figure(entries: Sequence[tuple[dict, Any]]):
    """The 2D loss contours, one panel per 2D entry (at most 6), each titled with its
    diagnostics, the centre marked; 1D entries only: :func:`surface_curves`."""
    two = _two_d(entries)
    if not two:
        return surface_curves(entries)
    return _contours(two, "Loss surface", trajectory=True)


def surface_3d(entries: Sequence[tuple[dict, Any]]):
    """The 2D loss surfaces in 3D (one scene per entry, at most 6; NaN points are holes)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    two = _two_d(entries)[:_MAX_PANELS]
    if not two:
        return surface_curves(entries)
    cols = min(3, len(two))
    rows = -(-len(two) // cols)
    fig = make_subplots(rows=rows, cols=cols, specs=[[{"type": "scene"}] * cols for _ in range(rows)],
                        subplot_titles=[_panel_title(i, r.summary()) for i, r in two])
    for k, (info, result) in enumerate(two):
        a = result.arrays()
        z, zname = _z(np.asarray(a["loss"]))
        scene = "scene" if k == 0 else f"scene{k + 1}"
        fig.add_trace(go.Surface(x=a["alpha"], y=a["beta"], z=z, colorscale="Viridis", showscale=True,
                                 colorbar=_colorbar(zname, fig.layout[scene].domain.x, fig.layout[scene].domain.y),
                                 name=entry_label(info)),
                      row=k // cols + 1, col=k % cols + 1)
        fig.layout[scene].zaxis.title = zname
    # equal a and b scales (the grid's own), the loss axis flatter: a basin keeps its shape
    fig.update_scenes(xaxis_title=f"a ({_UNIT})", yaxis_title=f"b ({_UNIT})", aspectmode="manual",
                      aspectratio=dict(x=1, y=1, z=0.7))
    fig.update_layout(title="Loss surface (3D)", template="plotly_white", height=480 * rows + 60,
                      width=480 * cols + 120, margin=dict(t=110))
    return fig


def surface_curves(entries: Sequence[tuple[dict, Any]]):
    """Loss (left) and accuracy (right) along direction 1, every entry overlaid: a 1D entry's
    curve, a 2D entry's slice through b = 0 (the nearest row). The legend carries each entry's
    centre loss and direction norm."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    for i, (info, result) in enumerate(entries):
        a, s = result.arrays(), result.summary()
        loss, acc, alpha = np.asarray(a["loss"]), np.asarray(a["accuracy"]), np.asarray(a["alpha"])
        tag = ""
        if loss.ndim == 2:
            j = int(np.argmin(np.abs(np.asarray(a["beta"]))))
            loss, acc = loss[:, j], acc[:, j]
            tag = f" (b = {float(a['beta'][j]):.3g})"
        name = f"{entry_label(info)}: {s.get('directions', '')}{tag}"
        hover = diagnostics_line(s)
        fig.add_trace(go.Scatter(x=alpha, y=loss, mode="lines", name=name, legendgroup=name, hovertext=hover,
                                 line=dict(color=_color(i)), connectgaps=False), row=1, col=1)
        fig.add_trace(go.Scatter(x=alpha, y=acc, mode="lines", name=name, legendgroup=name, showlegend=False,
                                 line=dict(color=_color(i)), connectgaps=False), row=1, col=2)
        if s.get("centre_loss") is not None:
            fig.add_trace(go.Scatter(x=[0.0], y=[s["centre_loss"]], mode="markers", legendgroup=name,
                                     showlegend=False, hovertext=f"centre loss {_g(s['centre_loss'])}",
                                     marker=dict(color=_color(i), symbol="x", size=9)), row=1, col=1)
    fig.update_xaxes(title=f"a (direction 1, {_UNIT})")
    fig.update_yaxes(title="loss (cross-entropy, nats)", row=1, col=1)
    fig.update_yaxes(title="accuracy (fraction)", range=[0, 1], row=1, col=2)
    lines = "<br>".join(f"<sub>{entry_label(i)}: {diagnostics_line(r.summary())}</sub>" for i, r in entries[:4])
    fig.update_layout(title="Loss along the direction" + (f"<br>{lines}" if lines else ""), template="plotly_white",
                      margin=dict(t=80 + 18 * min(len(entries), 4)), legend=dict(orientation="h", y=-0.2))
    if not entries:
        fig.add_annotation(text="no surfaces", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    return fig


def surface_trajectory(entries: Sequence[tuple[dict, Any]]):
    """The training trajectory (pca directions) over the loss contours of its plane, checkpoints
    labelled by epoch; a note when no entry has a trajectory."""
    with_t = [(i, r) for i, r in _two_d(entries) if "trajectory" in r.arrays()]
    if not with_t:
        return _empty("Training trajectory: no pca surface among these (probe surface --directions pca)")
    return _contours(with_t, "Training trajectory on its PCA plane", trajectory=True)
