"""Standalone HTML pages of figures. By default plotly.js is embedded, so a page opens anywhere
without a network; pages written together can instead share one ``plotly.min.js`` file beside
them (:func:`write_plotlyjs`), loaded by a relative path, so they open offline as long as the
folder holding both travels whole."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from probe.errors import UserError

__all__ = ["write_html", "write_plotlyjs"]


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


def write_html(fig, path: str | os.PathLike, *, plotlyjs: str | os.PathLike | None = None) -> Path:
    """Write ``fig`` (a plotly figure) as one page at ``path``, atomically.

    ``plotlyjs`` None: plotly.js is embedded in the page (about 4.8 MB). A path (a file name
    ending in ``.js``): the bundle is written there once (:func:`write_plotlyjs`) and the page
    loads it by its path relative to the page."""
    from probe.store.atomic import atomic_write_text

    path = Path(path)
    if plotlyjs is None:
        return atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
    bundle = Path(plotlyjs)
    if not bundle.name.endswith(".js"):
        raise UserError(f"the shared plotly.js file must be named *.js, not {bundle.name!r}")
    write_plotlyjs(bundle)
    src = quote(Path(os.path.relpath(bundle.absolute(), path.absolute().parent)).as_posix())
    return atomic_write_text(path, fig.to_html(include_plotlyjs=src, full_html=True))
