"""Standalone HTML pages of figures (plotly.js embedded: they open without a network)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_html"]


def write_html(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` (a plotly figure) as one self-contained page at ``path``, atomically."""
    from probe.store import atomic_write_text

    html = fig.to_html(include_plotlyjs=True, full_html=True)
    return atomic_write_text(Path(path), html)
