"""NTK figures: spectra on log-log axes, several targets overlaid; condition number and effective
rank across a run's checkpoints."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from probe.figures._common import AU, PALETTE, entry_label

__all__ = ["ntk_spectrum_figure", "ntk_across_training", "eigenlearning_figure"]


def ntk_spectrum_figure(entries: Sequence[tuple[dict, Any]]):
    """Eigenvalue against rank (log-log), one line per ``(info, NTK result)`` entry; non-positive
    eigenvalues (round-off of a PSD kernel) are left out of the log axis."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (info, result) in enumerate(entries):
        ev = np.sort(np.asarray(result.eigenvalues, dtype=np.float64))[::-1]
        keep = ev > 0
        fig.add_trace(go.Scatter(x=np.arange(1, ev.size + 1)[keep], y=ev[keep], mode="lines+markers",
                                 name=entry_label(info), line=dict(color=PALETTE[i % len(PALETTE)]),
                                 marker=dict(size=4)))
    fig.update_layout(title="NTK spectrum", xaxis=dict(title="rank (1 = largest)", type="log", tickformat="d"),
                      yaxis=dict(title=f"eigenvalue {AU}", type="log", exponentformat="power"),
                      template="plotly_white", legend=dict(orientation="h", y=-0.2))
    return fig


def ntk_across_training(entries: Sequence[tuple[dict, Any]]):
    """Condition number and effective rank against the checkpoint epoch (kernel methods only),
    one line per run (named by model and run)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    runs: dict[str, list[tuple[int, dict, dict]]] = {}
    for info, result in entries:
        spectrum = result.summary().get("spectrum") or {}
        if spectrum:
            key = str(info.get("run_id") or info.get("model") or "model")
            runs.setdefault(key, []).append((info.get("epoch") or 0, spectrum, info))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("condition number", "effective rank"))
    for i, (key, rows) in enumerate(runs.items()):
        rows.sort(key=lambda t: t[0])
        info = rows[0][2]
        label = f"{info.get('model') or 'model'} run {str(info['run_id'])[-6:]}" if info.get("run_id") \
            else str(info.get("model") or "model")
        epochs, color = [e for e, _, _ in rows], PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=epochs, y=[s["condition_number"] for _, s, _ in rows], mode="lines+markers",
                                 name=label, legendgroup=key, line=dict(color=color)), row=1, col=1)
        fig.add_trace(go.Scatter(x=epochs, y=[s["effective_rank"] for _, s, _ in rows], mode="lines+markers",
                                 name=label, legendgroup=key, showlegend=False, line=dict(color=color)),
                      row=1, col=2)
    fig.update_yaxes(title="lambda_max / lambda_min (ratio)", type="log", row=1, col=1)
    fig.update_yaxes(title="effective rank (eigenvalues)", row=1, col=2)
    fig.update_xaxes(title="epoch (checkpoint)")
    fig.update_layout(title="NTK across training", template="plotly_white", legend=dict(orientation="h", y=-0.2))
    return fig


def eigenlearning_figure(entries: Sequence[tuple[dict, Any]]):
    """Eigenlearning's predicted test MSE of kernel regression against the measured one (mean and
    spread over trials) for each training-set size n, one colour per entry (trace kernels only)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (info, result) in enumerate(entries):
        rows = (result.summary().get("eigenlearning") or {}).get("rows") or []
        if not rows:
            continue
        color, label = PALETTE[i % len(PALETTE)], entry_label(info)
        n = [r["n"] for r in rows]
        fig.add_trace(go.Scatter(x=n, y=[r["predicted_test_mse"] for r in rows], mode="lines+markers",
                                 name=f"{label} predicted", line=dict(color=color)))
        fig.add_trace(go.Scatter(x=n, y=[r["measured_test_mse"] for r in rows], mode="markers",
                                 name=f"{label} measured (KRR)", marker=dict(color=color, symbol="x", size=9),
                                 error_y=dict(type="data", array=[r.get("measured_test_mse_std") or 0 for r in rows])))
    fig.update_layout(title="eigenlearning: predicted vs measured test MSE", template="plotly_white",
                      xaxis=dict(title="training points n", type="log"),
                      yaxis=dict(title="test MSE (centred one-hot targets)", type="log"),
                      legend=dict(orientation="h", y=-0.2))
    return fig
