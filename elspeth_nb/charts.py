"""Altair charts of the audit analytics: polars aggregates first, then a small chart spec.

Each function takes the polars frame (or result object) an ``Audit`` helper returns, reduces it in
polars to bins, quantiles or counts (a few hundred points whatever the run size) and returns an
Altair chart. ``to_svg`` renders any of them offline for static HTML. ``coalesce=`` keeps one
coalesce; a name the timings do not hold raises NotFoundError, as the ``Audit`` helpers do.

>>> import polars as pl
>>> timings = pl.DataFrame({"event_id": ["e1", "e2"], "coalesce": ["merge", "merge"],
...                         "wait_duration_ms": [3.0, 9.0]})
>>> spec = wait_time_histogram(timings, bins=2).to_dict()
>>> [row["count"] for row in next(iter(spec["datasets"].values()))]
[1, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import polars as pl

from elspeth_nb._arguments import require
from elspeth_nb.errors import NotFoundError

if TYPE_CHECKING:
    import altair as alt

WIDTH = 420
OUTCOME_ORDER = ("forked", "coalesced", "completed", "routed", "late_arrival", "failed", "quarantined",
                 "consumed_in_batch", "expanded", "buffered", "dropped", "discarded")
#: Panel of each policy_outcomes kind; a branch lost after its decision is a lost branch, labelled as such.
_POLICY_PANELS = {"trigger": "decisions by trigger", "result": "merged / failed", "lost_branch": "lost branches",
                  "lost_after_decision": "lost branches", "late_arrival": "late arrivals"}
_TITLES = {"outcome": "terminal outcome", "node_name": "node", "branch_name": "branch"}
_QUANTILES = {"p10": 0.1, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9}
_CATEGORIES = ("outcome", "node", "node_name", "sink", "branch", "branch_name")
_COUNTS = ("count", "tokens", "rows", "n")


def wait_time_histogram(timings: Any, *, coalesce: str | None = None, bins: int = 40) -> alt.Chart:
    """Histogram of how long each coalesce decision waited, stacked by coalesce, binned in polars.

    >>> chart = wait_time_histogram(audit.merge_timings("latest"), bins=20)
    >>> chart.data.height <= 20  # bins per coalesce, however many decisions
    True
    """
    waits = _decision_waits(timings, coalesce)
    binned = _histogram(waits, "wait_duration_ms", bins)
    import altair as alt

    chart: alt.Chart = alt.Chart(binned, title="Coalesce wait per decision").mark_bar().encode(
        x=alt.X("bin_start:Q", bin="binned", title="wait (ms)"),
        x2="bin_end:Q",
        y=alt.Y("count:Q", title="decisions"),
        color=alt.Color("coalesce:N", title="coalesce"),
        tooltip=["coalesce:N", alt.Tooltip("bin_start:Q", format=".1f"),
                 alt.Tooltip("bin_end:Q", format=".1f"), "count:Q"],
    ).properties(width=WIDTH)
    return chart


def wait_time_ecdf(timings: Any, *, coalesce: str | None = None, points: int = 100) -> alt.Chart:
    """Cumulative share of decisions that waited at most x ms, one line per coalesce (<= ``points`` each).

    >>> wait_time_ecdf(audit.merge_timings("latest")).data["fraction"].max()
    1.0
    """
    require(points, int, "points", "a positive int")
    if points < 1:
        raise ValueError(f"points must be at least 1, not {points}")
    waits = _decision_waits(timings, coalesce)
    curve = _ecdf(waits, "wait_duration_ms", points)
    import altair as alt

    chart: alt.Chart = alt.Chart(curve, title="Coalesce wait, cumulative").mark_line(interpolate="step-after").encode(
        x=alt.X("wait_duration_ms:Q", title="wait (ms)"),
        y=alt.Y("fraction:Q", title="share of decisions", axis=alt.Axis(format="%")),
        color=alt.Color("coalesce:N", title="coalesce"),
        tooltip=["coalesce:N", alt.Tooltip("wait_duration_ms:Q", format=".1f"),
                 alt.Tooltip("fraction:Q", format=".1%")],
    ).properties(width=WIDTH)
    return chart


def arrival_offsets(timings: Any, *, coalesce: str | None = None) -> alt.LayerChart:
    """Per branch, when its token arrived after the first one: p10-p90 whiskers, p25-p75 box, p50 tick.

    Late tokens (after the decision) are shown apart, at ``wait_duration_ms + late_by_ms``.

    >>> chart = arrival_offsets(audit.merge_timings("latest"))
    >>> sorted(set(chart.data["branch"]))
    ['enrich', 'fraud', 'sanctions']
    """
    frame = _coalesce_rows(_with_late_offsets(_frame(timings)), coalesce, "arrival_offset_ms")
    stats = _arrival_quantiles(frame)
    import altair as alt

    y = alt.Y("series:N", title=None, sort=alt.SortField("series"))
    y_offset = alt.YOffset("status:N", scale=alt.Scale(domain=["arrived", "late"]))
    color = alt.Color("status:N", title="arrival", scale=alt.Scale(domain=["arrived", "late"]))
    tooltip: list[Any] = ["coalesce:N", "branch:N", "status:N", "count:Q",
                          *(alt.Tooltip(f"{q}:Q", format=".1f") for q in ("min", *_QUANTILES, "max"))]
    base = alt.Chart(stats).encode(y=y, yOffset=y_offset, tooltip=tooltip).properties(width=WIDTH)
    whiskers = base.mark_rule().encode(x=alt.X("p10:Q", title="arrival offset after first arrival (ms)"),
                                       x2="p90:Q", color=color)
    box = base.mark_bar(size=8, opacity=0.7).encode(x="p25:Q", x2="p75:Q", color=color)
    median = base.mark_tick(color="black", thickness=2, size=10).encode(x="p50:Q")
    return alt.LayerChart(layer=[whiskers, box, median], title="Branch arrival offsets")


def policy_outcomes_chart(policy_outcomes: Any) -> alt.Chart:
    """What each coalesce policy did: decisions by trigger, merges and failures, lost branches, late arrivals.

    >>> policy_outcomes_chart(audit.policy_outcomes("latest")).data.columns
    ['order', 'coalesce', 'panel', 'label', 'count']
    """
    frame = _frame(policy_outcomes)
    _require(frame, ("coalesce", "kind", "key", "count"), "policy outcomes")
    reason = pl.col("reason") if "reason" in frame.columns else pl.lit(None, pl.String)
    label = pl.when(reason.is_null()).then(pl.col("key")).otherwise(pl.concat_str("key", pl.lit(": "), reason))
    label = pl.when(pl.col("kind") == "lost_after_decision").then(
        pl.concat_str(label, pl.lit(" (after the decision)"))).otherwise(label)
    if frame.get_column("coalesce").n_unique() > 1:
        label = pl.concat_str("coalesce", pl.lit(" · "), label)
    counts = (frame.group_by("coalesce", pl.col("kind").replace(_POLICY_PANELS).alias("panel"), label.alias("label"))
              .agg(pl.col("count").sum()).sort("panel", "coalesce", "count", descending=[False, False, True])
              .with_row_index("order"))
    import altair as alt

    chart: alt.Chart = alt.Chart(counts, title="Coalesce policy outcomes").mark_bar().encode(
        x=alt.X("count:Q", title="count"),
        y=alt.Y("label:N", title=None, sort=alt.SortField("order"), axis=alt.Axis(labelLimit=280)),
        color=alt.Color("coalesce:N", title="coalesce"),
        row=alt.Row("panel:N", title=None, sort=list(dict.fromkeys(_POLICY_PANELS.values())),
                    header=alt.Header(labelAngle=0, labelAlign="left", labelFontWeight="bold")),
        tooltip=["coalesce:N", "panel:N", "label:N", "count:Q"],
    ).resolve_scale(y="independent").properties(width=WIDTH)
    return chart


def outcome_funnel(outcomes: Any) -> alt.Chart:
    """Tokens per terminal outcome (or per node, sink or branch), in lifecycle order.

    A bar of a node, sink or branch is split by outcome, so only its failed and quarantined
    tokens are coloured as failures.

    >>> outcome_funnel(audit.outcomes("latest")).data.sort("order")["category"][0]
    'forked'
    """
    frame = _frame(outcomes)
    category = next((c for c in frame.columns if c in _CATEGORIES), None)
    count = next((c for c in _COUNTS if c in frame.columns), None)
    if category is None or count is None:
        raise ValueError(f"outcome_funnel needs a category column ({', '.join(_CATEGORIES)}) and a count column "
                         f"({', '.join(_COUNTS)}); got {', '.join(frame.columns)}")
    segments = _outcome_segments(frame, category, count)
    import altair as alt

    tooltip = ["category:N", *(["outcome:N"] if "outcome" in segments.columns else []), "count:Q", "is_failure:N"]
    chart: alt.Chart = alt.Chart(segments, title=f"Tokens by {_TITLES.get(category, category)}").mark_bar().encode(
        x=alt.X("count:Q", title="tokens"),
        y=alt.Y("category:N", title=None, sort=alt.EncodingSortField("order", op="min")),
        color=alt.Color("is_failure:N", title="failure",
                        scale=alt.Scale(domain=[False, True], range=["#4c78a8", "#e45756"])),
        order=alt.Order("is_failure:O"),
        tooltip=tooltip,
    ).properties(width=WIDTH)
    return chart


def to_svg(chart: alt.TopLevelMixin) -> str:
    """Render a chart to an SVG string offline (vl-convert, no browser, no network).

    >>> to_svg(outcome_funnel(audit.outcomes("latest")))[:4]
    '<svg'
    """
    import vl_convert

    return str(vl_convert.vegalite_to_svg(chart.to_dict(), vl_version=_vl_version()))


# -- polars aggregation -----------------------------------------------------------------------------


def _decision_waits(timings: Any, coalesce: str | None) -> pl.DataFrame:
    """One row per decision: ``coalesce``, ``wait_duration_ms`` (timings repeat it per branch)."""
    frame = _coalesce_rows(timings, coalesce, "wait_duration_ms")
    if "event_id" in frame.columns:
        frame = frame.unique("event_id", keep="first", maintain_order=True)
    return frame.select("coalesce", "wait_duration_ms")


def _coalesce_rows(timings: Any, coalesce: str | None, value: str) -> pl.DataFrame:
    frame = _frame(timings)
    if "coalesce" not in frame.columns and "coalesce_name" in frame.columns:
        frame = frame.rename({"coalesce_name": "coalesce"})
    _require(frame, ("coalesce", value), "merge timings")
    if coalesce is not None:
        _check_coalesce(frame, coalesce)
        frame = frame.filter(pl.col("coalesce") == coalesce)
    frame = frame.with_columns(pl.col(value).cast(pl.Float64))
    return frame.filter(pl.col(value).is_not_null() & pl.col(value).is_not_nan())


def _check_coalesce(frame: pl.DataFrame, coalesce: str) -> None:
    """NotFoundError naming the coalesces the timings hold, as the helpers do (an empty frame tells nothing)."""
    if not isinstance(coalesce, str):
        raise TypeError(f"coalesce must be a coalesce name (str) or None, not {type(coalesce).__name__}")
    known = sorted(frame.get_column("coalesce").drop_nulls().unique().cast(pl.String).to_list())
    if frame.height and coalesce not in known:
        raise NotFoundError("Coalesce", coalesce, known, hint="these timings hold decisions of those coalesces only")


def _with_late_offsets(frame: pl.DataFrame) -> pl.DataFrame:
    """Fill ``arrival_offset_ms`` of late branches that lack it (a late event recorded without one): the decision's
    wait plus how late they were, exact when the join opened with its first arrival."""
    if not {"status", "late_by_ms", "wait_duration_ms", "arrival_offset_ms"} <= set(frame.columns):
        return frame
    late = (pl.col("status") == "late") & pl.col("arrival_offset_ms").is_null()
    return frame.with_columns(arrival_offset_ms=pl.when(late).then(pl.col("wait_duration_ms") + pl.col("late_by_ms"))
                              .otherwise(pl.col("arrival_offset_ms")))


def _histogram(frame: pl.DataFrame, value: str, bins: int) -> pl.DataFrame:
    """Counts per (coalesce, bin) over ``bins`` equal bins shared by every coalesce."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1 (got {bins})")
    low, high = frame.select(pl.col(value).min().alias("low"), pl.col(value).max().alias("high")).row(0)
    low, high = low or 0.0, high or 0.0
    width = (high - low) / bins if high > low else 1.0
    index = ((pl.col(value) - low) / width).floor().clip(0, bins - 1).cast(pl.Int64)
    return (frame.group_by("coalesce", index.alias("bin")).agg(pl.len().alias("count"))
            .with_columns(bin_start=low + pl.col("bin") * width, bin_end=low + (pl.col("bin") + 1) * width)
            .sort("coalesce", "bin"))


def _ecdf(frame: pl.DataFrame, value: str, points: int) -> pl.DataFrame:
    """The empirical CDF per coalesce, thinned to about ``points`` steps (first and last kept)."""
    ranked = frame.sort(value).with_columns(
        rank=pl.int_range(1, pl.len() + 1).over("coalesce"), n=pl.len().over("coalesce"))
    step = (pl.col("n") / points).ceil().cast(pl.Int64)
    keep = (pl.col("rank") % step == 0) | (pl.col("rank") == 1) | (pl.col("rank") == pl.col("n"))
    return (ranked.filter(keep).with_columns(fraction=pl.col("rank") / pl.col("n"))
            .select("coalesce", value, "fraction").sort("coalesce", value))


def _arrival_quantiles(frame: pl.DataFrame) -> pl.DataFrame:
    """min/p10/p25/p50/p75/p90/max of arrival offsets per (coalesce, branch, arrived|late)."""
    _require(frame, ("branch",), "merge timings")
    status = pl.col("status") if "status" in frame.columns else pl.lit("arrived")
    value = pl.col("arrival_offset_ms")
    stats = (frame.with_columns(status.alias("status")).filter(pl.col("status").is_in(["arrived", "late"]))
             .group_by("coalesce", "branch", "status")
             .agg(pl.len().alias("count"), value.min().alias("min"),
                  *(value.quantile(q, "linear").alias(name) for name, q in _QUANTILES.items()),
                  value.max().alias("max")))
    several = stats.get_column("coalesce").n_unique() > 1
    label = pl.concat_str("coalesce", pl.lit(" · "), "branch") if several else pl.col("branch")
    return stats.with_columns(series=label).sort("coalesce", "branch", "status")


def _outcome_segments(frame: pl.DataFrame, category: str, count: str) -> pl.DataFrame:
    """Counts per (category, outcome, is_failure), each row with its category's place in the lifecycle order."""
    keys = [pl.col(category).cast(pl.String).fill_null("(none)").alias("category")]
    if "outcome" in frame.columns and category != "outcome":
        keys.append(pl.col("outcome").cast(pl.String))
    failure = pl.col("is_failure").fill_null(False) if "is_failure" in frame.columns else pl.lit(False)
    keys.append(failure.alias("is_failure"))
    segments = frame.group_by(keys).agg(pl.col(count).sum().alias("count"))
    order = _lifecycle_order(segments.group_by("category").agg(pl.col("count").sum())).select("category", "order")
    return segments.join(order, on="category").sort("order", "is_failure", *keys[1:-1])


def _lifecycle_order(totals: pl.DataFrame) -> pl.DataFrame:
    known = {name: i for i, name in enumerate(OUTCOME_ORDER)}
    ranked = totals.sort("count", descending=True).with_row_index("by_count")
    order = pl.col("category").replace_strict(known, default=None, return_dtype=pl.Int64)
    return ranked.with_columns(order=pl.coalesce(order, len(known) + pl.col("by_count"))).drop("by_count")


# -- plumbing -------------------------------------------------------------------------------------------


def _frame(data: Any) -> pl.DataFrame:
    """A polars DataFrame from a frame, a lazy frame or a result object with ``to_polars()``."""
    if isinstance(data, pl.LazyFrame):
        return data.collect()
    if isinstance(data, pl.DataFrame):
        return data
    if hasattr(data, "to_polars"):
        return _frame(data.to_polars())
    raise TypeError(f"expected a polars DataFrame or a result with .to_polars(), got {type(data).__name__}")


def _require(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} need column(s) {', '.join(missing)}; got {', '.join(frame.columns) or 'none'}")


def _vl_version() -> str | None:
    """The Vega-Lite version Altair writes, if vl-convert bundles it (else vl-convert's default)."""
    import altair
    import vl_convert

    wanted = ".".join(altair.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return wanted if wanted in vl_convert.get_vegalite_versions() else None


__all__ = [
    "arrival_offsets",
    "outcome_funnel",
    "policy_outcomes_chart",
    "to_svg",
    "wait_time_ecdf",
    "wait_time_histogram",
]
