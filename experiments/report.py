"""``python -m experiments report [--out DIR] [--to FILE]``: one standalone HTML page with the last
outputs of every experiment under the output root: per experiment its title, when it ran and for
how long, what it found, every figure (rebuilt from its plotly ``.json``) and every csv table.

The files are read as data: a figure is a JSON object with ``data`` and ``layout`` checked by
plotly before it is drawn, every text from a file is escaped, and a file that cannot be read is a
visible note in its experiment's section while the rest of the page renders. plotly.js is
embedded once, in the page's head, so the page opens without a network.
"""
from __future__ import annotations

import argparse
import csv
import html
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from probe import UserError

__all__ = ["write_report", "main", "MAX_TABLE_ROWS"]

#: Rows of a csv table shown in the page; the rest are in the file.
MAX_TABLE_ROWS = 200

#: Where the outputs go: experiments/out/ beside these scripts in a checkout; ./experiments/out under the
#: working directory when they run installed (``python -m probe.experiments``: never into site-packages).
DEFAULT_OUT = Path(__file__).resolve().parent / "out" if __package__ == "experiments" else Path("experiments", "out")
_META_FILES = ("done.json", "runs.json")
_STEM = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_FIGURE_HEIGHT = "480px"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { border-top: 2px solid #ccc; padding-top: 1rem; margin-top: 2.5rem; }
h3 { font-size: 1.05rem; margin-top: 1.5rem; font-family: monospace; }
.meta { color: #555; } .note { background: #fff3cd; border-left: 4px solid #e0a800; padding: .4rem .7rem; }
.table-wrap { overflow-x: auto; max-height: 32rem; overflow-y: auto; }
table { border-collapse: collapse; font-size: .85rem; }
th, td { border: 1px solid #ddd; padding: .2rem .5rem; text-align: left; white-space: nowrap; }
th { background: #f3f3f3; position: sticky; top: 0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figure { margin: .5rem 0 1.5rem 0; }
"""


@dataclass
class _Section:
    name: str
    folder: Path
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)   # (file name, html div)
    tables: list[tuple[str, str]] = field(default_factory=list)    # (file name, html table)
    anchor: str = ""                                               # the section's id in the page

    @property
    def title(self) -> str:
        t = self.meta.get("title")
        return t if isinstance(t, str) and t.strip() else self.name


def _ident(text: str) -> str:
    """A deterministic id fragment: lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _duration(seconds) -> str:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0 \
            or seconds == float("inf"):
        return "unknown"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def _read_meta(section: _Section) -> None:
    """The experiment's record: done.json (a finished run) else runs.json; unreadable ones are notes."""
    for fname in _META_FILES:
        path = section.folder / fname
        if not path.exists():
            continue
        try:
            meta = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except (OSError, ValueError, RecursionError) as e:
            section.notes.append(f"{fname} is not readable JSON ({_first_line(e)})")
            continue
        if not isinstance(meta, dict):
            section.notes.append(f"{fname} is not a JSON object")
            continue
        section.meta = meta
        if not (section.folder / "done.json").exists():
            section.notes.append("no done.json: the last run of this experiment did not finish (or is "
                                 "still running); its outputs may be incomplete or from an earlier run")
        return


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:200] + "..."


def _stems(section: _Section, key: str, suffix: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """The file stems the run listed under ``key`` in its record (in order), else every
    ``*<suffix>`` file in the folder by name."""
    listed = section.meta.get(key)
    if isinstance(listed, list) and all(isinstance(s, str) for s in listed):
        out = []
        for stem in listed:
            if _STEM.match(stem) and stem not in out:
                out.append(stem)
            elif not _STEM.match(stem):
                section.notes.append(f"skipped {key[:-1]} name {stem!r} listed in the record: not a plain file name")
        return out
    try:
        found = sorted(p.name[: -len(suffix)] for p in section.folder.iterdir()
                       if p.name.endswith(suffix) and p.name not in exclude)
    except OSError as e:
        section.notes.append(f"cannot list the folder ({_first_line(e)})")
        return []
    return [s for s in found if _STEM.match(s)]


def _read_text(section: _Section, fname: str) -> str | None:
    path = section.folder / fname
    try:
        if path.is_symlink() or not path.is_file():
            section.notes.append(f"{fname} is missing" if not path.exists() and not path.is_symlink()
                                 else f"{fname} is not a regular file; not read")
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        section.notes.append(f"{fname} cannot be read ({_first_line(e)})")
        return None


def _figure_div(section: _Section, stem: str) -> None:
    import plotly.graph_objects as go

    fname = f"{stem}.json"
    text = _read_text(section, fname)
    if text is None:
        return
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        section.notes.append(f"figure {fname} is not valid JSON ({_first_line(e)}); not shown")
        return
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list) or not isinstance(obj.get("layout"), dict):
        section.notes.append(f"figure {fname} is not a plotly figure (a JSON object with a 'data' list and a "
                             "'layout' object); not shown")
        return
    frames = obj.get("frames")
    try:
        fig = go.Figure(data=obj["data"], layout=obj["layout"], frames=frames if isinstance(frames, list) else None)
        div_id = f"{section.anchor}--{len(section.figures) + 1}-{_ident(stem)}"
        div = fig.to_html(include_plotlyjs=False, full_html=False, div_id=div_id,
                          default_height=_FIGURE_HEIGHT, default_width="100%")
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        section.notes.append(f"figure {fname} is not a valid plotly figure ({_first_line(e)}); not shown")
        return
    section.figures.append((fname, div))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return bool(cell.strip())


def _table_html(section: _Section, stem: str) -> None:
    fname = f"{stem}.csv"
    text = _read_text(section, fname)
    if text is None:
        return
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        section.notes.append(f"table {fname} is not a readable csv file ({_first_line(e)}); not shown")
        return
    rows = [r for r in rows if r]
    if not rows:
        section.tables.append((fname, '<p class="meta">(empty)</p>'))
        return
    header, body = rows[0], rows[1:]
    parts = []
    if len(body) > MAX_TABLE_ROWS:
        parts.append(f'<p class="meta">the first {MAX_TABLE_ROWS} of {len(body)} rows; all of them are in '
                     f'{_e(fname)}</p>')
    parts.append('<div class="table-wrap"><table><thead><tr>'
                 + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>")
    for row in body[:MAX_TABLE_ROWS]:
        parts.append("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if _is_number(c) else f"<td>{_e(c)}</td>"
                                      for c in row) + "</tr>")
    parts.append("</tbody></table></div>")
    if not body:
        parts.append('<p class="meta">(no rows)</p>')
    section.tables.append((fname, "\n".join(parts)))


def _collect(out: Path) -> list[_Section]:
    from . import EXPERIMENTS

    try:
        folders = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink()
                   and any((p / f).exists() for f in _META_FILES)]
    except OSError as e:
        raise UserError(f"cannot read the experiments' output root {out} ({_first_line(e)})") from None
    order = {name: i for i, name in enumerate(EXPERIMENTS)}
    folders.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    sections, anchors = [], set()
    for folder in folders:
        anchor = "exp-" + _ident(folder.name)
        while anchor in anchors:
            anchor += "-"
        anchors.add(anchor)
        section = _Section(name=folder.name, folder=folder, anchor=anchor)
        _read_meta(section)
        for stem in _stems(section, "figures", ".json", exclude=_META_FILES):
            _figure_div(section, stem)
        tables = _stems(section, "tables", ".csv")
        if "tables" not in section.meta and "numbers" in tables:   # numbers first, then the rest by name
            tables = ["numbers"] + [t for t in tables if t != "numbers"]
        for stem in tables:
            _table_html(section, stem)
        sections.append(section)
    return sections


def _section_html(section: _Section) -> str:
    meta = section.meta
    parts = [f'<section id="{section.anchor}">', f"<h2>{_e(section.title)}</h2>"]
    facts = [f"<code>{_e(section.name)}</code>"]
    if isinstance(meta.get("finished_at"), str):
        facts.append(f"finished {_e(meta['finished_at'])}")
    if "wall_s" in meta:
        facts.append(f"took {_e(_duration(meta.get('wall_s')))}")
    if isinstance(meta.get("quick"), bool):
        facts.append("quick settings" if meta["quick"] else "full settings")
    for key, what in (("run_ids", "run"), ("probe_ids", "probe row")):
        if isinstance(meta.get(key), list):
            facts.append(_count(len(meta[key]), what))
    if isinstance(meta.get("runs_root"), str):
        facts.append(f"runs root <code>{_e(meta['runs_root'])}</code>")
    parts.append(f'<p class="meta">{" &middot; ".join(facts)}</p>')
    for note in section.notes:
        parts.append(f'<p class="note">{_e(note)}</p>')
    found = meta.get("found")
    if isinstance(found, list) and found:
        parts.append("<h3>Found</h3><ul>" + "".join(f"<li>{_e(line)}</li>" for line in found) + "</ul>")
    for fname, div in section.figures:
        parts.append(f'<h3>{_e(fname)}</h3><div class="figure">{div}</div>')
    for fname, table in section.tables:
        parts.append(f"<h3>{_e(fname)}</h3>{table}")
    parts.append("</section>")
    return "\n".join(parts)


def _page(out: Path, sections: list[_Section]) -> str:
    head = ['<!doctype html>', '<html lang="en">', "<head>", '<meta charset="utf-8">',
            f"<title>Experiments: {_e(out.name or out)}</title>", f"<style>{_STYLE}</style>"]
    if any(s.figures for s in sections):
        import plotly.offline

        head.append("<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>")
        head.append(f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>')
    head.append("</head>")
    toc = ["<nav><h2>Contents</h2><ol>"]
    for s in sections:
        what = f"{_count(len(s.figures), 'figure')}, {_count(len(s.tables), 'table')}"
        if s.notes:
            what += f", {_count(len(s.notes), 'note')}"
        toc.append(f'<li><a href="#{s.anchor}">{_e(s.title)}</a> <span class="meta">({_e(s.name)}: {what})</span></li>')
    toc.append("</ol></nav>")
    body = ["<body>", "<h1>Experiments</h1>",
            f'<p class="meta">{_count(len(sections), "experiment")} from <code>{_e(out)}</code></p>',
            *toc, *(_section_html(s) for s in sections), "</body>", "</html>", ""]
    return "\n".join(head + body)


def write_report(out: Path, to: Path | None = None) -> Path:
    """Write one standalone HTML page (atomically) with every experiment's last outputs under the
    output root ``out`` (the folders holding a ``done.json`` or ``runs.json``) to ``to`` (default
    ``<out>/report.html``); returns its path. Raises :class:`~probe.errors.UserError` when there is
    nothing to report."""
    from probe import atomic_write_text

    out = Path(out)
    if not out.is_dir():
        raise UserError(f"no experiment outputs at {out}: not a folder; run python -m experiments first "
                        "or pass the output root with --out")
    sections = _collect(out)
    if not sections:
        raise UserError(f"nothing to report under {out}: no experiment folder with a done.json or runs.json; "
                        "run python -m experiments first or pass the output root with --out")
    to = Path(to) if to is not None else out / "report.html"
    if to.is_dir():
        raise UserError(f"cannot write the report to {to}: it is a folder; give a file name")
    return atomic_write_text(to, _page(out, sections))


def main(argv: list[str] | None = None) -> int:
    """The ``report`` subcommand: prints the page's path (or one JSON object with ``--json``)."""
    from probe.cli.common import user_error_types

    p = argparse.ArgumentParser(prog="python -m experiments report",
                                description="one standalone HTML page with every experiment's figures and tables",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output root: one folder per experiment")
    p.add_argument("--to", default=None, help="the page to write (default: <out>/report.html)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)
    try:
        path = write_report(Path(args.out), Path(args.to) if args.to else None)
    except user_error_types() as e:
        print(f"python -m experiments report: error: {_first_line(e)}", file=sys.stderr)
        return 2
    print(json.dumps({"report": str(path)}) if args.json else str(path))
    return 0
