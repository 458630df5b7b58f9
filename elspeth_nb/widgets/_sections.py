"""HTML fragments of one run, built from ``Audit`` methods and ``elspeth_nb.charts`` only (never SQL).

The live explorer shows them in its tabs; its static snapshot concatenates them.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

import polars as pl

from elspeth_nb import charts
from elspeth_nb.errors import Error

LINEAGE_KEYS = ("row_index", "row_id", "token_id")
_STYLE = (
    "<style>.enb-section table{border-collapse:collapse;margin:0.3em 0 0.8em 0;font-size:12px}"
    ".enb-section th,.enb-section td{border:1px solid #ddd;padding:2px 6px;text-align:left}"
    ".enb-section th{background:#f4f4f4}.enb-section caption{text-align:left;font-weight:bold}"
    ".enb-charts{display:flex;flex-wrap:wrap;gap:12px}.enb-charts figure{margin:0}"
    ".enb-charts svg{max-width:100%;height:auto}.enb-note{color:#555}.enb-error{color:#b00020}</style>"
)


def summary_html(audit: Any, run_id: str) -> str:
    """The run's summary (header, nodes, outcomes, coalesce counts)."""
    return section("Summary", _html(audit.run_summary(run_id)))


def outcomes_html(audit: Any, run_id: str, *, with_charts: bool = True) -> str:
    """Terminal outcomes by outcome, sink and branch, with the outcome bars."""
    by_outcome = audit.outcomes(run_id, by="outcome")
    parts = [table(by_outcome, "Tokens by terminal outcome"),
             table(audit.outcomes(run_id, by="sink"), "By sink"),
             table(audit.outcomes(run_id, by="branch"), "By branch")]
    if with_charts:
        parts.insert(0, figures(charts.outcome_funnel(by_outcome)))
    return section("Outcomes", *parts)


def coalesce_html(audit: Any, run_id: str, *, with_charts: bool = True) -> str:
    """Merge timing summary, policy outcomes, and the wait, arrival and policy charts."""
    timings = audit.merge_timings(run_id)
    if timings.height == 0:
        return section("Coalesce analytics", note("This run took no coalesce decisions."))
    policy = audit.policy_outcomes(run_id)
    parts = [table(audit.merge_timing_summary(run_id, by=("coalesce", "policy")), "Decision waits (ms) per coalesce"),
             table(audit.merge_timing_summary(run_id), "Merge timing (ms) per coalesce and branch"),
             _html(policy)]
    if with_charts:
        if timings["wait_duration_ms"].is_not_null().any():
            parts.insert(0, figures(charts.wait_time_histogram(timings), charts.wait_time_ecdf(timings),
                                    charts.arrival_offsets(timings), charts.policy_outcomes_chart(policy)))
        else:  # every decision came with no branch in hand (all lost, or all late): no waits to plot
            parts[:0] = [note("No branch arrived before any decision, so there are no waits or arrival offsets "
                              "to plot."), figures(charts.policy_outcomes_chart(policy))]
    return section("Coalesce analytics", *parts)


def lineage_html(audit: Any, run_id: str, by: str, value: str | int) -> str:
    """The lineage of one source row, found by ``row_index``, ``row_id`` or ``token_id``; errors as a message."""
    if by not in LINEAGE_KEYS:
        raise ValueError(f"by must be one of {', '.join(LINEAGE_KEYS)}, not {by!r}")
    text = str(value).strip()
    if not text:
        return note("Enter a row index, row id or token id, then press Explain.")
    if by == "row_index" and not (text.isascii() and text.isdigit()):  # "²".isdigit(), but int("²") fails
        return error(f"A row index is a whole number (got {text!r}).")
    key: str | int = int(text) if by == "row_index" else text
    return guarded(lambda: _html(audit.lineage(run_id, **{by: key})))


def guarded(build: Callable[[], str]) -> str:
    """``build()``, or the message of an elspeth-nb error it raised, as HTML."""
    try:
        return build()
    except Error as exc:
        return error(str(exc))


def section(title: str, *parts: str) -> str:
    return f"<div class='enb-section'>{_STYLE}<h3>{escape(title)}</h3>{''.join(parts)}</div>"


def table(frame: pl.DataFrame, caption: str, max_rows: int = 30) -> str:
    from elspeth_nb.analysis.results import html_table

    return html_table(frame, caption, max_rows)


def figures(*chart_objects: Any) -> str:
    """Charts as inline SVG, side by side when they fit."""
    svgs = "".join(f"<figure>{charts.to_svg(c)}</figure>" for c in chart_objects)
    return f"<div class='enb-charts'>{svgs}</div>"


def note(text: str) -> str:
    return f"<p class='enb-note'>{escape(text)}</p>"


def error(text: str) -> str:
    return f"<p class='enb-error'>{escape(text)}</p>"


def _html(result: Any) -> str:
    if hasattr(result, "to_html"):
        return str(result.to_html())
    return str(result._repr_html_())
