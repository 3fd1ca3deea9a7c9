"""Figures of the saturation probe (:mod:`probe.probes.saturation`); pure functions, no I/O.

* :func:`saturation_figure` (the probe's registered builder): for several entries (checkpoints of a
  run, or models) a gate x entry heatmap of the saturated output fraction; for one entry per-gate
  bars of the saturated fractions (outputs outside their band, logits beyond the threshold) over
  the logit histograms of the most saturated gates.
* :func:`saturation_histograms`: the logit histograms of chosen gates of one result, overlaid.

Results are duck-typed (``names``, ``frac_output_sat``, ``frac_logit_sat``, ``gain``, ``hist``,
``edges``, ``count``, ``threshold``, ``note``), so this module does not import the probe.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from probe.figures._common import entry_label

__all__ = ["fraction_top", "saturation_figure", "saturation_histograms"]

_TOP_HISTOGRAMS = 4


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        k = seen.get(lab, 0)
        seen[lab] = k + 1
        out.append(lab if k == 0 else f"{lab} #{k + 1}")
    return out


def _none_nan(values) -> list:
    return [None if (v is None or not math.isfinite(float(v))) else float(v) for v in values]


def _centers(edges: np.ndarray) -> np.ndarray:
    return (edges[:-1] + edges[1:]) / 2                                   # (bins,)


def _empty(title: str, text: str, trace=None):
    """A figure that says ``text`` (with ``trace``, an empty placeholder, so it still has one trace)."""
    import plotly.graph_objects as go

    fig = go.Figure() if trace is None else go.Figure(trace)
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(title=title, xaxis={"visible": False}, yaxis={"visible": False})
    return fig


def _top(result: Any, k: int) -> list[int]:
    frac = np.asarray(result.frac_output_sat, dtype=np.float64)
    order = sorted(range(len(frac)), key=lambda i: (-np.nan_to_num(frac[i], nan=-1.0), i))
    return order[:k]


def _single(info: dict, result: Any):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    title = f"gate saturation: {entry_label(info)}"
    if result.n_gates == 0:
        return _empty(title, result.note or "no gates", go.Bar(x=[], y=[], name="outputs outside band"))
    top = _top(result, min(_TOP_HISTOGRAMS, result.n_gates))
    k = len(top)
    names = [str(n) for n in result.names]
    fig = make_subplots(
        rows=2, cols=k, specs=[[{"colspan": k}] + [None] * (k - 1), [{} for _ in range(k)]],
        row_heights=[0.55, 0.45], vertical_spacing=0.2,
        subplot_titles=["saturated fraction per gate"]
        + [f"{names[i]} (under {int(result.hist[i, 0])}, over {int(result.hist[i, -1])})" for i in top])
    fig.add_trace(go.Bar(x=names, y=_none_nan(result.frac_output_sat), name="outputs outside band",
                         customdata=_none_nan(result.gain),
                         hovertemplate="%{x}<br>saturated %{y:.3f}<br>gain %{customdata:.3f}<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=_none_nan(result.frac_logit_sat), name=f"|z| > {result.threshold:g}",
                         hovertemplate="%{x}<br>|z| beyond threshold %{y:.3f}<extra></extra>"), row=1, col=1)
    centers = _centers(np.asarray(result.edges, dtype=np.float64))
    width = float(result.edges[1] - result.edges[0])
    for j, i in enumerate(top):
        n = max(int(result.count[i]), 1)
        fig.add_trace(go.Bar(x=centers.tolist(), y=(result.hist[i, 1:-1] / n).tolist(), width=width,
                             name=f"logits {names[i]}", showlegend=False,
                             hovertemplate="z %{x:.2f}<br>fraction %{y:.4f}<extra></extra>"), row=2, col=j + 1)
        fig.update_xaxes(title_text="logit z (gate input)", row=2, col=j + 1)
        fig.update_yaxes(title_text="fraction of logits", row=2, col=j + 1)
    fig.update_xaxes(title_text="gate", row=1, col=1)
    fig.update_yaxes(title_text="fraction of gate outputs", range=[0, fraction_top(result.frac_output_sat,
                                                                             result.frac_logit_sat)],
                     tickformat=".1%", row=1, col=1)
    fig.update_layout(title=title, barmode="group", bargap=0.15, template="plotly_white")
    return fig


def fraction_top(*values) -> float:
    """The upper end of a fraction axis fitted to the bars: 1.15 times the largest finite value
    (at least 1e-3, at most 1), so bars of ~0.01 are seen, not flat against a 0-1 axis."""
    finite = [float(v) for vs in values for v in np.asarray(vs, dtype=np.float64).reshape(-1) if np.isfinite(v)]
    return min(1.0, max(1e-3, 1.15 * max(finite, default=0.0)))


def _heatmap(entries: Sequence[tuple[dict, Any]]):
    import plotly.graph_objects as go

    labels = _unique([entry_label(info) for info, _ in entries])
    gates = list(dict.fromkeys(str(n) for _, r in entries for n in r.names))
    if not gates:
        notes = {r.note for _, r in entries if getattr(r, "note", None)}
        return _empty("gate saturation", "; ".join(sorted(notes)) or "no gates",
                      go.Heatmap(z=[], x=labels, y=[], zmin=0.0, zmax=1.0, colorscale="Viridis"))
    row = {g: i for i, g in enumerate(gates)}
    z = np.full((len(gates), len(entries)), np.nan)                       # (G, E) saturated output fraction
    gain = np.full((len(gates), len(entries)), np.nan)                    # (G, E)
    for e, (_, r) in enumerate(entries):
        for i, name in enumerate(r.names):
            z[row[str(name)], e] = r.frac_output_sat[i]
            gain[row[str(name)], e] = r.gain[i]
    fig = go.Figure(go.Heatmap(
        z=[_none_nan(v) for v in z], x=labels, y=gates, zmin=0.0, zmax=1.0, colorscale="Viridis",
        customdata=[_none_nan(v) for v in gain], colorbar={"title": "saturated"},
        hovertemplate="%{y}<br>%{x}<br>saturated %{z:.3f}<br>gain %{customdata:.3f}<extra></extra>"))
    fig.update_layout(title="saturated fraction (gate outputs outside their band) per gate and target",
                      xaxis={"title": "target (model, run, checkpoint)"},
                      yaxis={"autorange": "reversed", "title": "gate"}, height=max(400, 18 * len(gates) + 160))
    return fig


def saturation_figure(entries: Sequence[tuple[dict, Any]]):
    """The probe's figure: ``entries`` a list of ``(info, SaturationResult)``; one entry gives
    per-gate bars plus the histograms of its most saturated gates, several a gate x entry heatmap."""
    entries = list(entries)
    if not entries:
        return _empty("gate saturation", "no results")
    if len(entries) == 1:
        return _single(*entries[0])
    return _heatmap(entries)


def saturation_histograms(result: Any, gates: Sequence[str | int] | None = None):
    """Overlaid logit histograms (fraction of the gate's finite logits per bin) of ``gates`` (names
    or indices; ``None``: every gate). The underflow / overflow counts are the points one bin
    width beyond either end of the range."""
    import plotly.graph_objects as go

    names = [str(n) for n in result.names]
    if gates is None:
        idx = list(range(len(names)))
    else:
        idx = []
        for g in gates:
            if isinstance(g, (int, np.integer)) and not isinstance(g, bool):
                if not 0 <= int(g) < len(names):
                    raise ValueError(f"gate index {g} out of range [0, {len(names)})")
                idx.append(int(g))
            elif str(g) in names:
                idx.append(names.index(str(g)))
            else:
                raise ValueError(f"no gate {g!r}; gates: {', '.join(names) or '(none)'}")
    title = f"logit histograms ({len(idx)} gate(s))"
    if not idx:
        return _empty(title, getattr(result, "note", None) or "no gates")
    edges = np.asarray(result.edges, dtype=np.float64)
    width = float(edges[1] - edges[0])
    x = [float(edges[0] - width)] + _centers(edges).tolist() + [float(edges[-1] + width)]
    fig = go.Figure()
    for i in idx:
        n = max(int(result.count[i]), 1)
        fig.add_trace(go.Scatter(x=x, y=(result.hist[i] / n).tolist(), mode="lines", line={"shape": "hvh"},
                                 name=names[i],
                                 hovertemplate=names[i] + "<br>z %{x:.2f}<br>fraction %{y:.4f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="logit z (outer points: under / overflow)",
                      yaxis_title="fraction of finite logits")
    return fig


def saturation_by_group(entries: Sequence[tuple[dict, Any]]):
    """Saturated fraction of gate outputs per gate family (fusion, SE, CBAM, Triplet, CA, NAM, plain
    modules, functional calls), grouped bars with one colour per entry."""
    import plotly.graph_objects as go

    fig = go.Figure()
    shown = []
    for info, result in entries:
        groups = result.by_group()
        shown += [d["frac_output_sat"] for _, d in groups if d["frac_output_sat"] is not None]
        fig.add_trace(go.Bar(x=[g for g, _ in groups], y=_none_nan([d["frac_output_sat"] for _, d in groups]),
                             name=entry_label(info),
                             customdata=[d["n_gates"] for _, d in groups],
                             hovertemplate="%{x}: %{y:.2%} of outputs saturated (%{customdata} gates)"))
    fig.update_layout(title="saturated outputs per gate kind", barmode="group", template="plotly_white",
                      xaxis=dict(title="gate kind"),
                      yaxis=dict(title="fraction outside the band", tickformat=".1%", range=[0, fraction_top(shown)]),
                      legend=dict(orientation="h", y=-0.2))
    return fig
