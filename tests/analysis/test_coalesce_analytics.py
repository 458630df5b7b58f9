"""coalesce_events, merge_timings, merge_timing_summary and policy_outcomes against the raw trail."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import polars as pl
import pytest

from elspeth_nb.analysis import Audit
from elspeth_nb.errors import NotFoundError
from tests.analysis import raw
from tests.analysis.conftest import CASES, HASHES_ONLY, JITTER, Matrix

ALL_CASES = [*CASES, JITTER, HASHES_ONLY]
TIMING_COLUMNS = ["event_id", "coalesce", "row_id", "policy", "merge_strategy", "trigger", "event_type", "branch",
                  "status", "token_id", "arrival_rank", "arrival_offset_ms", "wait_duration_ms", "late_by_ms",
                  "lost_reason"]
STATS = ("mean", "p50", "p90", "p99", "max")


@pytest.mark.parametrize("case", ALL_CASES)
def test_coalesce_events_are_the_decisions_typed(audit: Audit, matrix: Matrix, case: str) -> None:
    run = matrix.runs[case]
    events = matrix.raw("coalesce_events", case)
    decisions = audit.coalesce_events(run)
    assert decisions["event_id"].to_list() == [e["event_id"] for e in sorted(
        (e for e in events if e["event_type"] != "late_arrival"), key=lambda e: (e["decided_at"], e["event_id"]))]
    assert decisions.schema["branches_arrived"] == pl.List(pl.String)
    assert decisions.schema["arrival_offsets_ms"] == pl.List(pl.Float64)
    by_id = {e["event_id"]: e for e in events}
    for record in decisions.iter_rows(named=True):
        want = by_id[record["event_id"]]
        for column in ("trigger", "failure_reason", "branches_arrived", "arrived_token_ids", "arrival_offsets_ms",
                       "branches_lost", "lost_reasons", "wait_duration_ms", "merged_token_id", "context_json"):
            assert record[column] == want[column], column
    with_late = audit.coalesce_events(run, include_late=True)
    assert sorted(with_late["event_id"]) == sorted(by_id)
    assert audit.coalesce_events(run, coalesce="merge3").height == decisions.height


def test_unknown_coalesce_names_the_known_ones(audit: Audit, matrix: Matrix) -> None:
    with pytest.raises(NotFoundError, match=r"`merge4` not found\. Available: `merge3`"):
        audit.coalesce_events(matrix.runs[JITTER], coalesce="merge4")
    with pytest.raises(NotFoundError, match="merge3"):
        audit.merge_timings(matrix.runs[JITTER], coalesce="merge4")


def _normal(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    keys = ("event_id", "branch", "status", "token_id", "arrival_rank", "arrival_offset_ms", "wait_duration_ms",
            "late_by_ms", "lost_reason")
    return sorted(tuple(r[k] for k in keys) for r in records)


@pytest.mark.parametrize("case", ALL_CASES)
def test_merge_timings_one_row_per_decision_and_branch(audit: Audit, matrix: Matrix, case: str) -> None:
    run = matrix.runs[case]
    timings = audit.merge_timings(run)
    assert timings.columns == TIMING_COLUMNS
    assert _normal(timings.to_dicts()) == _normal(raw.expected_merge_timings(matrix.store, run))
    assert timings.height == sum(len(d["expected_branches"]) for d in raw.decisions(matrix.store, run))
    assert set(timings["status"]) <= {"arrived", "late", "lost", "missing"}
    arrived = timings.filter(pl.col("status") == "arrived")
    assert arrived["arrival_rank"].null_count() == 0
    assert timings.filter(pl.col("status") != "arrived")["arrival_rank"].null_count() == timings.height - arrived.height


def _by_row(audit: Audit, matrix: Matrix, case: str) -> dict[int, dict[str, dict[str, Any]]]:
    """row_index -> branch -> merge_timings record."""
    index = {r["row_id"]: r["row_index"] for r in matrix.raw("rows", case)}
    out: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for record in audit.merge_timings(matrix.runs[case]).iter_rows(named=True):
        out[index[record["row_id"]]][record["branch"]] = record
    return out


def test_merge_timings_tell_each_scenario(audit: Audit, matrix: Matrix) -> None:
    # quorum 2 of 3, b delayed 300 ms: a and c merge at once, b is 300 ms late
    delayed = _by_row(audit, matrix, "quorum-union-delayed")[0]
    assert [(b, r["status"], r["arrival_rank"]) for b, r in sorted(delayed.items())] == [
        ("a", "arrived", 1), ("b", "late", None), ("c", "arrived", 2)]
    assert delayed["b"]["late_by_ms"] == pytest.approx(300.0) and delayed["a"]["wait_duration_ms"] == 0.0
    # require_all, branch c of the toys row discarded: the decision fails on the lost branch
    lost = _by_row(audit, matrix, "require_all-nested-lost")[1]
    assert lost["c"]["status"] == "lost" and lost["c"]["lost_reason"] == "quarantined"
    assert lost["c"]["token_id"] is not None and lost["a"]["event_type"] == "failed"
    # quorum merges before c is discarded: c is missing, and says why it never came
    after = _by_row(audit, matrix, "quorum-nested-lost")[1]
    assert after["c"]["status"] == "missing" and after["c"]["lost_reason"] == "quarantined"
    # best_effort times out after 1 s with only a; b and c come 1 s later
    timeout = _by_row(audit, matrix, "best_effort-union-timeout")[2]
    assert timeout["a"]["trigger"] == "timeout" and timeout["a"]["wait_duration_ms"] == pytest.approx(1000.0)
    assert {b: r["late_by_ms"] for b, r in timeout.items() if r["status"] == "late"} == pytest.approx(
        {"b": 1000.0, "c": 1000.0})
    # require_all with select times out and fails; the late ones are late after a failure
    failed = _by_row(audit, matrix, "require_all-select-timeout")[0]
    assert failed["a"]["event_type"] == "failed" and failed["b"]["status"] == "late"
    # best_effort, b delayed: everything arrives, b 300 ms after the first arrival
    waited = _by_row(audit, matrix, "best_effort-select-delayed")[3]
    assert waited["b"]["arrival_offset_ms"] == pytest.approx(300.0) and waited["b"]["arrival_rank"] == 3


def _expected_summary(records: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple[Any, ...], dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[tuple(record[k] for k in keys)].append(record)
    out = {}
    for key, members in groups.items():
        waits = list({m["event_id"]: m["wait_duration_ms"] for m in members}.values())
        offsets = [m["arrival_offset_ms"] for m in members if m["status"] == "arrived"]
        row: dict[str, Any] = {"decisions": len(waits), "arrivals": len(offsets)}
        for prefix, values in (("wait", waits), ("arrival", offsets)):
            present = [v for v in values if v is not None]
            row |= {f"{prefix}_mean_ms": raw.mean(values), f"{prefix}_p50_ms": raw.quantile_cont(values, 0.5),
                    f"{prefix}_p90_ms": raw.quantile_cont(values, 0.9),
                    f"{prefix}_p99_ms": raw.quantile_cont(values, 0.99),
                    f"{prefix}_max_ms": max(present) if present else None}
        for status in ("late", "lost", "missing"):
            row[status] = sum(m["status"] == status for m in members)
        out[key] = row
    return out


@pytest.mark.parametrize("by", [("coalesce", "branch"), ("coalesce",), ("coalesce", "policy"),
                                ("coalesce", "trigger")])
@pytest.mark.parametrize("case", [JITTER, "best_effort-union-timeout", "quorum-nested-lost", "first-nested-timeout"])
def test_merge_timing_summary_percentiles(audit: Audit, matrix: Matrix, case: str, by: tuple[str, ...]) -> None:
    run = matrix.runs[case]
    records = raw.expected_merge_timings(matrix.store, run)
    decisions = {d["event_id"]: d for d in raw.decisions(matrix.store, run)}
    for record in records:
        event = decisions[record["event_id"]]
        record |= {"coalesce": event["coalesce_name"], "policy": event["policy"], "trigger": event["trigger"]}
    want = _expected_summary(records, by)
    got = audit.merge_timing_summary(run, by=by)
    assert got.columns[: len(by)] == list(by)
    assert {tuple(r[k] for k in by) for r in got.iter_rows(named=True)} == set(want)
    for record in got.iter_rows(named=True):
        expected = want[tuple(record[k] for k in by)]
        for column, value in expected.items():
            assert record[column] == (pytest.approx(value) if value is not None else None), (column, record)


def test_jitter_run_has_spread_out_percentiles(audit: Audit, matrix: Matrix) -> None:
    summary = audit.merge_timing_summary(matrix.runs[JITTER], by="coalesce").row(0, named=True)
    assert summary["decisions"] == 40
    assert 0 < summary["wait_p50_ms"] < summary["wait_p90_ms"] <= summary["wait_p99_ms"] <= summary["wait_max_ms"]
    assert summary["wait_max_ms"] == pytest.approx(120.0)  # the best_effort timeout


@pytest.mark.parametrize("by", [("colour",), (), ("coalesce", "coalesce"), "run_id"])
def test_summary_grouping_is_checked(audit: Audit, by: Any) -> None:
    with pytest.raises(ValueError, match="coalesce, branch, policy"):
        audit.merge_timing_summary(by=by)


@pytest.mark.parametrize("case", ALL_CASES)
def test_policy_outcomes_count_triggers_reasons_losses_and_lateness(audit: Audit, matrix: Matrix, case: str) -> None:
    run = matrix.runs[case]
    decisions = raw.decisions(matrix.store, run)
    late = raw.late_events(matrix.store, run)
    result = audit.policy_outcomes(run)
    assert Counter(dict(((c, t), n) for c, t, n in result.by_trigger.rows())) == Counter(
        (d["coalesce_name"], d["trigger"]) for d in decisions)
    assert Counter({(c, r, f): n for c, r, f, n in result.results.rows()}) == Counter(
        (d["coalesce_name"], d["event_type"], d["failure_reason"]) for d in decisions)
    by_event = {d["event_id"]: d["coalesce_name"] for d in decisions}
    lost_after = [(by_event[t["event_id"]], t["branch"], t["lost_reason"], "after_decision")
                  for t in raw.expected_merge_timings(matrix.store, run)
                  if t["status"] == "missing" and t["lost_reason"] is not None]
    assert Counter({(c, b, r, w): n for c, b, r, w, n in result.lost_branches.rows()}) == Counter(
        [(d["coalesce_name"], b, r, "before_decision") for d in decisions
         for b, r in zip(d["branches_lost"], d["lost_reasons"], strict=True)] + lost_after)
    want_late: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for event in late:
        after = "after_merge" if event["failure_reason"] is None else "after_failure"
        want_late[(event["coalesce_name"], event["late_branch"], after)].append(event["late_by_ms"])
    got_late = {(c, b, a): (n, m, x) for c, b, a, n, m, x in result.late_arrivals.rows()}
    assert set(got_late) == set(want_late)
    for key, values in want_late.items():
        assert got_late[key] == (len(values), pytest.approx(raw.mean(values)), pytest.approx(max(values)))
    tidy = result.to_polars()
    assert tidy.columns == ["coalesce", "kind", "key", "reason", "count", "mean_late_by_ms", "max_late_by_ms"]
    assert tidy["count"].sum() == len(decisions) * 2 + sum(d["n_lost"] for d in decisions) + len(lost_after) + len(late)


def test_policy_outcomes_display(audit: Audit, matrix: Matrix) -> None:
    result = audit.policy_outcomes(matrix.runs["require_all-nested-lost"])
    text = repr(result)
    assert "Decisions by trigger:" in text and "branch_lost" in text and "quarantined" in text
    assert "<table>" in result._repr_html_() and "Lost branches" in result.to_html()


def test_a_late_branch_arrival_offset_counts_from_the_first_arrival(tmp_path: Any) -> None:
    """The join opened with a loss (c at 0 ms), a arrived at 100 ms, the timeout merged at 200 ms and b came at
    500 ms: b's offset after the first arrival is 400 ms. The chart put it at wait + lateness, 500 ms."""
    from elspeth_nb import charts
    from elspeth_nb.analysis import open_audit
    from elspeth_nb.engine.clock import FakeClock
    from elspeth_nb.engine.runner import run_pipeline
    from tests.cases import ROWS, fork_pipeline, write_csv

    pipeline = fork_pipeline(write_csv(tmp_path / "in.csv", ROWS[1:2]), policy="best_effort", timeout_seconds=0.2,
                             lose_c_for="toys", slow={"a": 100, "b": 500})
    run_pipeline(pipeline, clock=FakeClock())
    with open_audit(tmp_path / "audit") as audit:
        timings = audit.merge_timings()
    assert timings.select("branch", "status", "arrival_offset_ms", "wait_duration_ms", "late_by_ms").rows() == [
        ("a", "arrived", 0.0, 200.0, None), ("b", "late", 400.0, 200.0, 300.0), ("c", "lost", None, 200.0, None)]
    late = charts.arrival_offsets(timings).data.filter(pl.col("status") == "late")
    assert late.select("min", "max").row(0) == (400.0, 400.0)
