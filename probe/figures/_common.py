"""Shared bits of the figure builders: entry labels and a colour per entry."""
from __future__ import annotations

__all__ = ["entry_label", "PALETTE"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def entry_label(info: dict) -> str:
    """``model`` for a model probed by name, ``model @ epoch E`` (``init``) for a run's checkpoint."""
    model = info.get("model") or "model"
    epoch = info.get("epoch")
    if info.get("run_id") is None and epoch is None:
        return f"{model} (init)"
    return f"{model} @ {'init' if not epoch else f'epoch {epoch}'}"
