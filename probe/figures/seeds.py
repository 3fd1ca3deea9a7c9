"""Runs of one recipe over several seeds: the mean and sample standard deviation of a number, and
training curves drawn as the mean with a +/- 1 sd band, one colour per group, on shared axes."""
from __future__ import annotations

import math
from typing import Sequence

from probe.figures._common import PALETTE

__all__ = ["mean_sd", "seed_band_curves"]

#: (metric key, panel, label, dash) of the curves drawn per group
_CURVES = (("test_top1", 1, "test top-1", "solid"), ("train_top1", 1, "train top-1", "dot"),
           ("test_loss", 2, "test loss", "solid"), ("train_loss", 2, "train loss", "dot"))


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, sd, n)`` of the finite values: the sample standard deviation (n - 1 in the
    denominator), None for fewer than two values; ``(None, None, 0)`` when none is finite."""
    xs = [float(v) for v in values
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    if not xs:
        return None, None, 0
    mean = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None, 1
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)), len(xs)


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def seed_band_curves(groups: Sequence[tuple[str, Sequence[Sequence[dict]]]]):
    """``groups``: ``(label, [per-epoch metrics of each run])`` pairs, the metrics as
    :meth:`RunStore.get_metrics` returns them. Left: top-1 accuracy (test solid, train dotted),
    right: loss; per group and epoch the mean over the runs that reached that epoch, with a band
    of +/- one sample standard deviation where at least two did. Both panels share their y axis
    across groups."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("top-1 accuracy (%), mean +/- sd over seeds",
                                                        "loss, mean +/- sd over seeds"))
    for i, (label, runs) in enumerate(groups):
        color = PALETTE[i % len(PALETTE)]
        name = f"{label} (n={len(runs)})"
        epochs = sorted({m["epoch"] for metrics in runs for m in metrics if isinstance(m.get("epoch"), int)})
        for key, col, what, dash in _CURVES:
            stats = [mean_sd([m.get(key) for metrics in runs for m in metrics if m.get("epoch") == ep])
                     for ep in epochs]
            xs = [ep for ep, (mean, _, _) in zip(epochs, stats) if mean is not None]
            means = [mean for mean, _, _ in stats if mean is not None]
            band = [(ep, mean, sd) for ep, (mean, sd, _) in zip(epochs, stats) if sd is not None]
            if band:
                bx = [ep for ep, _, _ in band]
                upper = [mean + sd for _, mean, sd in band]
                lower = [mean - sd for _, mean, sd in band]
                fig.add_trace(go.Scatter(x=bx + bx[::-1], y=upper + lower[::-1], fill="toself", mode="lines",
                                         line=dict(width=0), fillcolor=_rgba(color, 0.15), hoverinfo="skip",
                                         legendgroup=name, showlegend=False, name=f"{name} {what} +/- sd"),
                              row=1, col=col)
            fig.add_trace(go.Scatter(x=xs, y=means, mode="lines", name=f"{name} {what}", legendgroup=name,
                                     showlegend=key == "test_top1", line=dict(color=color, dash=dash)),
                          row=1, col=col)
    fig.update_xaxes(title="epoch")
    fig.update_yaxes(title="top-1 (%)", row=1, col=1)
    fig.update_yaxes(title="cross-entropy (nats)", row=1, col=2)
    fig.update_layout(title="training curves over seeds", template="plotly_white",
                      legend=dict(orientation="h", y=-0.2))
    return fig
