"""Every policy x merge strategy x scenario: the exact coalesce record in all three places.

Expected decisions are written out by hand from the policy rules (SPEC §3), not computed by the
engine's own code. Branch order is a, b, c; with a fake clock and no waits they arrive in that
order. Scenarios: ``all`` (every branch arrives), ``lost`` (branch c of the `toys` row is
discarded before the coalesce), ``delayed`` (b waits 300 ms on a call), ``timeout`` (b and c
wait 2 s, the coalesce times out after 1 s).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from elspeth_nb.engine.clock import FakeClock
from tests.cases import ROWS, SCENARIOS, Trail, fork_pipeline, run_in_memory, scenario_options, write_csv

TOYS = 1  # row index whose branch c is lost in the `lost` scenario


@dataclass(frozen=True)
class Expect:
    event: str                      # merged | failed
    trigger: str
    arrived: tuple[str, ...]
    offsets: tuple[float, ...]
    wait_ms: float | None
    reason: str | None = None
    lost: tuple[str, ...] = ()
    late: dict[str, float] = field(default_factory=dict)   # branch -> late_by_ms
    after_decision_loss: tuple[str, ...] = ()              # lost after the decision (no effect on it)


def expected(policy: str, merge: str, scenario: str, row: int) -> Expect:
    """The decision for one row, from the policy rules."""
    toys = scenario == "lost" and row == TOYS
    if scenario == "all" or (scenario == "lost" and not toys):
        base = {
            "require_all": Expect("merged", "all_arrived", ("a", "b", "c"), (0, 0, 0), 0.0),
            "quorum": Expect("merged", "quorum_met", ("a", "b"), (0, 0), 0.0,
                             late={"c": 0.0}),
            "best_effort": Expect("merged", "all_arrived", ("a", "b", "c"), (0, 0, 0), 0.0),
            "first": Expect("merged", "first_arrival", ("a",), (0,), 0.0, late={"b": 0.0, "c": 0.0}),
        }[policy]
    elif scenario == "lost":
        base = {
            "require_all": Expect("failed", "branch_lost", ("a", "b"), (0, 0), 0.0, "branch_lost", lost=("c",)),
            "quorum": Expect("merged", "quorum_met", ("a", "b"), (0, 0), 0.0, after_decision_loss=("c",)),
            "best_effort": Expect("merged", "branch_lost", ("a", "b"), (0, 0), 0.0, lost=("c",)),
            "first": Expect("merged", "first_arrival", ("a",), (0,), 0.0, late={"b": 0.0},
                            after_decision_loss=("c",)),
        }[policy]
    elif scenario == "delayed":
        base = {
            "require_all": Expect("merged", "all_arrived", ("a", "c", "b"), (0, 0, 300), 300.0),
            "quorum": Expect("merged", "quorum_met", ("a", "c"), (0, 0), 0.0, late={"b": 300.0}),
            "best_effort": Expect("merged", "all_arrived", ("a", "c", "b"), (0, 0, 300), 300.0),
            "first": Expect("merged", "first_arrival", ("a",), (0,), 0.0, late={"c": 0.0, "b": 300.0}),
        }[policy]
    else:  # timeout: b and c take 2 s, the coalesce gives up after 1 s (first has no timeout)
        base = {
            "require_all": Expect("failed", "timeout", ("a",), (0,), 1000.0, "incomplete_branches",
                                  late={"b": 1000.0, "c": 1000.0}),
            "quorum": Expect("failed", "timeout", ("a",), (0,), 1000.0, "quorum_not_met_at_timeout",
                             late={"b": 1000.0, "c": 1000.0}),
            "best_effort": Expect("merged", "timeout", ("a",), (0,), 1000.0, late={"b": 1000.0, "c": 1000.0}),
            "first": Expect("merged", "first_arrival", ("a",), (0,), 0.0, late={"b": 2000.0, "c": 2000.0}),
        }[policy]
    if merge == "select" and base.event == "merged" and "b" not in base.arrived:
        return Expect("failed", base.trigger, base.arrived, base.offsets, base.wait_ms, "select_branch_not_arrived",
                      base.lost, base.late, base.after_decision_loss)
    return base


def branch_rows(source: dict[str, Any]) -> dict[str, dict[str, Any]]:
    note = source["note"]
    return {
        "a": dict(source),
        "b": {**source, "note": note if len(note) <= 8 else note[:6] + ".."},
        "c": {"id": source["id"], "category": source["category"], "amount_c": source["amount"]},
    }


def expected_row(merge: str, source: dict[str, Any], arrived: tuple[str, ...]) -> dict[str, Any]:
    rows = branch_rows(source)
    if merge == "nested":
        return {b: rows[b] for b in "abc" if b in arrived}
    if merge == "select":
        return rows["b"]
    out: dict[str, Any] = {}
    for b in "abc":
        if b in arrived:
            out.update(rows[b])
    return out


def expected_collisions(source: dict[str, Any], arrived: tuple[str, ...]) -> dict[str, Any]:
    rows = branch_rows(source)
    if "a" in arrived and "b" in arrived and rows["a"]["note"] != rows["b"]["note"]:
        return {"note": {"branches": ["a", "b"], "winner": "b"}}
    return {}


POLICIES = ("require_all", "quorum", "best_effort", "first")


def build(tmp_path: Path, policy: str, merge: str, scenario: str) -> Trail:
    source = write_csv(tmp_path / "input.csv")
    return run_in_memory(fork_pipeline(source, **scenario_options(policy, merge, scenario)))


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("merge", ["union", "nested", "select"])
@pytest.mark.parametrize("policy", POLICIES)
def test_coalesce_record(tmp_path: Path, policy: str, merge: str, scenario: str) -> None:
    trail = build(tmp_path, policy, merge, scenario)
    assert trail.result.status == "completed"
    assert_one_terminal_outcome_per_token(trail)
    rows = {r["row_index"]: r for r in trail.rows("rows")}
    tokens = trail.rows("tokens")
    outcomes = {o["token_id"]: o for o in trail.rows("token_outcomes")}
    states = trail.rows("node_states")
    events = trail.rows("coalesce_events")
    coalesce_node = next(n["node_id"] for n in trail.rows("nodes") if n["node_type"] == "coalesce")
    sink_lines = [line for line in (tmp_path / "output.jsonl").read_bytes().splitlines()]
    payloads = {p["payload_hash"]: p["payload_json"] for p in trail.rows("payloads")}
    written = 0
    for index, source in enumerate(ROWS):
        want = expected(policy, merge, scenario, index)
        row_id = rows[index]["row_id"]
        decisions = [e for e in events if e["row_id"] == row_id and e["event_type"] != "late_arrival"]
        assert len(decisions) == 1, decisions
        event = decisions[0]
        # typed record
        decided = (event["event_type"], event["trigger"], event["failure_reason"])
        assert decided == (want.event, want.trigger, want.reason)
        assert tuple(event["branches_arrived"]) == want.arrived
        assert tuple(event["arrival_offsets_ms"]) == pytest.approx(want.offsets)
        assert tuple(event["branches_lost"]) == want.lost
        assert event["wait_duration_ms"] == pytest.approx(want.wait_ms)
        assert (event["policy"], event["merge_strategy"]) == (policy, merge)
        assert event["expected_branches"] == ["a", "b", "c"]
        # the full context: identical in coalesce_events, every coalesce-node state of the decision, every outcome
        context = json.loads(event["context_json"])
        expected_keys = {"coalesce", "event_id", "outcome", "trigger", "policy", "merge_strategy", "expected_branches",
                         "branches_arrived", "arrival_order", "branches_lost", "wait_duration_ms"}
        expected_keys |= {k for k in ("quorum_count", "timeout_seconds", "select_branch") if k in context}
        assert {k for k in ("quorum_count",) if policy == "quorum"} <= context.keys()
        if want.event == "merged":
            expected_keys |= {"merged_token_id", "join_group_id", "merged_row_hash"}
        else:
            expected_keys |= {"failure_reason"}
        collisions = expected_collisions(source, want.arrived) if merge == "union" and want.event == "merged" else {}
        if collisions:
            expected_keys.add("union_field_collisions")
            assert context["union_field_collisions"] == collisions
        assert set(context) == expected_keys
        assert context["event_id"] == event["event_id"]
        assert [a["branch"] for a in context["arrival_order"]] == list(want.arrived)
        assert [a["token_id"] for a in context["arrival_order"]] == event["arrived_token_ids"]
        assert sorted(context["branches_lost"]) == list(want.lost)
        for lost_branch in want.lost:
            assert context["branches_lost"][lost_branch]["reason"] == "quarantined"
        arrived_ids = event["arrived_token_ids"]
        for token_id in arrived_ids:
            outcome = outcomes[token_id]
            assert outcome["outcome"] == ("coalesced" if want.event == "merged" else "failed")
            assert outcome["context_json"] == event["context_json"]
            [state] = [s for s in states if s["token_id"] == token_id and s["node_id"] == coalesce_node]
            assert state["context_after_json"] == event["context_json"]
            assert state["status"] == ("completed" if want.event == "merged" else "failed")
        if want.event == "merged":
            merged_id = context["merged_token_id"]
            merged = next(t for t in tokens if t["token_id"] == merged_id)
            assert merged["join_group_id"] == context["join_group_id"] == event["join_group_id"]
            parents = sorted((p for p in trail.rows("token_parents") if p["token_id"] == merged_id),
                             key=lambda p: p["ordinal"])
            assert [p["parent_token_id"] for p in parents] == arrived_ids  # arrival order
            [merged_state] = [s for s in states if s["token_id"] == merged_id and s["node_id"] == coalesce_node]
            assert merged_state["context_after_json"] == event["context_json"]
            want_row = expected_row(merge, source, want.arrived)
            line = sink_lines[written]
            written += 1
            assert json.loads(line) == want_row
            line_hash = hashlib.sha256(line).hexdigest()
            assert merged_state["output_hash"] == context["merged_row_hash"] == event["merged_row_hash"] == line_hash
            assert payloads[line_hash] == line.decode()
            assert outcomes[merged_id]["outcome"] == "completed" and outcomes[merged_id]["sink_name"] == "output"
        # late arrivals: recorded as such, with how late they were
        late = [e for e in events if e["row_id"] == row_id and e["event_type"] == "late_arrival"]
        assert {e["late_branch"]: e["late_by_ms"] for e in late} == pytest.approx(want.late)
        for e in late:
            assert e["decision_event_id"] == event["event_id"]
            late_outcome = outcomes[e["late_token_id"]]
            assert late_outcome["outcome"] == "late_arrival"  # after a failed decision too: late, not a failure
            assert json.loads(late_outcome["context_json"])["late_by_ms"] == pytest.approx(e["late_by_ms"])
        for branch in want.after_decision_loss:
            token = next(t for t in tokens if t["row_id"] == row_id and t["branch_name"] == branch)
            assert outcomes[token["token_id"]]["outcome"] == "quarantined"
    assert written == len(sink_lines)


def assert_one_terminal_outcome_per_token(trail: Trail) -> None:
    tokens = {t["token_id"] for t in trail.rows("tokens")}
    counts = Counter(o["token_id"] for o in trail.rows("token_outcomes") if o["is_terminal"] == 1)
    assert set(counts) == tokens
    assert set(counts.values()) == {1}


@pytest.mark.parametrize(("a", "b", "collide"), [
    ([1, 0], [True, False], True),  # equal in Python, different JSON
    ({"on": 1}, {"on": True}, True),
    (1, 1.0, False),  # equal JSON (the same hash), different Python types
    ([1, 2], [1.0, 2], False),
    ("x", "x", False),
    (None, 0, True),
])
def test_union_collisions_compare_values_as_canonical_json(a: Any, b: Any, collide: bool) -> None:
    from elspeth_nb.engine.coalesce import merge_union

    merged, collisions = merge_union(["p", "q"], {"p": {"v": a}, "q": {"v": b}})
    assert merged == {"v": b}
    assert collisions == ({"v": {"branches": ["p", "q"], "winner": "q"}} if collide else {})


class _WakesLate(FakeClock):
    """A busy machine: every wait overshoots by 200 ms, so timers fire late."""

    def sleep_until(self, t: float) -> None:
        super().sleep_until(t + 0.2)


def test_a_timeout_due_before_a_late_processed_arrival_decides_first(tmp_path: Path) -> None:
    """Branch c's call is due at 100 ms, the timeout at 150 ms, but the engine only wakes at 300 ms: c was
    processed after the deadline, so the join times out (at 150 ms) and c is a late arrival, never a merge
    that waited longer than its own timeout."""
    from elspeth_nb.audit.writer import MemoryWriter
    from elspeth_nb.engine.runner import run_pipeline

    pipeline = fork_pipeline(write_csv(tmp_path / "input.csv"), policy="best_effort", timeout_seconds=0.15,
                             slow={"c": 100})
    writer = MemoryWriter()
    run_pipeline(pipeline, clock=_WakesLate(), writer=writer, max_in_flight=1)
    events = writer.table("coalesce_events").to_pylist()
    decisions = [e for e in events if e["event_type"] != "late_arrival"]
    late = [e for e in events if e["event_type"] == "late_arrival"]
    assert decisions and {(e["trigger"], tuple(e["branches_arrived"])) for e in decisions} == {("timeout", ("a", "b"))}
    assert all(e["wait_duration_ms"] == pytest.approx(150.0) for e in decisions)
    assert len(late) == len(decisions) and all(e["late_branch"] == "c" and e["late_by_ms"] > 0 for e in late)


class _WakesOneSecondLate(FakeClock):
    def sleep_until(self, t: float) -> None:
        super().sleep_until(t + 1.0)


def _nested(tmp_path: Path, *, a_ms: int = 0, inner: str = "best_effort", outer_timeout: float = 1.5,
            fork_to: tuple[str, str] = ("a", "b")) -> list[dict[str, Any]]:
    """Outer join (a, b) over an inner one (b1, b2, timeout 1 s; b2 waits 5 s on a call), run on an engine that wakes
    1 s late; its coalesce events. Also checks that no state ends before it starts."""
    from elspeth_nb.audit.writer import MemoryWriter
    from elspeth_nb.engine.runner import run_pipeline
    from tests.cases import FIELDS

    calls = [{"name": "a_call", "plugin": "latency", "input": "a", "on_success": "a_out",
              "options": {"distribution": "fixed", "mean_ms": a_ms}}] if a_ms else []
    pipeline = {
        "source": {"plugin": "csv", "on_success": "raw", "options": {
            "path": str(write_csv(tmp_path / "input.csv", ROWS[:1])), "schema": {"mode": "fixed", "fields": FIELDS}}},
        "gates": [{"name": "g1", "input": "raw", "condition": "True", "routes": {"true": "fork", "false": "output"},
                   "fork_to": list(fork_to)},
                  {"name": "g2", "input": "b", "condition": "True", "routes": {"true": "fork", "false": "output"},
                   "fork_to": ["b1", "b2"]}],
        "transforms": [*calls, {"name": "b2_call", "plugin": "latency", "input": "b2", "on_success": "b2_out",
                                "options": {"distribution": "fixed", "mean_ms": 5000}}],
        "coalesce": [{"name": "inner", "branches": {"b1": "b1", "b2": "b2_out"}, "policy": inner,
                      "timeout_seconds": 1.0, "on_success": "b_done"},
                     {"name": "outer", "branches": {"a": "a_out" if a_ms else "a", "b": "b_done"},
                      "policy": "best_effort", "timeout_seconds": outer_timeout, "merge": "nested",
                      "on_success": "output"}],
        "sinks": {"output": {"plugin": "jsonl", "options": {"path": str(tmp_path / "output.jsonl")}}},
        "audit": {"path": str(tmp_path / "audit")},
    }
    writer = MemoryWriter()
    run_pipeline(pipeline, clock=_WakesOneSecondLate(), writer=writer)
    states = writer.table("node_states").to_pylist()
    assert all(s["started_at"] <= s["completed_at"] and (s["duration_ms"] or 0) >= 0 for s in states)
    return writer.table("coalesce_events").to_pylist()


@pytest.mark.parametrize(("a_ms", "inner", "expected"), [
    (0, "best_effort", ("merged", "all_arrived", ["a", "b"], [0.0, 1000.0], 1000.0)),
    (0, "require_all", ("merged", "branch_lost", ["a"], [0.0], 1000.0)),
    (500, "best_effort", ("merged", "all_arrived", ["a", "b"], [0.0, 0.0], 0.0)),
    (500, "require_all", ("merged", "branch_lost", ["a"], [0.0], 0.0)),
])
def test_a_nested_decision_at_a_passed_deadline_reaches_the_outer_join_then_but_never_before_its_events(
        tmp_path: Path, a_ms: int, inner: str, expected: tuple[Any, ...]) -> None:
    """The inner join (b1, b2) times out at 1 s, the outer (a, b) would at 1.5 s; the engine wakes 1 s late. The
    inner decision reaches the outer at 1 s, as its failure did but its merge did not (the outer had timed out and
    recorded the merged token late); when a reached the outer later (at 1.5 s) the decision is placed after it:
    never a negative wait or offset."""
    [outer] = [e for e in _nested(tmp_path, a_ms=a_ms, inner=inner) if e["coalesce_name"] == "outer"]
    assert (outer["event_type"], outer["trigger"], outer["branches_arrived"], outer["arrival_offsets_ms"],
            outer["wait_duration_ms"]) == expected


@pytest.mark.parametrize("fork_to", [("a", "b"), ("b", "a")])
def test_a_nested_merge_after_the_outer_decided_is_late_by_the_deadlines_not_by_the_engine(
        tmp_path: Path, fork_to: tuple[str, str]) -> None:
    """Both joins time out at 1 s: b's merge is late by 0 ms whatever the fork order (it was 1,000 ms, the engine's
    oversleep, when the outer's timer fired first)."""
    late = [e for e in _nested(tmp_path, outer_timeout=1.0, fork_to=fork_to)
            if (e["coalesce_name"], e["event_type"]) == ("outer", "late_arrival")]
    assert [(e["late_branch"], e["late_by_ms"]) for e in late] == [("b", 0.0)]


def _completed_run(pipeline: dict[str, Any]) -> tuple[Trail, dict[int, dict[str, Any]]]:
    """Run in memory; the run completed with one terminal outcome per token; its decisions by source row index."""
    trail = run_in_memory(pipeline)
    assert trail.result.status == "completed", trail.result.error
    assert_one_terminal_outcome_per_token(trail)
    rows = {r["row_id"]: r["row_index"] for r in trail.rows("rows")}
    return trail, {rows[e["row_id"]]: e for e in trail.rows("coalesce_events") if e["event_type"] != "late_arrival"}


def test_a_join_opened_by_a_loss_times_out_from_the_loss(tmp_path: Path) -> None:
    """ELSPETH opens the pending join on a loss too: its timeout runs from then, not from a later arrival.

    Branch c of the toys row is discarded at 0 ms, a and b wait 3 s on a call, the timeout is 1 s: the toys
    join times out at 1 s with nothing arrived; the other rows' joins (c arrived at 0 ms) merge c at 1 s.
    """
    pipeline = fork_pipeline(write_csv(tmp_path / "input.csv"), policy="best_effort", timeout_seconds=1.0,
                             lose_c_for="toys", slow={"a": 3000, "b": 3000})
    trail, decisions = _completed_run(pipeline)
    toys = decisions[TOYS]
    assert (toys["event_type"], toys["trigger"], toys["failure_reason"]) == (
        "failed", "timeout", "best_effort_timeout_no_arrivals")
    assert toys["branches_lost"] == ["c"] and toys["branches_arrived"] == [] and toys["first_arrival_at"] is None
    assert toys["wait_duration_ms"] == pytest.approx(1000.0)
    for index, event in decisions.items():
        if index != TOYS:
            assert (event["event_type"], event["trigger"], event["branches_arrived"]) == ("merged", "timeout", ["c"])
            assert event["wait_duration_ms"] == pytest.approx(1000.0)
    late = [e for e in trail.rows("coalesce_events") if e["event_type"] == "late_arrival"]
    assert sorted(e["late_branch"] for e in late) == ["a", "a", "a", "a", "b", "b", "b", "b"]
    assert all(e["late_by_ms"] == pytest.approx(2000.0) for e in late)


def _branch_c_behind_a_gate(tmp_path: Path, condition: str, when_true: str) -> dict[str, Any]:
    """fork_pipeline whose branch c (``c_in``) first meets gate ``c_gate``: ``when_true`` if ``condition``, else on."""
    pipeline = fork_pipeline(write_csv(tmp_path / "input.csv"))
    pipeline["gates"][0]["fork_to"] = ["a", "b", "c_in"]
    pipeline["coalesce"][0]["branches"] = {"a": "out_a", "b": "out_b", "c_in": "out_c"}
    pipeline["gates"].append({"name": "c_gate", "input": "c_in", "condition": condition,
                              "routes": {"true": when_true, "false": "c"}})
    return pipeline


def test_a_branch_row_a_sink_refuses_is_a_lost_branch(tmp_path: Path) -> None:
    """Branch c sends all but the garden row to a CSV sink; the toys row gains a field on the way, so the sink
    (its header fixed by the books row before it) refuses it. The coalesce learns at once that c will not come
    from that row; it used to wait until end of source and then end the run failed."""
    (tmp_path / "mark.py").write_text("def mark(row):\n    return {**row, 'extra': 1} if row['category'] == 'toys' "
                                      "else row\n")
    pipeline = _branch_c_behind_a_gate(tmp_path, "row['category'] != 'garden'", "c_side")
    pipeline["transforms"].append({"name": "c_mark", "plugin": "python", "input": "c_side", "on_success": "refusing",
                                   "options": {"function": f"{tmp_path / 'mark.py'}:mark"}})
    pipeline["sinks"]["refusing"] = {"plugin": "csv", "options": {"path": str(tmp_path / "refused.csv")}}
    _, decisions = _completed_run(pipeline)
    assert {i: (e["event_type"], e["trigger"], e["lost_reasons"]) for i, e in decisions.items()} == {
        0: ("failed", "branch_lost", ["routed_to_sink"]), TOYS: ("failed", "branch_lost", ["sink_write_failed"]),
        2: ("failed", "branch_lost", ["routed_to_sink"]), 3: ("merged", "all_arrived", [])}
    lost = json.loads(decisions[TOYS]["context_json"])["branches_lost"]["c_in"]
    assert (lost["reason"], lost["sink"]) == ("sink_write_failed", "refusing")


def test_a_join_still_pending_at_end_of_source_fails_without_failing_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss the coalesce never hears of leaves the join to end of source: it is decided there and the run
    completes (it used to end failed with 'row(s) still have live tokens after end of source')."""
    from elspeth_nb.engine.tokens import EngineContext

    monkeypatch.setattr(EngineContext, "lose", lambda self, token, reason, at: None)  # the loss goes unheard
    trail, decisions = _completed_run(fork_pipeline(write_csv(tmp_path / "input.csv"), lose_c_for="toys"))
    toys = decisions[TOYS]
    assert len([e for e in trail.rows("coalesce_events") if e["row_id"] == toys["row_id"]]) == 1
    assert (toys["event_type"], toys["trigger"], toys["failure_reason"]) == (
        "failed", "end_of_source", "incomplete_branches")


def test_a_gate_in_a_branch_that_routes_to_a_sink_loses_the_branch(tmp_path: Path) -> None:
    """Branch c's gate sends the toys row straight to a sink: routed there, and lost to the coalesce at once."""
    pipeline = _branch_c_behind_a_gate(tmp_path, "row['category'] == 'toys'", "side")
    pipeline["sinks"]["side"] = {"plugin": "jsonl", "options": {"path": str(tmp_path / "side.jsonl")}}
    trail, decisions = _completed_run(pipeline)
    assert (decisions[TOYS]["event_type"], decisions[TOYS]["lost_reasons"]) == ("failed", ["gate_routed_to_sink"])
    routed = [o for o in trail.rows("token_outcomes") if o["sink_name"] == "side"]
    assert [o["outcome"] for o in routed] == ["routed"]
    assert json.loads(routed[0]["context_json"])["lost_branch"]["reason"] == "gate_routed_to_sink"
