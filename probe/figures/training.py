"""Training curves of any selection of runs overlaid: top-1 / top-5 and loss, train and test, the
best epoch marked and the best-vs-final gap shown."""
from __future__ import annotations

from typing import Sequence

from probe.figures._common import PALETTE, rank_ticks

__all__ = ["training_curves"]


def training_curves(runs: Sequence[tuple[dict, list[dict]]]):
    """``runs``: ``(run dict, per-epoch metrics)`` pairs as :meth:`RunStore.get_run` and
    :meth:`RunStore.get_metrics` return them. Left: accuracy (test solid, train dotted, top-5
    dashed), the best test epoch marked with its best-final gap; right: loss."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("top-1 / top-5 accuracy (%)", "loss"))
    for i, (run, metrics) in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        name = f"{run.get('model')} {run['run_id'][-6:]}"
        ep = [m["epoch"] for m in metrics]

        def line(key, dash, col, label, show=False):
            fig.add_trace(go.Scatter(x=ep, y=[m.get(key) for m in metrics], mode="lines", name=f"{name} {label}",
                                     legendgroup=name, showlegend=show, line=dict(color=color, dash=dash)),
                          row=1, col=col)

        line("test_top1", "solid", 1, "test top-1", show=True)
        line("train_top1", "dot", 1, "train top-1")
        line("test_top5", "dash", 1, "test top-5")
        line("test_loss", "solid", 2, "test loss")
        line("train_loss", "dot", 2, "train loss")
        tests = [(m["test_top1"], m["epoch"]) for m in metrics if m.get("test_top1") is not None]
        if tests:
            best, at = max(tests)
            final = tests[-1][0]
            fig.add_trace(go.Scatter(x=[at], y=[best], mode="markers+text", marker=dict(color=color, size=10,
                                                                                       symbol="star"),
                                     text=[f"best {best:.1f} (final {final:.1f}, gap {best - final:.1f})"],
                                     textposition="top center", legendgroup=name, showlegend=False,
                                     name=f"{name} best"), row=1, col=1)
    fig.update_xaxes(title="epoch", **rank_ticks(max([len(m) for _, m in runs] + [1])))
    fig.update_yaxes(title="accuracy (%)", row=1, col=1)
    fig.update_yaxes(title="loss (cross-entropy, nats)", row=1, col=2)
    fig.update_layout(title="training curves", template="plotly_white", legend=dict(orientation="h", y=-0.2))
    return fig
