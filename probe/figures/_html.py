"""Standalone pages and static images of figures.

A page holds one figure or several (a probe's whole explorer page: its main figure and every
extra one). By default :func:`write_html` embeds plotly.js, so a page opens anywhere without a
network; pages written together can instead share one ``plotly.min.js`` file beside them
(:func:`write_plotlyjs`), loaded by a relative path, so they open offline as long as the folder
holding both travels whole (4.8 MB once instead of per page). :func:`write_image` writes PNG or
SVG through plotly's static-image engine (``kaleido``), when it is installed."""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

from probe.errors import UserError

__all__ = ["write_html", "write_plotlyjs", "write_image", "static_engine", "IMAGE_FORMATS"]

#: The static image formats :func:`write_image` writes.
IMAGE_FORMATS = ("png", "svg")


def write_plotlyjs(path: str | os.PathLike) -> Path:
    """Write the plotly.js bundle at ``path`` (atomically), unless the same bundle is already
    there; returns the path."""
    import plotly.offline
    from probe.store.atomic import atomic_write_bytes

    path = Path(path)
    bundle = plotly.offline.get_plotlyjs().encode("utf-8")
    try:
        if path.is_file() and not path.is_symlink() and path.stat().st_size == len(bundle) \
                and path.read_bytes() == bundle:
            return path
    except OSError:
        pass
    return atomic_write_bytes(path, bundle)


def _figures(figs: Any) -> list[tuple[str, Any]]:
    """``(title, figure)`` pairs of a figure, a ``{title: figure}`` mapping or a list of figures."""
    if isinstance(figs, Mapping):
        return [(str(t), f) for t, f in figs.items()]
    if isinstance(figs, Sequence) and not isinstance(figs, (str, bytes)):
        return [("", f) for f in figs]
    return [("", figs)]


def write_html(figs: Any, path: str | os.PathLike, *, plotlyjs: str | os.PathLike | None = None,
               title: str | None = None) -> Path:
    """Write ``figs`` (a plotly figure, a list of them or ``{heading: figure}``) as one page at
    ``path``, atomically, the figures one below the other under their headings.

    ``plotlyjs`` None: plotly.js is embedded in the page (about 4.8 MB). A path (a file name
    ending in ``.js``): the bundle is written there once (:func:`write_plotlyjs`) and the page
    loads it by its path relative to the page."""
    from probe.store.atomic import atomic_write_text

    path = Path(path)
    figures = _figures(figs)
    if plotlyjs is None:
        include: Any = True
    else:
        bundle = Path(plotlyjs)
        if not bundle.name.endswith(".js"):
            raise UserError(f"the shared plotly.js file must be named *.js, not {bundle.name!r}")
        write_plotlyjs(bundle)
        include = quote(Path(os.path.relpath(bundle.absolute(), path.absolute().parent)).as_posix())
    if len(figures) == 1 and not figures[0][0] and title is None:
        return atomic_write_text(path, figures[0][1].to_html(include_plotlyjs=include, full_html=True))
    if include is True:
        import plotly.offline

        script = f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>'
    else:
        script = f'<script src="{html.escape(include)}"></script>'
    parts = []
    for heading, fig in figures:
        if heading:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(fig.to_html(include_plotlyjs=False, full_html=False))
    name = html.escape(title or path.stem)
    page = (f'<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8" /><title>{name}</title>{script}</head>\n'
            f'<body style="font-family: sans-serif">\n<h1>{name}</h1>\n' + "\n".join(parts) + "\n</body>\n</html>\n")
    return atomic_write_text(path, page)


def static_engine() -> str | None:
    """Why static images cannot be written here (one line), or None when they can."""
    try:
        import kaleido  # noqa: F401  (plotly's static-image engine)
    except ImportError:
        return ("static images (--png / --svg) need plotly's image engine: pip install kaleido "
                "(it drives a Chromium; `plotly_get_chrome` installs one); --html works without it")
    return None


def write_image(fig, path: str | os.PathLike, *, fmt: str | None = None, scale: float = 2.0) -> Path:
    """Write ``fig`` as a PNG or SVG image at ``path`` (format from ``fmt`` or the suffix),
    atomically; a missing or failing image engine is one :class:`UserError` line."""
    from probe.store.atomic import atomic_write_bytes

    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in IMAGE_FORMATS:
        raise UserError(f"image format {fmt!r}: expected one of {', '.join(IMAGE_FORMATS)}")
    problem = static_engine()
    if problem:
        raise UserError(problem)
    try:
        data = fig.to_image(format=fmt, scale=scale if fmt == "png" else 1)
    except Exception as e:  # noqa: BLE001 - the engine's own failure (no Chromium, ...) as one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"the static-image engine failed writing {path.name}: {first[:300]}") from None
    return atomic_write_bytes(path, data)
