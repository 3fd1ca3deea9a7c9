"""Plain-text tables for the CLI and for results' ``text()``."""
from __future__ import annotations

__all__ = ["format_table"]


def format_table(rows: list[dict], columns: list[tuple[str, str]] | None = None, floatfmt: str = "{:.4g}") -> str:
    """Plain-text table: ``columns`` is a list of (key, header)."""
    if not rows:
        return "(none)"
    columns = columns or [(k, k) for k in rows[0]]

    def cell(v):
        if isinstance(v, float):
            return floatfmt.format(v)
        return "" if v is None else str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
