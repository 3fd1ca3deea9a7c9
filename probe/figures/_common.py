"""Shared bits of the figure builders: entry labels, a colour per entry, integer rank axes and
the check that every drawn axis has a title."""
from __future__ import annotations

import math

__all__ = ["entry_label", "PALETTE", "AU", "rank_ticks", "untitled_axes"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")

#: The unit of a quantity with no physical unit (eigenvalues of a loss's curvature, kernel values).
AU = "(a.u.)"


def entry_label(info: dict) -> str:
    """What the legend calls an entry: its model, its run (the id's last six characters) and its
    checkpoint: ``model (init)`` for a model probed by name, ``model run abc123 @ epoch E``
    (``@ init``) for a run's checkpoint."""
    model = info.get("model") or "model"
    epoch, run = info.get("epoch"), info.get("run_id")
    if run is None and epoch is None:
        return f"{model} (init)"
    where = "init" if not epoch else f"epoch {epoch}"
    return f"{model} run {str(run)[-6:]} @ {where}" if run else f"{model} @ {where}"


def rank_ticks(n: int) -> dict:
    """Axis settings for ranks 1..n on a linear axis: integer ticks only (1, 2, 3 ... or a step of
    1, 2 or 5 times a power of ten, about eight ticks), never 1.5."""
    n = max(int(n), 1)
    raw = max(1.0, n / 8)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return {"tickmode": "linear", "tick0": 1 if step == 1 else 0, "dtick": int(step), "tickformat": "d"}


def untitled_axes(fig) -> list[str]:
    """The names of the axes that carry data but no title (``xaxis2``, ``scene.zaxis``, ...): an
    empty list for a figure a reader can read without guessing."""
    out = []
    layout = fig.layout
    for trace in fig.data:
        if trace.type in ("pie", "table", "sankey", "indicator"):
            continue
        if trace.type in ("surface", "scatter3d", "mesh3d"):
            scene = getattr(trace, "scene", None) or "scene"
            for ax in ("xaxis", "yaxis", "zaxis"):
                if not getattr(getattr(layout[scene], ax).title, "text", None):
                    out.append(f"{scene}.{ax}")
            continue
        for letter in ("x", "y"):
            ref = getattr(trace, f"{letter}axis", None) or letter
            name = f"{letter}axis{ref[1:]}"
            axis = layout[name]
            if axis.visible is False:
                continue
            if not (axis.title and axis.title.text):
                out.append(name)
    return sorted(set(out))
