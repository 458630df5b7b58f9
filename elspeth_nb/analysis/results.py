"""Display plumbing shared by the analysis result objects: plain-text and HTML tables.

Every result object is a frozen dataclass with ``to_polars()``, a public ``to_html()`` that
``_repr_html_`` delegates to, and a plain-text ``__repr__`` for terminals and logs.

>>> import polars as pl
>>> print(text_table(pl.DataFrame({"branch": ["a", "b"], "count": [3, 1]})))
branch  count
a           3
b           1
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from html import escape
from typing import Any

import polars as pl

#: Rows shown by the text and HTML renderings before "... N more rows".
MAX_ROWS = 20
#: Characters of one cell shown in text renderings.
MAX_CELL = 48

STYLE = (
    "<style>.enb-result table{border-collapse:collapse;margin:0.3em 0 0.8em 0;font-size:12px}"
    ".enb-result th,.enb-result td{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}"
    ".enb-result th{background:#f4f4f4}.enb-result caption{text-align:left;font-weight:bold;padding:2px 0}"
    ".enb-result pre{font-size:12px;line-height:1.35;background:#fafafa;padding:6px;border:1px solid #eee}"
    ".enb-bad{color:#b00020;font-weight:bold}.enb-ok{color:#106b21;font-weight:bold}</style>"
)


def format_value(value: Any, width: int | None = MAX_CELL) -> str:
    """One cell as short readable text (floats to 3 decimals, times without microseconds).

    A float too small for 3 decimals keeps 2 significant digits, and below 1e-9 (arithmetic noise,
    as in a delta of two equal sums) it is 0, never "-0".

    >>> [format_value(v) for v in (1234.5678, 0.0004, -1.4e-14, -0.0, 2e16)]
    ['1,234.568', '0.0004', '0', '0', '2e+16']
    """
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1e15 else f"{value:.6g}"
        if text in ("0", "-0"):
            text = "0" if abs(value) < 1e-9 else f"{value:.2g}"
    elif isinstance(value, datetime):
        text = value.isoformat(sep=" ", timespec="milliseconds")
    elif isinstance(value, list | dict):
        text = json.dumps(value, default=str, ensure_ascii=False)
    else:
        text = str(value)
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def text_table(frame: pl.DataFrame, max_rows: int = MAX_ROWS, indent: str = "") -> str:
    """A frame as aligned plain text (numbers right-aligned), at most ``max_rows`` rows."""
    if frame.width == 0:
        return indent + "(no columns)"
    shown = frame.head(max_rows)
    numeric = [dtype.is_numeric() for dtype in frame.dtypes]
    cells = [[format_value(v) for v in row] for row in shown.iter_rows()]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(frame.columns)]

    def line(values: Iterable[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return (indent + "  ".join(parts)).rstrip()

    header = [c.ljust(w) for c, w in zip(frame.columns, widths, strict=True)]
    lines = [(indent + "  ".join(header)).rstrip(), *(line(r) for r in cells)]
    if frame.height == 0:
        lines.append(indent + "(no rows)")
    elif frame.height > max_rows:
        lines.append(f"{indent}... {frame.height - max_rows} more rows")
    return "\n".join(lines)


def html_table(frame: pl.DataFrame, caption: str = "", max_rows: int = MAX_ROWS) -> str:
    """A frame as an escaped HTML table, at most ``max_rows`` rows."""
    head = "".join(f"<th>{escape(c)}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(format_value(v, width=200))}</td>" for v in row) + "</tr>"
        for row in frame.head(max_rows).iter_rows()
    )
    more = ""
    if frame.height > max_rows:
        more = f"<tr><td colspan='{frame.width}'>… {frame.height - max_rows} more rows</td></tr>"
    elif frame.height == 0:
        more = f"<tr><td colspan='{max(frame.width, 1)}'>(no rows)</td></tr>"
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}{more}</tbody></table>"


def html_block(title: str, *parts: str) -> str:
    """A titled ``<div class="enb-result">`` around already-escaped HTML parts."""
    return f"<div class='enb-result'>{STYLE}<h4>{escape(title)}</h4>{''.join(parts)}</div>"


def html_pairs(pairs: Iterable[tuple[str, Any]]) -> str:
    """A two-column key/value table."""
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(format_value(v, width=200))}</td></tr>" for k, v in pairs)
    return f"<table><tbody>{rows}</tbody></table>"


def verdict_html(ok: bool, text: str) -> str:
    return f"<p class='{'enb-ok' if ok else 'enb-bad'}'>{escape(text)}</p>"


class Displayable:
    """Mixin: ``_repr_html_`` delegates to the public ``to_html()``."""

    def to_html(self) -> str:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _repr_html_(self) -> str:
        return self.to_html()
