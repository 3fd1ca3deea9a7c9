"""Figures of the gradient-variance probe: pure functions of :class:`probe.probes.gradvar.GradVarResult`.

``entries`` is a list of ``(info, result)`` pairs, ``info`` a dict with ``model``, ``run_id`` and
``epoch`` (several checkpoints or models overlaid, one colour per entry).

* :func:`gradvar_figure`: per layer (parameter tensors named on the x axis), log y: gradient
  variance tr(Sigma_1) (per-sample; the mini-batch estimate B tr(Sigma_B) where per-sample was off),
  SNR |G|^2 / tr(Sigma_B), noise scale B_simple and relative update |lr g| / |w|; with ``depth``
  (default) a third row with the depth curves.
* :func:`depth_curves`: activation variance and output-gradient norm per residual block vs depth
  (mean over initialisations, std as error bars), one line per entry: additive and multiplicative
  fusion side by side.

plotly is imported when a figure is built (importing this module stays cheap).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from probe.figures._common import PALETTE, entry_label, rank_ticks

__all__ = ["gradvar_figure", "depth_curves", "layer_series", "LAYER_PANELS", "DEPTH_PANELS"]

LAYER_PANELS = (("variance", "gradient variance tr(Σ₁)"), ("snr", "SNR |G|² / tr(Σ_B)"),
                ("noise_scale", "noise scale B_simple"),
                ("rel_update", "relative update |lr g| / |w| (tensors that train)"))
DEPTH_PANELS = (("act_var", "activation variance vs depth"), ("grad", "|∂l/∂h| vs depth"))
#: y axis titles of the panels, in the order of LAYER_PANELS and DEPTH_PANELS
LAYER_UNITS = ("tr(Σ₁) (squared loss gradient, a.u.)", "SNR (ratio)", "B_simple (samples)",
               "|lr g| / |w| (ratio)")
DEPTH_UNITS = ("activation variance (a.u.)", "|∂l/∂h| (a.u.)")


def _colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _positive(v) -> list[float | None]:
    """Values for a log axis: non-finite or non-positive entries as gaps (None)."""
    out = []
    for a in np.asarray(v, dtype=np.float64).reshape(-1):
        out.append(float(a) if math.isfinite(a) and a > 0 else None)
    return out


def _finite(v) -> list[float | None]:
    return [float(a) if math.isfinite(a) else None for a in np.asarray(v, dtype=np.float64).reshape(-1)]


def _depths(entries) -> int:
    return max([len(r.block_names) for _, r in entries] + [1])


def _trains(result: Any, n: int) -> list[bool]:
    """Per tensor, whether it trains (a result stored before this was measured: all do)."""
    t = getattr(result, "trains", None)
    return [True] * n if t is None else [bool(v) for v in np.asarray(t).reshape(-1)]


def layer_series(result: Any) -> dict[str, tuple[np.ndarray, str]]:
    """The per-layer series drawn for one result: ``{panel key: (values (L,), suffix)}``."""
    if result.per_sample and np.isfinite(result.per_sample_var).any():
        var, suffix = result.per_sample_var, ""
    else:
        var, suffix = result.batch_size * np.asarray(result.trace_cov), " (B·tr Σ_B)"
    return {"variance": (np.asarray(var), suffix), "snr": (np.asarray(result.snr), ""),
            "noise_scale": (np.asarray(result.noise_scale), ""), "rel_update": (np.asarray(result.rel_update), "")}


def _add_layer_traces(fig, entries: Sequence[tuple[dict, Any]], rows_cols) -> None:
    import plotly.graph_objects as go

    for i, (info, res) in enumerate(entries):
        label, colour = entry_label(info), _colour(i)
        names = list(res.names)
        trains = _trains(res, len(names))
        for p, ((key, _title), (row, col)) in enumerate(zip(LAYER_PANELS, rows_cols)):
            values, suffix = layer_series(res)[key]
            x, y = names, _positive(values)
            if key == "rel_update":            # a tensor that gets no gradient in training takes no step
                x, y = [n for n, t in zip(names, trains) if t], [v for v, t in zip(y, trains) if t]
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines+markers", name=label + suffix, legendgroup=label,
                showlegend=p == 0, line=dict(color=colour), marker=dict(size=4),
                hovertemplate="%{x}<br>%{y:.3g}<extra>" + label + "</extra>"), row=row, col=col)


def _add_depth_traces(fig, entries: Sequence[tuple[dict, Any]], rows_cols, showlegend: bool) -> None:
    import plotly.graph_objects as go

    for i, (info, res) in enumerate(entries):
        label, colour = entry_label(info), _colour(i)
        if not len(res.block_names):
            continue
        depth = [int(d) for d in res.block_depth]
        series = ((res.act_var_mean, res.act_var_std), (res.block_grad_mean, res.block_grad_std))
        for p, ((mean, std), (row, col)) in enumerate(zip(series, rows_cols)):
            fig.add_trace(go.Scatter(
                x=depth, y=_positive(mean), mode="lines+markers", name=label, legendgroup=label,
                showlegend=showlegend and p == 0, line=dict(color=colour),
                error_y=dict(type="data", array=_finite(std), visible=True), customdata=list(res.block_names),
                hovertemplate="%{customdata} (depth %{x})<br>%{y:.3g}<extra>" + label + "</extra>"),
                row=row, col=col)


def gradvar_figure(entries: Sequence[tuple[dict, Any]], *, depth: bool = True):
    """Per-layer gradient variance, SNR, noise scale and relative update (log y), entries overlaid;
    with ``depth`` and any entry having depth curves, a third row with :func:`depth_curves`' panels.

    Traces: 4 per entry (per-layer panels, in :data:`LAYER_PANELS` order), then 2 per entry with
    depth curves (:data:`DEPTH_PANELS`)."""
    from plotly.subplots import make_subplots

    entries = list(entries)
    with_depth = depth and any(len(r.block_names) for _, r in entries)
    titles = [t for _, t in LAYER_PANELS] + ([t for _, t in DEPTH_PANELS] if with_depth else [])
    rows = 3 if with_depth else 2
    fig = make_subplots(rows=rows, cols=2, subplot_titles=titles, vertical_spacing=0.1 if with_depth else 0.14)
    _add_layer_traces(fig, entries, [(1, 1), (1, 2), (2, 1), (2, 2)])
    for (r, c), unit in zip([(1, 1), (1, 2), (2, 1), (2, 2)], LAYER_UNITS):
        fig.update_yaxes(type="log", title_text=unit, row=r, col=c)
        fig.update_xaxes(title_text="parameter tensor", type="category", tickangle=-45, tickfont=dict(size=9),
                         row=r, col=c)
    if with_depth:
        _add_depth_traces(fig, entries, [(3, 1), (3, 2)], showlegend=False)
        for c, unit in zip((1, 2), DEPTH_UNITS):
            fig.update_yaxes(type="log", title_text=unit, row=3, col=c)
            fig.update_xaxes(title_text="block depth", row=3, col=c, **rank_ticks(_depths(entries)))
    fig.update_layout(title="Gradient variance per layer", height=440 * rows, hovermode="closest",
                      template="plotly_white", legend=dict(orientation="h", y=-0.12))
    return fig


def depth_curves(entries: Sequence[tuple[dict, Any]]):
    """Activation variance and output-gradient norm per block vs depth (log y), one line per entry
    with the std over initialisations as error bars. Traces: 2 per entry that has depth curves."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=[t for _, t in DEPTH_PANELS])
    _add_depth_traces(fig, list(entries), [(1, 1), (1, 2)], showlegend=True)
    for c, unit in zip((1, 2), DEPTH_UNITS):
        fig.update_yaxes(type="log", title_text=unit, row=1, col=c)
        fig.update_xaxes(title_text="block depth", row=1, col=c, **rank_ticks(_depths(entries)))
    fig.update_layout(title="Signal propagation at initialisation", height=420, hovermode="closest",
                      template="plotly_white")
    return fig
