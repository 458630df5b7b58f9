"""run_summary and outcomes, checked against Python over the raw segments."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml

from elspeth_nb.analysis import Audit
from tests.analysis import raw
from tests.analysis.conftest import CASES, JITTER, Matrix

SOME_CASES = ["require_all-nested-lost", "quorum-nested-lost", "quorum-select-timeout", "first-union-delayed", JITTER]


def _terminal(matrix: Matrix, case: str) -> list[dict[str, object]]:
    return [o for o in matrix.raw("token_outcomes", case) if o["is_terminal"] == 1]


@pytest.mark.parametrize("case", [*CASES, JITTER])
def test_outcome_counts_by_outcome(audit: Audit, matrix: Matrix, case: str) -> None:
    got = audit.outcomes(matrix.runs[case])
    want = Counter(o["outcome"] for o in _terminal(matrix, case))
    assert dict(zip(got["outcome"], got["count"], strict=True)) == want
    failures = {o for o, f in zip(got["outcome"], got["is_failure"], strict=True) if f}
    assert failures == {o for o in want if o in ("failed", "quarantined")}
    assert "late_arrival" not in failures


@pytest.mark.parametrize("case", SOME_CASES)
def test_outcome_counts_by_sink_branch_and_node(audit: Audit, matrix: Matrix, case: str) -> None:
    run = matrix.runs[case]
    terminal = _terminal(matrix, case)
    tokens = {t["token_id"]: t for t in matrix.raw("tokens", case)}
    nodes = {n["node_id"]: n["node_name"] for n in matrix.raw("nodes", case)}
    last_state: dict[str, dict[str, object]] = {}
    for state in sorted(matrix.raw("node_states", case), key=lambda s: (s["step_index"], s["started_at"])):
        last_state[state["token_id"]] = state

    by_sink = audit.outcomes(run, by="sink")
    assert Counter({(s, o): n for s, o, n in by_sink.select("sink", "outcome", "count").rows()}) == Counter(
        (o["sink_name"], o["outcome"]) for o in terminal)
    by_branch = audit.outcomes(run, by="branch")
    assert Counter({(b, o): n for b, o, n in by_branch.select("branch", "outcome", "count").rows()}) == Counter(
        (tokens[o["token_id"]]["branch_name"], o["outcome"]) for o in terminal)
    by_node = audit.outcomes(run, by="node")
    assert Counter({(b, o): n for b, o, n in by_node.select("node", "outcome", "count").rows()}) == Counter(
        (nodes[last_state[o["token_id"]]["node_id"]], o["outcome"]) for o in terminal)


def test_unknown_grouping_lists_the_choices(audit: Audit) -> None:
    with pytest.raises(ValueError, match="outcome, node, sink, branch"):
        audit.outcomes(by="colour")


@pytest.mark.parametrize("case", SOME_CASES)
def test_run_summary_matches_the_raw_trail(audit: Audit, matrix: Matrix, case: str) -> None:
    run = matrix.runs[case]
    summary = audit.run_summary(run)
    latest = raw.latest_run(matrix.store, run)
    header = summary.header
    assert summary.run_id == run and summary.status == "completed"
    for key in ("config_hash", "producer", "payload_mode", "canonical_version", "started_at", "completed_at"):
        assert header[key] == latest[key], key
    assert header["rows"] == len(matrix.raw("rows", case))
    assert header["tokens"] == len(matrix.raw("tokens", case))
    assert header["transform_errors"] == len(matrix.raw("transform_errors", case))
    assert header["validation_errors"] == len(matrix.raw("validation_errors", case))
    assert header["quarantined"] == sum(o["outcome"] == "quarantined" for o in _terminal(matrix, case))

    nodes = {n["node_id"]: n for n in matrix.raw("nodes", case)}
    states = defaultdict(list)
    for state in matrix.raw("node_states", case):
        states[state["node_id"]].append(state)
    decisions = raw.decisions(matrix.store, run)
    assert summary.nodes["node_name"].to_list() == [
        n["node_name"] for n in sorted(nodes.values(), key=lambda n: n["sequence_in_pipeline"])]
    for record in summary.nodes.iter_rows(named=True):
        node = next(n for n in nodes.values() if n["node_name"] == record["node_name"])
        mine = states[node["node_id"]]
        assert record["states"] == len(mine)
        assert record["completed"] == sum(s["status"] == "completed" for s in mine)
        assert record["failed"] == sum(s["status"] == "failed" for s in mine)
        durations = [s["duration_ms"] for s in mine]
        if node["node_type"] == "coalesce":  # waits apart from processing time
            waits = [d["wait_duration_ms"] for d in decisions if d["node_id"] == node["node_id"]]
            assert record["mean_duration_ms"] is None and record["p95_duration_ms"] is None
            assert record["mean_wait_ms"] == pytest.approx(raw.mean(waits))
            assert record["p95_wait_ms"] == pytest.approx(raw.quantile_cont(waits, 0.95))
            assert record["max_wait_ms"] == pytest.approx(max(w for w in waits if w is not None))
            assert record["late_arrivals"] == sum(e["event_type"] == "late_arrival" and e["node_id"] == node["node_id"]
                                                  for e in matrix.raw("coalesce_events", case))
        else:
            assert record["mean_wait_ms"] is None and record["late_arrivals"] is None
            assert record["mean_duration_ms"] == pytest.approx(raw.mean(durations))
            assert record["p95_duration_ms"] == pytest.approx(raw.quantile_cont(durations, 0.95))

    [coalesce] = summary.coalesce.rows(named=True)
    events = matrix.raw("coalesce_events", case)
    assert coalesce["merged"] == sum(e["event_type"] == "merged" for e in events)
    assert coalesce["failed"] == sum(e["event_type"] == "failed" for e in events)
    assert coalesce["late_arrivals"] == sum(e["event_type"] == "late_arrival" for e in events)
    assert coalesce["timeouts"] == sum(d["trigger"] == "timeout" for d in decisions)
    lost_after = sum(t["status"] == "missing" and t["lost_reason"] is not None
                     for t in raw.expected_merge_timings(matrix.store, matrix.runs[case]))
    assert coalesce["lost_after_decision"] == lost_after
    assert coalesce["lost_branches"] == sum(d["n_lost"] for d in decisions) + lost_after
    counts = json.loads(latest["counts_json"])["coalesce"]["merge3"]
    assert (coalesce["merged"], coalesce["failed"], coalesce["late_arrivals"]) == (
        counts["merged"], counts["failed"], counts["late_arrivals"])


def test_run_summary_displays(audit: Audit, matrix: Matrix) -> None:
    summary = audit.run_summary(matrix.runs[JITTER])
    text = repr(summary)
    assert text.startswith(f"Run {matrix.runs[JITTER]}: completed, 40 source rows")
    assert "Nodes:" in text and "merge3" in text and "Coalesce:" in text
    html = summary._repr_html_()
    assert html == summary.to_html() and "<table>" in html and "merge3" in html
    assert summary.to_polars() is summary.nodes


def test_an_interrupted_run_counts_its_held_joins_as_unknown(tmp_path: Path) -> None:
    """Interrupting records no state for the joins still open, so their count is null, never a false 0."""
    from elspeth_nb.analysis import open_audit
    from elspeth_nb.engine.runner import run_pipeline
    from tests.cases import fork_pipeline, write_csv

    settings = fork_pipeline(write_csv(tmp_path / "in.csv"))
    [b_truncate] = [t for t in settings["transforms"] if t["name"] == "b_truncate"]
    b_truncate.update(plugin="python", options={"function": "plugin.py:explode"})
    (tmp_path / "plugin.py").write_text("def explode(row):\n    if row['id'] == 3:\n        raise KeyboardInterrupt\n"
                                        "    return row\n")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tmp_path / "pipeline.yaml")
    with open_audit(tmp_path / "audit") as audit:
        summary = audit.run_summary()
    assert summary.status == "interrupted"
    assert summary.coalesce.select("coalesce", "decisions", "held_when_run_stopped").rows() == [("merge3", 2, None)]
