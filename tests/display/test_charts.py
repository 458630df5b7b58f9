"""Charts: aggregated in polars (the spec holds a few hundred points at most), rendered to SVG offline."""

from __future__ import annotations

import json
import random
from typing import Any

import altair as alt
import polars as pl
import pytest

from elspeth_nb import charts
from elspeth_nb.errors import NotFoundError
from tests.display.fakes import timings


def data(chart: Any) -> list[dict[str, Any]]:
    """The rows a chart spec carries (all its inline datasets)."""
    datasets = chart.to_dict()["datasets"]
    return [row for rows in datasets.values() for row in rows]


@pytest.fixture(scope="module")
def big_timings() -> pl.DataFrame:
    """100k (decision, branch) rows: 25k decisions of two coalesces, four branches each."""
    rng = random.Random(7)
    n = 100_000
    waits = [rng.expovariate(1 / 30) for _ in range(n // 4)]
    return pl.DataFrame({
        "event_id": [f"e{i // 4}" for i in range(n)],
        "coalesce": ["a" if (i // 4) % 2 else "b" for i in range(n)],
        "branch": ["w", "x", "y", "z"] * (n // 4),
        "status": rng.choices(["arrived", "late", "lost"], [0.8, 0.1, 0.1], k=n),
        "arrival_offset_ms": [rng.expovariate(1 / 20) for _ in range(n)],
        "wait_duration_ms": [w for w in waits for _ in range(4)],
        "late_by_ms": [rng.expovariate(1 / 10) for _ in range(n)],
    })


def test_histogram_counts_each_decision_once_in_shared_bins() -> None:
    chart = charts.wait_time_histogram(timings(), bins=3)
    assert isinstance(chart, alt.Chart)
    rows = sorted((r["coalesce"], r["bin_start"], r["bin_end"], r["count"]) for r in data(chart))
    # waits 12 and 150 (decision), 3 (vote): three equal bins over [3, 150], each decision counted once
    assert rows == [("decision", 3.0, 52.0, 1), ("decision", 101.0, 150.0, 1), ("vote", 3.0, 52.0, 1)]


def test_histogram_of_one_coalesce() -> None:
    rows = data(charts.wait_time_histogram(timings(), coalesce="vote", bins=5))
    assert {r["coalesce"] for r in rows} == {"vote"} and sum(r["count"] for r in rows) == 1


def test_ecdf_steps_reach_one_per_coalesce() -> None:
    rows = data(charts.wait_time_ecdf(timings()))
    decision = [(r["wait_duration_ms"], r["fraction"]) for r in rows if r["coalesce"] == "decision"]
    assert decision == [(12.0, 0.5), (150.0, 1.0)]


def test_arrival_offsets_quantiles_per_branch_and_late_tokens_apart() -> None:
    chart = charts.arrival_offsets(timings())
    assert isinstance(chart, alt.LayerChart)
    rows = {(r["coalesce"], r["branch"], r["status"]): r for r in data(chart)}
    assert set(rows) == {("decision", "sanctions", "arrived"), ("decision", "sanctions", "late"),
                         ("decision", "fraud", "arrived"), ("vote", "a", "arrived")}  # the lost branch has no arrival
    assert rows["decision", "sanctions", "late"]["p50"] == 190.0  # waited 150 ms, then 40 ms late
    fraud = rows["decision", "fraud", "arrived"]
    assert (fraud["count"], fraud["min"], fraud["p50"], fraud["max"]) == (2, 0.0, 6.0, 12.0)
    assert fraud["series"] == "decision · fraud"


def test_policy_outcomes_from_the_result_object_or_its_frame() -> None:
    from tests.display.fakes import FakeAudit

    result = FakeAudit().policy_outcomes()
    rows = data(charts.policy_outcomes_chart(result))
    assert rows == data(charts.policy_outcomes_chart(result.to_polars()))
    labels = {(r["panel"], r["label"], r["count"]) for r in rows}
    assert labels == {("decisions by trigger", "decision · timeout", 1),
                      ("decisions by trigger", "vote · quorum_met", 1),
                      ("late arrivals", "decision · sanctions: after_merge", 1),
                      ("lost branches", "vote · b: discarded", 1),
                      ("lost branches", "vote · c: quarantined (after the decision)", 2)}


def test_outcome_funnel_orders_the_lifecycle_and_flags_failures() -> None:
    outcomes = pl.DataFrame({"outcome": ["routed", "failed", "forked", "coalesced", "mystery"],
                             "is_failure": [False, True, False, False, False], "count": [5, 1, 4, 9, 2]})
    rows = sorted(data(charts.outcome_funnel(outcomes)), key=lambda r: r["order"])
    assert [r["category"] for r in rows] == ["forked", "coalesced", "routed", "failed", "mystery"]
    assert [r["is_failure"] for r in rows] == [False, False, False, True, False]


@pytest.mark.parametrize("make", [charts.wait_time_histogram, charts.wait_time_ecdf, charts.arrival_offsets])
def test_an_unknown_coalesce_is_named_with_the_ones_that_exist(make: Any) -> None:
    with pytest.raises(NotFoundError) as caught:
        make(timings(), coalesce="nope")
    assert str(caught.value).startswith("Coalesce `nope` not found. Available: `decision`, `vote`.")
    assert isinstance(caught.value, KeyError)
    assert data(make(timings().head(0), coalesce="vote")) == []  # an empty frame cannot tell: nothing to draw


def test_outcome_funnel_by_branch_colours_only_the_failed_part_of_a_bar() -> None:
    by_branch = pl.DataFrame({"branch": [None, None, None, "a", "a"],
                              "outcome": ["forked", "completed", "quarantined", "coalesced", "failed"],
                              "is_failure": [False, False, True, False, True], "count": [4, 5926, 5, 3, 1]})
    chart = charts.outcome_funnel(by_branch)
    rows = data(chart)
    assert chart.to_dict()["encoding"]["y"]["sort"] == {"field": "order", "op": "min"}  # not summed over segments
    segments = {(r["category"], r["outcome"]): (r["count"], r["is_failure"]) for r in rows}
    assert segments == {("(none)", "forked"): (4, False), ("(none)", "completed"): (5926, False),
                        ("(none)", "quarantined"): (5, True),
                        ("a", "coalesced"): (3, False), ("a", "failed"): (1, True)}
    assert sum(r["count"] for r in rows if r["is_failure"]) == 6  # not the 5,935 + 4 tokens of both whole bars
    order = {r["category"]: r["order"] for r in rows}
    assert order["(none)"] < order["a"]  # one place per bar, biggest total first


def test_outcome_funnel_by_sink_groups_on_the_sink() -> None:
    by_sink = pl.DataFrame({"sink": ["approved", "review", None], "outcome": ["routed", "routed", "forked"],
                            "count": [3, 1, 4]})
    assert {r["category"] for r in data(charts.outcome_funnel(by_sink))} == {"approved", "review", "(none)"}


@pytest.mark.parametrize("make", [charts.wait_time_histogram, charts.wait_time_ecdf, charts.arrival_offsets])
def test_specs_stay_small_whatever_the_run_size(make: Any, big_timings: pl.DataFrame) -> None:
    chart = make(big_timings)
    assert len(data(chart)) <= 300
    assert len(json.dumps(chart.to_dict())) < 60_000


def test_empty_timings_give_empty_charts_that_still_render() -> None:
    empty = timings().head(0)
    for make in (charts.wait_time_histogram, charts.wait_time_ecdf, charts.arrival_offsets):
        chart = make(empty)
        assert data(chart) == []
        assert charts.to_svg(chart).startswith("<svg")


def test_missing_columns_are_named() -> None:
    with pytest.raises(ValueError, match="wait_duration_ms"):
        charts.wait_time_histogram(pl.DataFrame({"coalesce": ["a"]}))
    with pytest.raises(TypeError, match="polars DataFrame"):
        charts.wait_time_ecdf([1, 2, 3])


def test_svg_is_self_contained() -> None:
    svg = charts.to_svg(charts.wait_time_histogram(timings(), bins=4))
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "Coalesce wait per decision" in svg and "decision" in svg
    without_namespaces = svg.replace("http://www.w3.org/2000/svg", "").replace("http://www.w3.org/1999/xlink", "")
    assert "http" not in without_namespaces and "<script" not in svg
