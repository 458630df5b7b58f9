"""Importing ELSPETH Landscape files: every expectation is recomputed from the raw SQLite with sqlite3."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from elspeth_nb.audit.hashing import error_hash
from elspeth_nb.audit.importers.elspeth import (
    LandscapeImport,
    import_into_store,
    parse_lost_reason,
    read_landscape,
    verify_landscape,
)
from elspeth_nb.audit.importers.elspeth._sqlite import LANDSCAPE_TABLES
from elspeth_nb.audit.schema import TABLES
from elspeth_nb.audit.store import AuditStore
from elspeth_nb.errors import AuditStoreError, RunNotFoundError, SchemaVersionError

DATA = Path(__file__).resolve().parents[1] / "data" / "elspeth"
REQUIRE_ALL = DATA / "requireall_nested"
QUORUM = DATA / "quorum2_nested_timeout5_lossy"
SAMPLES = [REQUIRE_ALL, QUORUM]
LATE = "6eb4c47f6e339fa9"
QUORUM_RUN = "9a0057849be840d187bca5ca74d3b6f9"


# -- helpers -------------------------------------------------------------------------------------
def sql(db: Path, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Plain sqlite3, read-only and immutable (creates no -wal/-shm files)."""
    con = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        return con.execute(query, params).fetchall()
    finally:
        con.close()


def copy_sample(sample: Path, tmp_path: Path) -> Path:
    """A writable copy of a sample folder; returns the copy's audit.db."""
    target = tmp_path / sample.name
    shutil.copytree(sample, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target / "audit.db"


def mutate(db: Path, *statements: str, params: tuple[Any, ...] = ()) -> None:
    con = sqlite3.connect(db)
    try:
        for statement in statements:
            con.execute(statement, params if "?" in statement else ())
        con.commit()
    finally:
        con.close()


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def rows_of(imported: LandscapeImport, table: str) -> list[dict[str, Any]]:
    return imported.tables[table].to_pylist()


def events(imported: LandscapeImport, kind: str) -> list[dict[str, Any]]:
    return [e for e in rows_of(imported, "coalesce_events") if e["event_type"] == kind]


@pytest.fixture(scope="module")
def imports() -> dict[str, LandscapeImport]:
    return {s.name: read_landscape(s / "audit.db", payloads=s / "payloads") for s in SAMPLES}


# -- shape and counts ----------------------------------------------------------------------------
COUNT_SQL = {
    "runs": "SELECT count(*) FROM runs",
    "nodes": "SELECT count(*) FROM nodes",
    "edges": "SELECT count(*) FROM edges",
    "rows": "SELECT count(*) FROM rows",
    "tokens": "SELECT count(*) FROM tokens",
    "token_parents": "SELECT count(*) FROM token_parents",
    "token_outcomes": "SELECT count(*) FROM token_outcomes",
    "node_states": "SELECT count(*) FROM node_states",
    "routing_events": "SELECT count(*) FROM routing_events",
    "operations": "SELECT count(*) FROM operations",
    "calls": "SELECT count(*) FROM calls",
    "artifacts": "SELECT count(*) FROM artifacts",
    "validation_errors": "SELECT count(*) FROM validation_errors",
    "transform_errors": "SELECT count(*) FROM transform_errors",
}


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_counts_and_schemas_match_the_landscape(sample: Path, imports: dict[str, LandscapeImport]) -> None:
    imported = imports[sample.name]
    db = sample / "audit.db"
    for name, query in COUNT_SQL.items():
        assert imported.tables[name].num_rows == sql(db, query)[0][0], name
    for name, table in imported.tables.items():
        assert table.schema == TABLES[name].schema, name
    assert imported.run_ids == [r[0] for r in sql(db, "SELECT run_id FROM runs")]
    assert imported.problems == []
    merges = sql(db, "SELECT count(DISTINCT join_group_id) FROM token_outcomes WHERE outcome = 'coalesced'")[0][0]
    late = sql(db, "SELECT count(*) FROM token_outcomes WHERE error_hash = ?", (LATE,))[0][0]
    assert len(events(imported, "merged")) == merges == 100
    assert len(events(imported, "late_arrival")) == late
    assert events(imported, "failed") == []


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_runs_nodes_and_timestamps(sample: Path, imports: dict[str, LandscapeImport]) -> None:
    imported = imports[sample.name]
    db = sample / "audit.db"
    run = rows_of(imported, "runs")[0]
    started, status, config_hash = sql(db, "SELECT started_at, status, config_hash FROM runs")[0]
    assert run["started_at"] == ts(started) and run["started_at"].utcoffset() == timedelta(0)
    assert (run["status"], run["config_hash"], run["revision"]) == (status, config_hash, 0)
    assert run["producer"] == "elspeth (imported from audit.db)" and run["payload_mode"] == "source"
    counts = json.loads(run["counts_json"])
    assert counts["rows"] == 100 and counts["records"]["node_states"] == imported.tables["node_states"].num_rows
    steps = dict(sql(db, "SELECT node_id, min(step_index) FROM node_states GROUP BY node_id"))
    plugins = dict(sql(db, "SELECT node_id, plugin_name FROM nodes"))
    for node in rows_of(imported, "nodes"):
        assert node["sequence_in_pipeline"] == steps[node["node_id"]]
        plugin = plugins[node["node_id"]]
        if ":" in plugin:
            assert node["node_name"] == plugin.split(":", 1)[1]
        else:
            assert node["node_id"].startswith(node["node_type"]) and f"_{node['node_name']}_" in node["node_id"]
    names = {n["node_name"] for n in rows_of(imported, "nodes")}
    assert {"fork_gate", "merge3", "output", "branch_a_passthrough", "branch_b_truncate"} <= names
    tokens = dict(sql(db, "SELECT token_id, run_id FROM tokens"))
    assert all(tp["run_id"] == tokens[tp["token_id"]] for tp in rows_of(imported, "token_parents"))


# -- coalesce decisions ---------------------------------------------------------------------------
def elspeth_merges(db: Path) -> dict[str, dict[str, Any]]:
    """join_group_id -> ELSPETH's own merge context, consumed tokens, first arrival, merged token."""
    out: dict[str, dict[str, Any]] = {}
    query = """SELECT o.join_group_id, s.context_after_json, s.token_id, s.started_at, t.row_id
               FROM node_states s JOIN token_outcomes o ON o.token_id = s.token_id AND o.outcome = 'coalesced'
               JOIN tokens t ON t.token_id = s.token_id WHERE s.status = 'completed' AND s.node_id LIKE 'coalesce%'"""
    for join_group, context, token, started, row_id in sql(db, query):
        entry = out.setdefault(join_group, {"contexts": set(), "tokens": set(), "starts": [], "row_id": row_id})
        entry["contexts"].add(context)
        entry["tokens"].add(token)
        entry["starts"].append(ts(started))
    for merged, join_group in sql(db, "SELECT token_id, join_group_id FROM tokens WHERE join_group_id IS NOT NULL"):
        out[join_group]["merged_token_id"] = merged
        out[join_group]["parents"] = [r[0] for r in sql(
            db, "SELECT parent_token_id FROM token_parents WHERE token_id = ? ORDER BY ordinal", (merged,))]
        out[join_group]["merged_input"] = sql(
            db, "SELECT input_hash FROM node_states WHERE token_id = ? ORDER BY step_index LIMIT 1", (merged,))[0][0]
    return out


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_merges_equal_elspeths_context(sample: Path, imports: dict[str, LandscapeImport]) -> None:
    imported = imports[sample.name]
    expected = elspeth_merges(sample / "audit.db")
    policy = json.loads(sql(sample / "audit.db", "SELECT config_json FROM nodes WHERE node_type = 'coalesce'")[0][0])
    trigger = {"require_all": "all_arrived", "quorum": "quorum_met"}[policy["policy"]]
    merges = events(imported, "merged")
    assert len({m["event_id"] for m in merges}) == len(merges) == len(expected)
    for event in merges:
        want = expected[event["join_group_id"]]
        assert len(want["contexts"]) == 1  # identical copies, deduplicated to one event
        context = json.loads(next(iter(want["contexts"])))
        assert event["row_id"] == want["row_id"] and event["merged_token_id"] == want["merged_token_id"]
        assert event["branches_arrived"] == context["branches_arrived"]
        assert event["arrival_offsets_ms"] == [a["arrival_offset_ms"] for a in context["arrival_order"]]
        assert event["wait_duration_ms"] == context["wait_duration_ms"]
        assert event["arrived_token_ids"] == want["parents"] and set(event["arrived_token_ids"]) == want["tokens"]
        assert event["first_arrival_at"] == min(want["starts"])
        wait = timedelta(microseconds=round(context["wait_duration_ms"] * 1000))
        assert event["decided_at"] == min(want["starts"]) + wait
        assert event["merged_row_hash"] == want["merged_input"]
        assert (event["policy"], event["merge_strategy"], event["trigger"]) == (policy["policy"], "nested", trigger)
        assert event["quorum_count"] == policy.get("quorum_count")
        assert event["timeout_seconds"] == policy.get("timeout_seconds")
        assert event["n_lost"] == 0 and event["branches_lost"] == []
        ours = json.loads(event["context_json"])
        assert ours["source"] == "elspeth" and ours["trigger_inferred"] is True
        assert ours["event_id"] == event["event_id"]
        assert [a["token_id"] for a in ours["arrival_order"]] == want["parents"]
        assert list(ours) == sorted(ours)  # canonical key order


def test_quorum_late_arrivals_are_reclassified(imports: dict[str, LandscapeImport]) -> None:
    imported = imports[QUORUM.name]
    db = QUORUM / "audit.db"
    merges = {e["event_id"]: e for e in events(imported, "merged")}
    by_row = {e["row_id"]: e for e in merges.values()}
    late_states = sql(db, """SELECT s.token_id, s.started_at, t.row_id, t.branch_name FROM node_states s
        JOIN token_outcomes o ON o.token_id = s.token_id AND o.error_hash = ? JOIN tokens t ON t.token_id = s.token_id
        WHERE s.status = 'failed'""", (LATE,))
    assert len(late_states) == 82
    late_events = {e["late_token_id"]: e for e in events(imported, "late_arrival")}
    for token, started, row_id, branch in late_states:
        event = late_events[token]
        decision = by_row[row_id]
        assert event["decision_event_id"] == decision["event_id"] and event["row_id"] == row_id
        assert event["late_branch"] == branch == "path_c"
        expected_ms = (ts(started) - decision["decided_at"]) / timedelta(milliseconds=1)
        assert event["late_by_ms"] == pytest.approx(expected_ms) and event["late_by_ms"] >= 0
        assert event["join_group_id"] == decision["join_group_id"]
    outcomes = Counter(o["outcome"] for o in rows_of(imported, "token_outcomes"))
    raw = Counter(dict(sql(db, "SELECT outcome, count(*) FROM token_outcomes GROUP BY outcome")))
    assert outcomes["late_arrival"] == raw["failed"] == 82 and outcomes["failed"] == 0
    assert outcomes["quarantined"] == raw["quarantined"] == 18 and outcomes["coalesced"] == raw["coalesced"]
    late_tokens = set(late_events)
    tokens = {t["token_id"]: t["row_id"] for t in rows_of(imported, "tokens")}
    for outcome in rows_of(imported, "token_outcomes"):
        if outcome["token_id"] in late_tokens:
            context = json.loads(outcome["context_json"])
            assert outcome["outcome"] == "late_arrival" and outcome["error_hash"] == LATE
            assert context["elspeth_outcome"] == "failed" and context["decision"]["merged"] is True
            assert context["decision"]["event_id"] == late_events[outcome["token_id"]]["decision_event_id"]
        elif outcome["outcome"] == "coalesced":
            assert json.loads(outcome["context_json"])["outcome"] == "merged"
        elif outcome["outcome"] == "quarantined":  # path_c filtered out after the merge: tied to that decision
            lost = json.loads(outcome["context_json"])["lost_branch"]
            assert lost["after_event_id"] == by_row[tokens[outcome["token_id"]]]["event_id"]
            assert (lost["coalesce"], lost["branch"], lost["reason"], lost["inferred"]) == (
                "merge3", "path_c", "quarantined", True)
        else:
            assert outcome["context_json"] is None
    # the 18 quarantined path_c tokens were filtered after their row merged: not lost branches of the merge
    quarantined_rows = {r[0] for r in sql(db, """SELECT t.row_id FROM token_outcomes o JOIN tokens t USING (token_id)
        WHERE o.outcome = 'quarantined'""")}
    assert len(quarantined_rows) == 18 and all(by_row[r]["branches_lost"] == [] for r in quarantined_rows)
    assert all(by_row[r]["row_id"] not in {e["row_id"] for e in late_events.values()} for r in quarantined_rows)


def test_node_state_contexts(imports: dict[str, LandscapeImport]) -> None:
    imported = imports[QUORUM.name]
    raw = dict(sql(QUORUM / "audit.db", "SELECT state_id, context_after_json FROM node_states"))
    errors = dict(sql(QUORUM / "audit.db", "SELECT state_id, error_json FROM node_states"))
    filled = 0
    for state in rows_of(imported, "node_states"):
        assert state["error_json"] == errors[state["state_id"]]
        if raw[state["state_id"]] is not None:
            assert state["context_after_json"] == raw[state["state_id"]]  # ELSPETH's merge metadata kept
        elif state["error_json"] and "late_arrival_after_merge" in state["error_json"]:
            filled += 1
            assert json.loads(state["context_after_json"])["outcome"] == "late_arrival"
        else:
            assert state["context_after_json"] is None
    assert filled == 82


# -- synthetic failures (copies of the samples edited with sqlite3) --------------------------------
def _row_tokens(db: Path, row_index: int) -> dict[str, Any]:
    row_id = sql(db, "SELECT row_id FROM rows WHERE row_index = ?", (row_index,))[0][0]
    branches = dict(sql(db, "SELECT branch_name, token_id FROM tokens WHERE row_id = ? AND branch_name IS NOT NULL",
                        (row_id,)))
    merged = sql(db, "SELECT token_id FROM tokens WHERE row_id = ? AND join_group_id IS NOT NULL", (row_id,))[0][0]
    return {"row_id": row_id, "merged": merged, **branches}


def _drop_merge(db: Path, merged: str) -> None:
    mutate(db, *(f"DELETE FROM {table} WHERE token_id = '{merged}'"
                 for table in ("node_states", "token_outcomes", "token_parents", "tokens")))


def _fail(db: Path, tokens: list[str], error: dict[str, Any], reason: str, duration_ms: float | None = None) -> None:
    ids = ", ".join(f"'{t}'" for t in tokens)
    duration = "" if duration_ms is None else f", duration_ms = {duration_ms}"
    mutate(db, f"""UPDATE node_states SET status = 'failed', output_hash = NULL, context_after_json = NULL,
                   error_json = ?{duration} WHERE token_id IN ({ids}) AND node_id LIKE 'coalesce%'""",
           params=(json.dumps(error, sort_keys=True, separators=(",", ":")),))
    mutate(db, f"""UPDATE token_outcomes SET outcome = 'failed', join_group_id = NULL, error_hash = ?
                   WHERE token_id IN ({ids})""", params=(error_hash(reason),))


@pytest.fixture
def failures(tmp_path: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """require_all copy: row 0 fails branch_lost:path_c; row 1 fails at timeout and path_c arrives late."""
    db = copy_sample(REQUIRE_ALL, tmp_path)
    lost, late = _row_tokens(db, 0), _row_tokens(db, 1)
    base = {"expected_branches": ["path_a", "path_b", "path_c"], "merge_policy": "nested",
            "branches_arrived": ["path_a", "path_b"]}
    _drop_merge(db, lost["merged"])
    mutate(db, f"DELETE FROM node_states WHERE token_id = '{lost['path_c']}' AND node_id LIKE 'coalesce%'",
           f"UPDATE token_outcomes SET outcome = 'routed', sink_name = 'rejects', join_group_id = NULL "
           f"WHERE token_id = '{lost['path_c']}'")
    _fail(db, [lost["path_a"], lost["path_b"]], {**base, "failure_reason": "branch_lost:path_c"}, "branch_lost:path_c")
    _drop_merge(db, late["merged"])
    _fail(db, [late["path_a"], late["path_b"]], {**base, "failure_reason": "incomplete_branches", "timeout_ms": 5000},
          "incomplete_branches", duration_ms=1.0)
    _fail(db, [late["path_c"]], {**base, "branches_arrived": [], "failure_reason": "late_arrival_after_merge"},
          "late_arrival_after_merge", duration_ms=0.0)
    return db, lost, late


def test_failures_come_from_error_json_and_config(failures: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    db, lost, late = failures
    imported = read_landscape(db, payloads=db.parent / "payloads")
    failed = {e["row_id"]: e for e in events(imported, "failed")}
    assert len(events(imported, "merged")) == 98 and len(failed) == 2
    branch_lost = failed[lost["row_id"]]
    assert (branch_lost["trigger"], branch_lost["failure_reason"], branch_lost["policy"]) == (
        "branch_lost", "branch_lost", "require_all")  # the real policy, not error_json's merge_policy
    assert branch_lost["merge_strategy"] == "nested"
    assert branch_lost["branches_arrived"] == ["path_a", "path_b"]
    assert branch_lost["arrived_token_ids"] == [lost["path_a"], lost["path_b"]]
    assert branch_lost["branches_lost"] == ["path_c"] and branch_lost["lost_reasons"] == ["error_routed"]
    context = json.loads(branch_lost["context_json"])
    assert context["elspeth_failure_reason"] == "branch_lost:path_c" and context["trigger_inferred"] is True
    assert context["branches_lost"]["path_c"]["token_id"] == lost["path_c"]
    assert context["branches_lost"]["path_c"]["node"].startswith("transform_branch_c")
    starts = dict(sql(db, "SELECT token_id, started_at FROM node_states WHERE node_id LIKE 'coalesce%'"))
    assert branch_lost["arrival_offsets_ms"] == [
        0.0, (ts(starts[lost["path_b"]]) - ts(starts[lost["path_a"]])) / timedelta(milliseconds=1)]
    timeout = failed[late["row_id"]]
    assert (timeout["trigger"], timeout["failure_reason"], timeout["n_lost"]) == ("timeout", "incomplete_branches", 0)
    (late_event,) = events(imported, "late_arrival")
    assert late_event["decision_event_id"] == timeout["event_id"] and late_event["late_token_id"] == late["path_c"]
    assert late_event["late_by_ms"] > 0 and late_event["failure_reason"] == "incomplete_branches"
    outcomes = {o["token_id"]: o for o in rows_of(imported, "token_outcomes")}
    assert outcomes[late["path_c"]]["outcome"] == "late_arrival"  # late, as our engine records it: not a failure
    assert json.loads(outcomes[late["path_c"]]["context_json"])["decision"]["merged"] is False
    for token in (lost["path_a"], lost["path_b"]):
        assert outcomes[token]["outcome"] == "failed"
        assert json.loads(outcomes[token]["context_json"])["event_id"] == branch_lost["event_id"]
    states = [s for s in rows_of(imported, "node_states")
              if s["token_id"] == late["path_a"] and s["status"] == "failed"]
    assert json.loads(states[0]["context_after_json"])["failure_reason"] == "incomplete_branches"


def test_a_lost_branch_is_told_by_the_gate_that_routed_it_or_the_node_it_failed_at(tmp_path: Path) -> None:
    """A routed token also has a state at its sink, which hid the gate: every routed branch read 'error_routed',
    and a failed one read 'failed', a reason neither engine uses."""
    db = copy_sample(REQUIRE_ALL, tmp_path)
    routed, failed = _row_tokens(db, 0), _row_tokens(db, 1)
    gate, [(sink,)] = "config_gate_c_check_0123456789ab", sql(db, "SELECT node_id FROM nodes WHERE node_type = 'sink'")
    mutate(db, "INSERT INTO nodes SELECT ?, run_id, 'config_gate:c_check', 'gate', plugin_version, determinism, "
               "config_hash, '{}', schema_hash, NULL, registered_at, schema_mode, schema_fields_json, NULL, NULL "
               "FROM nodes WHERE node_type = 'gate'", params=(gate,))
    mutate(db, "UPDATE node_states SET node_id = ? WHERE token_id = ? AND node_id LIKE 'coalesce%'",
           params=(gate, routed["path_c"]))
    mutate(db, "INSERT INTO node_states (state_id, token_id, run_id, node_id, step_index, attempt, status, input_hash, "
               "output_hash, duration_ms, started_at, completed_at) SELECT 'sink-state-of-c', token_id, run_id, ?, 6, "
               "0, 'completed', input_hash, input_hash, 0.01, completed_at, completed_at FROM node_states "
               "WHERE token_id = ? AND node_id = ?", params=(sink, routed["path_c"], gate))
    mutate(db, "UPDATE token_outcomes SET outcome = 'routed', sink_name = 'output', join_group_id = NULL "
               f"WHERE token_id = '{routed['path_c']}'",
           f"DELETE FROM node_states WHERE token_id = '{failed['path_c']}' AND node_id LIKE 'coalesce%'",
           f"UPDATE token_outcomes SET outcome = 'failed', join_group_id = NULL WHERE token_id = '{failed['path_c']}'")
    base = {"expected_branches": ["path_a", "path_b", "path_c"], "merge_policy": "nested",
            "branches_arrived": ["path_a", "path_b"], "failure_reason": "branch_lost:path_c"}
    for row in (routed, failed):
        _drop_merge(db, row["merged"])
        _fail(db, [row["path_a"], row["path_b"]], base, "branch_lost:path_c")
    lost = {e["row_id"]: e for e in events(read_landscape(db), "failed")}
    assert lost[routed["row_id"]]["lost_reasons"] == ["gate_routed_to_sink"]
    why = json.loads(lost[routed["row_id"]]["context_json"])["branches_lost"]["path_c"]
    assert (why["node"], why["sink"]) == (gate, "output")
    assert lost[failed["row_id"]]["lost_reasons"] == ["transform_failed"]
    assert json.loads(lost[failed["row_id"]]["context_json"])["branches_lost"]["path_c"]["node"].startswith(
        "transform_branch_c")


def test_lost_branch_recorded_in_a_merge_context(tmp_path: Path) -> None:
    db = copy_sample(QUORUM, tmp_path)
    row_id, token = sql(db, """SELECT t.row_id, t.token_id FROM token_outcomes o JOIN tokens t USING (token_id)
                              WHERE o.outcome = 'quarantined' LIMIT 1""")[0]
    mutate(db, """UPDATE node_states SET context_after_json = json_set(context_after_json, '$.branches_lost',
                  json('{"path_c":"quarantined:blocked_content"}'))
                  WHERE context_after_json IS NOT NULL
                  AND token_id IN (SELECT token_id FROM tokens WHERE row_id = ?)""",
           params=(row_id,))
    imported = read_landscape(db)
    (event,) = [e for e in events(imported, "merged") if e["row_id"] == row_id]
    assert event["branches_lost"] == ["path_c"] and event["lost_reasons"] == ["quarantined"] and event["n_lost"] == 1
    lost = json.loads(event["context_json"])["branches_lost"]["path_c"]
    assert lost == {"detail": "blocked_content", "node": "transform_branch_c_filter_cce782274576",
                    "raw": "quarantined:blocked_content", "reason": "quarantined", "token_id": token}


@pytest.mark.parametrize(("config", "trigger"), [
    ({"policy": "first"}, "first_arrival"),
    ({"policy": "best_effort", "timeout_seconds": 600}, "all_arrived"),
    ({"policy": "best_effort", "timeout_seconds": 0.000001}, "timeout"),
    ({"policy": "quorum", "quorum_count": 2}, "quorum_met"),
])
def test_triggers_are_inferred_from_the_node_policy(tmp_path: Path, config: dict[str, Any], trigger: str) -> None:
    db = copy_sample(REQUIRE_ALL, tmp_path)
    mutate(db, "UPDATE nodes SET config_json = json_patch(config_json, ?) WHERE node_type = 'coalesce'",
           params=(json.dumps(config),))
    imported = read_landscape(db)
    assert {e["trigger"] for e in events(imported, "merged")} == {trigger}
    assert {e["policy"] for e in events(imported, "merged")} == {config["policy"]}


@pytest.mark.parametrize("config", ["not json", '{"schema": {"mode": "observed"}}'])
def test_a_coalesce_config_that_says_nothing_defers_to_the_merges_own_record(tmp_path: Path, config: str) -> None:
    """Unreadable, the node used to vanish (no merges at all); without keys, require_all/union were assumed for
    merges whose context says quorum/nested. Either way the import now says so."""
    db = copy_sample(QUORUM, tmp_path)
    mutate(db, "UPDATE nodes SET config_json = ? WHERE node_type = 'coalesce'", params=(config,))
    imported = read_landscape(db)
    merged = events(imported, "merged")
    assert len(merged) == 100 and {(e["policy"], e["merge_strategy"]) for e in merged} == {("quorum", "nested")}
    assert len(events(imported, "late_arrival")) == 82
    flagged = [p for p in imported.problems if "config_json" in p]
    assert flagged == ["1 coalesce node(s) whose config_json is unreadable or names no policy (require_all and "
                       "union assumed where a merge's own context does not say)"]


def test_a_late_arrival_without_error_json_is_told_by_its_error_hash(tmp_path: Path) -> None:
    """Its outcome's error_hash is ELSPETH's late-arrival key: a late arrival, not a failed decision of 'unknown'."""
    db = copy_sample(QUORUM, tmp_path)
    [(state,)] = sql(db, "SELECT s.state_id FROM node_states s JOIN tokens t USING (token_id) JOIN rows r "
                         "USING (row_id) WHERE s.status = 'failed' AND s.node_id LIKE 'coalesce%' AND r.row_index = 5")
    mutate(db, "UPDATE node_states SET error_json = NULL WHERE state_id = ?", params=(state,))
    imported = read_landscape(db)
    assert len(events(imported, "merged")) == 100 and events(imported, "failed") == []
    assert len(events(imported, "late_arrival")) == 82 and imported.problems == []


@pytest.mark.parametrize(("raw", "reason", "detail"), [
    ("error_routed:ValueError('boom')", "error_routed", "ValueError('boom')"),
    ("quarantined:blocked_content", "quarantined", "blocked_content"),
    ("gate_routed_to_sink:rejects", "gate_routed_to_sink", "rejects"),
    ("max_retries_exceeded:TimeoutError: read timed out", "max_retries_exceeded", "TimeoutError: read timed out"),
    ("{'reason': 'quarantined', 'detail': 'bad row'}", "quarantined", "bad row"),
    ('{"reason": "error_routed", "detail": "x"}', "error_routed", "x"),
    ("BranchLoss(reason='error_routed', detail='KeyError(1)')", "error_routed", "KeyError(1)"),
    ("<LossReason.QUARANTINED: 'quarantined'>", "quarantined", None),
    ("error_routed:{'reason': 'blocked_content', 'field': 'category'}", "error_routed",
     {"reason": "blocked_content", "field": "category"}),
    ("quarantined", "quarantined", None),
    ("this is not a reason", "unknown", "this is not a reason"),
    (None, "unknown", None),
])
def test_lost_branch_reasons_are_parsed(raw: str | None, reason: str, detail: Any) -> None:
    parsed = parse_lost_reason(raw)
    assert (parsed["reason"], parsed["detail"], parsed["raw"]) == (reason, detail, raw)
    if reason == "gate_routed_to_sink":
        assert parsed["sink"] == "rejects"


def test_unparseable_lost_reason_is_a_problem(tmp_path: Path) -> None:
    db = copy_sample(QUORUM, tmp_path)
    mutate(db, """UPDATE node_states SET context_after_json = json_set(context_after_json, '$.branches_lost',
                  json('{"path_c":"something odd happened"}')) WHERE context_after_json IS NOT NULL""")
    imported = read_landscape(db)
    assert any("unparseable lost-branch reason 'something odd happened'" in p for p in imported.problems)
    assert {tuple(e["lost_reasons"]) for e in events(imported, "merged")} == {("unknown",)}


# -- payloads and verification ---------------------------------------------------------------------
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_payloads_are_loaded_and_verified(sample: Path, imports: dict[str, LandscapeImport]) -> None:
    db = sample / "audit.db"
    refs = {r[0] for r in sql(db, """SELECT source_data_ref FROM rows UNION SELECT reason_ref FROM routing_events
        UNION SELECT input_data_ref FROM operations UNION SELECT output_data_ref FROM operations""") if r[0]}
    payloads = rows_of(imports[sample.name], "payloads")
    assert {p["payload_hash"] for p in payloads} == refs and len(payloads) == len(refs)
    for p in payloads:
        assert hashlib.sha256(p["payload_json"].encode()).hexdigest() == p["payload_hash"]
        assert p["payload_json"] == (sample / "payloads" / p["payload_hash"][:2] / p["payload_hash"]).read_text()


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_verify_is_all_ok_on_the_samples(sample: Path, imports: dict[str, LandscapeImport]) -> None:
    checks = verify_landscape(imports[sample.name], db_path=sample / "audit.db")
    assert set(checks.columns) == {"run_id", "check", "table", "record_id", "status", "detail"}
    assert set(checks["status"]) == {"ok"}
    counts = Counter(checks["check"])
    sink_states = sql(sample / "audit.db", "SELECT count(*) FROM node_states WHERE node_id LIKE 'sink%'")[0][0]
    assert counts["source_row_hash"] == 100 and counts["sink_row_hash"] == sink_states == 100
    assert counts["artifact_content_hash"] == counts["artifact_size"] == 1


def test_verify_flags_tampering(tmp_path: Path) -> None:
    db = copy_sample(QUORUM, tmp_path)
    payloads = db.parent / "payloads"
    (flipped_row, flipped), (deleted_row, deleted) = sql(db, "SELECT row_id, source_data_ref FROM rows LIMIT 2")
    target = payloads / flipped[:2] / flipped
    data = bytearray(target.read_bytes())
    data[10] ^= 0x01
    target.write_bytes(bytes(data))
    (payloads / deleted[:2] / deleted).unlink()
    output = db.parent / "output.jsonl"
    lines = output.read_text().splitlines(keepends=True)
    edited = json.loads(lines[4])
    edited["path_a"]["amount"] += 1
    lines[4] = json.dumps(edited) + "\n"
    output.write_text("".join(lines))

    imported = read_landscape(db, payloads=payloads)
    assert any("hash mismatch" in p and flipped in p for p in imported.problems)
    assert any("purged or missing" in p and deleted in p for p in imported.problems)
    assert flipped not in set(imported.tables["payloads"].column("payload_hash").to_pylist())
    checks = verify_landscape(imported, db_path=db).to_dicts()
    status = {(c["check"], c["record_id"]): c["status"] for c in checks}
    assert status[("source_row_hash", flipped_row)] == "mismatch"
    assert status[("source_row_hash", deleted_row)] == "purged"
    assert status[("artifact_content_hash", rows_of(imported, "artifacts")[0]["artifact_id"])] == "mismatch"
    bad_sink = [c for c in checks if c["check"] == "sink_row_hash" and c["status"] != "ok"]
    assert {c["record_id"] for c in bad_sink if c["table"] == "artifacts"} == {"output.jsonl:5"}
    assert len([c for c in bad_sink if c["table"] == "node_states"]) == 1
    assert Counter(c["status"] for c in checks if c["check"] == "source_row_hash") == {"ok": 98, "mismatch": 1,
                                                                                     "purged": 1}


@pytest.mark.parametrize(("given", "message"), [
    ("nowhere", r"payload folder .*nowhere does not exist; pass ELSPETH's payload folder"),
    ("audit.db", r"payload folder .*audit\.db is a file, not a folder"),
    ("", r"the payload folder is an empty path"),
    ("  ", r"the payload folder is an empty path"),
])
def test_a_payload_folder_that_is_not_there_is_an_error(tmp_path: Path, given: str, message: str) -> None:
    """A wrong path must not silently turn every lineage into hashes only (leave payloads out for that)."""
    from elspeth_nb.analysis import open_audit
    from elspeth_nb.cli import main

    shutil.copy(QUORUM / "audit.db", tmp_path / "audit.db")
    where = given if not given.strip() else tmp_path / given
    with pytest.raises(AuditStoreError, match=message):
        read_landscape(tmp_path / "audit.db", payloads=where)
    with pytest.raises(AuditStoreError, match=message):
        open_audit(tmp_path / "audit.db", payloads=where)
    assert main(["import", str(tmp_path / "audit.db"), "--payloads", str(where), "--audit",
                 str(tmp_path / "store")]) == 2
    assert not (tmp_path / "store").exists()


def test_without_payloads_the_import_keeps_hashes() -> None:
    imported = read_landscape(QUORUM / "audit.db")
    assert imported.tables["payloads"].num_rows == 0 and imported.problems == []
    assert rows_of(imported, "runs")[0]["payload_mode"] == "hashes"
    assert set(verify_landscape(imported, db_path=QUORUM / "audit.db").filter(
        check="source_row_hash")["status"]) == {"missing"}


# -- the store ------------------------------------------------------------------------------------
def _parquet_counts(audit: Path, run_id: str) -> dict[str, int]:
    store = AuditStore.open(audit)
    return {name: sum(pq.read_metadata(f).num_rows for f in Path(store.parquet_root, name, f"run_id={run_id}").glob(
        "part-*.parquet")) for name in TABLES}


def test_import_into_store_is_idempotent(tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    first = import_into_store(QUORUM / "audit.db", audit, payloads=QUORUM / "payloads")
    (run_id,) = first.run_ids
    counts = _parquet_counts(audit, run_id)
    again = import_into_store(QUORUM / "audit.db", audit, payloads=QUORUM / "payloads")
    assert again.run_ids == [run_id] and _parquet_counts(audit, run_id) == counts
    expected = read_landscape(QUORUM / "audit.db", payloads=QUORUM / "payloads")
    assert {k: v for k, v in counts.items() if k != "segment_digests"} == \
        {name: t.num_rows for name, t in expected.tables.items() if name != "segment_digests"}
    assert counts["segment_digests"] > 0  # the store's writer digests every segment it writes
    assert first.source_rows == 100 and first.records == expected.records and first.rows_per_s > 0
    assert "ImportReport" in repr(first) and "100 source rows" in repr(first)
    assert list(first.timings) == ["read_sqlite_s", "derive_and_payloads_s", "write_parquet_s", "sync_duckdb_s"]
    assert all(s > 0 for s in first.timings.values()) and sum(first.timings.values()) <= first.seconds
    assert "phases: read sqlite" in repr(first) and "sync duckdb" in repr(first)
    con = duckdb.connect(str(audit / "audit.duckdb"), read_only=True)
    try:
        for name in TABLES:
            assert con.execute(f"SELECT count(*) FROM {name} WHERE run_id = ?", [run_id]).fetchone()[0] == counts[name]
        merged = con.execute("SELECT count(*) FROM coalesce_events WHERE event_type = 'merged'").fetchone()[0]
        assert merged == 100
    finally:
        con.close()
    assert not any((audit / ".import-staging").iterdir())


IMPORT_IN_A_PROCESS = """
import sys
from elspeth_nb.audit.importers.elspeth import import_into_store
import_into_store(sys.argv[1], sys.argv[2], payloads=sys.argv[3], sync_duckdb=False)
"""


def test_imports_into_one_store_at_once_take_turns(tmp_path: Path) -> None:
    """Two imports racing on one store used to delete each other's staging and lose partitions."""
    audit = tmp_path / "audit"
    alone = {}
    for sample in (QUORUM, REQUIRE_ALL):
        (run_id,) = import_into_store(sample / "audit.db", tmp_path / sample.name, payloads=sample / "payloads",
                                      sync_duckdb=False).run_ids
        alone[run_id] = _parquet_counts(tmp_path / sample.name, run_id)
    AuditStore.create(audit)
    for _ in range(3):
        processes = [subprocess.Popen([sys.executable, "-c", IMPORT_IN_A_PROCESS, str(sample / "audit.db"),
                                       str(audit), str(sample / "payloads")]) for sample in (QUORUM, REQUIRE_ALL)]
        assert [p.wait(timeout=120) for p in processes] == [0, 0]
        assert {run_id: _parquet_counts(audit, run_id) for run_id in alone} == alone
    assert not any((audit / ".import-staging").iterdir())


def test_an_import_waits_while_another_holds_the_store(tmp_path: Path) -> None:
    store = AuditStore.create(tmp_path / "audit")
    done = threading.Event()

    def run() -> None:
        import_into_store(QUORUM / "audit.db", store.root, payloads=QUORUM / "payloads", sync_duckdb=False)
        done.set()

    with store.importing():
        worker = threading.Thread(target=run)
        worker.start()
        assert not done.wait(3.0) and store.run_ids() == []  # read, then waiting: nothing staged or swapped
    worker.join(timeout=120)
    assert done.is_set() and len(store.run_ids()) == 1


def test_verify_finds_the_sink_file_of_an_imported_run(tmp_path: Path) -> None:
    """ELSPETH's sink path is relative to its database's folder, not to the store it is imported into."""
    from elspeth_nb.analysis import open_audit

    (run_id,) = import_into_store(REQUIRE_ALL / "audit.db", tmp_path / "elsewhere" / "audit",
                                  payloads=REQUIRE_ALL / "payloads").run_ids
    with open_audit(tmp_path / "elsewhere" / "audit") as audit:
        result = audit.verify(run_id)
        pipeline_path = audit.runs()["pipeline_path"][0]
    assert result.ok, result
    assert result.checked["artifacts"] == 1 and result.checked["lines"] == 100
    assert pipeline_path == str((REQUIRE_ALL / "audit.db").resolve())


def test_a_tampered_payload_file_is_a_verify_finding_not_a_purge(tmp_path: Path) -> None:
    """Its bytes no longer hash to the ref: left out like a purged payload, but verify must still say so."""
    from elspeth_nb.analysis import open_audit

    copy = tmp_path / "elspeth"
    shutil.copytree(REQUIRE_ALL, copy)
    victim = sorted((copy / "payloads").glob("*/*"))[0]
    victim.write_bytes(victim.read_bytes().replace(b"a", b"A", 1))
    (run_id,) = import_into_store(copy / "audit.db", tmp_path / "audit", payloads=copy / "payloads").run_ids
    for where in (copy / "audit.db", tmp_path / "audit"):
        with open_audit(where, **({"payloads": copy / "payloads"} if where.suffix == ".db" else {})) as audit:
            result = audit.verify(run_id)
        assert not result.ok
        assert result.mismatches.select("check", "record_id").rows() == [("payload_hash", victim.name)]


def test_reimporting_without_payloads_says_it_drops_them(tmp_path: Path) -> None:
    first = import_into_store(REQUIRE_ALL / "audit.db", tmp_path / "audit", payloads=REQUIRE_ALL / "payloads")
    (run_id,) = first.run_ids
    assert _parquet_counts(tmp_path / "audit", run_id)["payloads"] > 0 and first.problems == []
    again = import_into_store(REQUIRE_ALL / "audit.db", tmp_path / "audit")
    kept = _parquet_counts(tmp_path / "audit", run_id)["payloads"]
    assert kept == 0 and len(again.problems) == 1
    assert again.problems[0].startswith(f"run {run_id}: re-imported without payloads, so the 104 payload(s)")


def test_the_store_keeps_the_findings_of_the_import_that_wrote_each_run(tmp_path: Path) -> None:
    """Once the import report is gone, the store still says what the import worked around; a re-import replaces it."""
    from elspeth_nb.analysis import open_audit

    db = copy_sample(QUORUM, tmp_path)
    [(purged,)] = sql(db, "SELECT source_data_ref FROM rows ORDER BY row_index LIMIT 1")
    saved = (db.parent / "payloads" / purged[:2] / purged).read_bytes()
    (db.parent / "payloads" / purged[:2] / purged).unlink()
    audit_dir = tmp_path / "audit"
    report = import_into_store(db, audit_dir, payloads=db.parent / "payloads")
    assert len(report.problems) == 1 and purged in report.problems[0]
    for parquet_only in (False, True):
        if parquet_only:
            (audit_dir / "audit.duckdb").unlink()
        with open_audit(audit_dir) as audit:
            assert audit.import_problems == report.problems
            [(kept,)] = audit.sql("SELECT import_problems_json FROM runs").rows()
            assert json.loads(kept) == report.problems
            assert f"1 finding(s) of the ELSPETH import:\n  {report.problems[0]}" in repr(audit)
            assert "finding(s) of the ELSPETH import" in audit._repr_html_()
    (db.parent / "payloads" / purged[:2] / purged).write_bytes(saved)
    import_into_store(db, audit_dir, payloads=db.parent / "payloads")
    with open_audit(audit_dir) as audit:
        assert audit.import_problems == [] and "finding" not in repr(audit)
    with open_audit(db, payloads=db.parent / "payloads") as landscape:  # opened directly: the same list
        assert landscape.import_problems == []


def test_import_is_deterministic() -> None:
    a = read_landscape(QUORUM / "audit.db", payloads=QUORUM / "payloads")
    b = read_landscape(QUORUM / "audit.db", payloads=QUORUM / "payloads")
    for name in TABLES:
        assert a.tables[name].equals(b.tables[name]), name


def test_interrupted_swap_is_rolled_forward(tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    report = import_into_store(REQUIRE_ALL / "audit.db", audit)
    (run_id,) = report.run_ids
    counts = _parquet_counts(audit, run_id)
    staging = audit / ".import-staging" / f"{run_id}.crashed"
    (staging / "parquet" / "rows").mkdir(parents=True)
    shutil.move(str(audit / "parquet" / "rows" / f"run_id={run_id}"), staging / "parquet" / "rows" / f"run_id={run_id}")
    (staging / "READY").write_text(json.dumps({"run_id": run_id, "staged": ["rows"]}))
    incomplete = audit / ".import-staging" / "other.half-written"
    incomplete.mkdir()
    import_into_store(REQUIRE_ALL / "audit.db", audit)
    assert _parquet_counts(audit, run_id) == counts and not incomplete.exists()


# -- bad inputs ------------------------------------------------------------------------------------
def test_foreign_sqlite_file(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    mutate(db, "CREATE TABLE customers (id INTEGER, name TEXT)")
    with pytest.raises(AuditStoreError, match=r"not an ELSPETH Landscape.*customers"):
        read_landscape(db)


def test_text_file_named_audit_db(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    db.write_text("run_id,status\nabc,completed\n")
    with pytest.raises(AuditStoreError, match="not an SQLite database"):
        read_landscape(db)


def test_corrupt_file(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    data = bytearray((QUORUM / "audit.db").read_bytes()[:8192])
    data[100:8192] = b"\xff" * (8192 - 100)
    db.write_bytes(bytes(data))
    with pytest.raises(AuditStoreError, match=r"corrupt|not an ELSPETH|cannot be read"):
        read_landscape(db)


def test_unknown_user_version(tmp_path: Path) -> None:
    db = copy_sample(QUORUM, tmp_path)
    mutate(db, "PRAGMA user_version = 99")
    with pytest.raises(SchemaVersionError, match="user_version 99"):
        read_landscape(db)


def test_an_older_user_version_with_every_column_is_imported_with_a_note(tmp_path: Path) -> None:
    """Upgrading elspeth-nb cannot help with an older file: it was refused with that advice."""
    db = copy_sample(QUORUM, tmp_path)
    mutate(db, "PRAGMA user_version = 1")
    imported = read_landscape(db)
    assert any("user_version 1, older than the version(s) this importer knows" in p for p in imported.problems)
    assert imported.tables["runs"].num_rows == 1


def test_one_run_id_given_as_text_is_one_run() -> None:
    """A str is a sequence too: it was read as one-letter run ids."""
    [run_id] = [r for (r,) in sql(QUORUM / "audit.db", "SELECT run_id FROM runs")]
    assert read_landscape(QUORUM / "audit.db", run_ids=run_id).tables["runs"].column("run_id").to_pylist() == [run_id]


def test_verify_checks_a_csv_sink_file_by_hash_and_size_only(tmp_path: Path) -> None:
    """Its rows are not JSON: read as JSON lines, every line and every sink state was a mismatch."""
    db = copy_sample(REQUIRE_ALL, tmp_path)
    data = b"id,amount\n" + b"".join(b"%d,%d\n" % (i, i) for i in range(100))
    (db.parent / "output.csv").write_bytes(data)
    mutate(db, "UPDATE artifacts SET path_or_uri = 'file://output.csv', content_hash = ?, size_bytes = ?",
           params=(hashlib.sha256(data).hexdigest(), len(data)))
    checks = verify_landscape(read_landscape(db), db_path=db)
    assert set(checks["status"].to_list()) - {"missing"} == {"ok"}  # missing: no payload folder was given
    assert set(checks["check"].to_list()) == {"source_row_hash", "payload_ref", "artifact_content_hash",
                                              "artifact_size"}


def test_tables_with_no_place_here_are_named_as_left_out(tmp_path: Path) -> None:
    """Batches, checkpoints and the like were dropped without a word; rows of runs not imported do not count."""
    db = copy_sample(QUORUM, tmp_path)
    [(run_id,)] = sql(db, "SELECT run_id FROM runs")
    mutate(db, "PRAGMA foreign_keys = OFF",
           "INSERT INTO batches (batch_id, run_id, aggregation_node_id, attempt, status, created_at) "
           "VALUES ('b1', ?, 'agg', 1, 'completed', '2026-01-01')",
           "INSERT INTO batches (batch_id, run_id, aggregation_node_id, attempt, status, created_at) "
           "VALUES ('b2', 'another-run', 'agg', 1, 'completed', '2026-01-01')", params=(run_id,))
    assert read_landscape(db, run_ids=[run_id]).problems == [
        "table batches (1 row(s)) was left out: elspeth-nb has no table for it"]  # empty checkpoints: nothing lost
    assert "table batches (2 row(s)) was left out: elspeth-nb has no table for it" in read_landscape(db).problems


def test_a_landscape_written_while_it_is_read_is_read_again_in_one_transaction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables are read in parallel, each on its own connection: a commit in between tore the snapshot (routing
    events read without their node state, their run_id NULL)."""
    from elspeth_nb.audit.importers.elspeth import _sqlite

    db = copy_sample(REQUIRE_ALL, tmp_path)
    writer = sqlite3.connect(db, isolation_level=None, check_same_thread=False)  # it writes from a reader thread
    writer.execute("PRAGMA journal_mode = WAL")  # as ELSPETH writes; the -wal file tells the reader it may change
    token, run_id, node = writer.execute("SELECT token_id, run_id, node_id FROM node_states "
                                         "WHERE node_id LIKE 'config_gate%' LIMIT 1").fetchone()
    [(edge,)] = writer.execute("SELECT edge_id FROM edges LIMIT 1").fetchall()
    read_one, wrote = _sqlite._read_one, []

    def read_one_while_written(uri: str, table: str, where: str) -> Any:
        if table == "routing_events" and not wrote:  # node_states is being read or was: a state it cannot see
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("INSERT INTO node_states (state_id, token_id, run_id, node_id, step_index, attempt, status, "
                           "input_hash, started_at) VALUES ('new-state', ?, ?, ?, 99, 99, 'open', 'x', "
                           "'2026-11-25 19:49:25.000000')", (token, run_id, node))
            writer.execute("INSERT INTO routing_events (event_id, state_id, edge_id, routing_group_id, ordinal, mode, "
                           "created_at) VALUES ('new-event', 'new-state', ?, 'g', 0, 'move', "
                           "'2026-11-25 19:49:25.000000')", (edge,))
            writer.execute("COMMIT")
            wrote.append(table)
        return read_one(uri, table, where)

    monkeypatch.setattr(_sqlite, "_read_one", read_one_while_written)
    try:
        imported = read_landscape(db)
    finally:
        writer.close()
    states = set(imported.tables["node_states"].column("state_id").to_pylist())
    events = imported.tables["routing_events"]
    assert wrote and "new-state" in states and "new-event" in events.column("event_id").to_pylist()
    assert set(events.column("state_id").to_pylist()) <= states and events.column("run_id").null_count == 0
    assert any("changed while it was read" in p and "read again in one transaction" in p for p in imported.problems)


def test_a_locked_landscape_is_said_to_be_locked_not_corrupt(tmp_path: Path) -> None:
    db = copy_sample(QUORUM, tmp_path)
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("PRAGMA journal_mode = DELETE")
    writer.execute("BEGIN EXCLUSIVE")
    writer.execute("UPDATE runs SET export_error = 'x'")
    try:
        with pytest.raises(AuditStoreError, match=r"\(database is locked\); another process holds a write lock on "
                                                  r"it \(ELSPETH still writing\?\): try again once it is done$"):
            read_landscape(db)
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_write_ahead_log_in_a_folder_sqlite_cannot_write_is_explained(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from elspeth_nb.audit.importers.elspeth import _sqlite

    db = copy_sample(QUORUM, tmp_path)
    Path(f"{db}-wal").touch()
    monkeypatch.setattr(_sqlite.os, "access", lambda path, mode: False)  # as for a reader without write permission
    why = _sqlite._why_unreadable(db, sqlite3.OperationalError("unable to open database file"))
    assert why.startswith("it has a write-ahead log, which SQLite can read only by creating audit.db-shm beside it")


def test_sink_files_are_found_in_the_folder_elspeth_ran_in(tmp_path: Path) -> None:
    """ELSPETH's default layout keeps the database in ./state and writes sinks relative to its working folder."""
    from elspeth_nb.analysis import open_audit

    copy = copy_sample(REQUIRE_ALL, tmp_path).parent
    (copy / "state").mkdir()
    db = copy / "state" / "audit.db"
    (copy / "audit.db").rename(db)
    [(text,)] = sql(db, "SELECT settings_json FROM runs")
    settings = json.loads(text)
    settings["landscape"]["url"] = "sqlite:///./state/audit.db"
    mutate(db, "UPDATE runs SET settings_json = ?", params=(json.dumps(settings),))
    checks = verify_landscape(read_landscape(db, payloads=copy / "payloads"), db_path=db)
    assert set(checks["status"].to_list()) == {"ok"} and checks.height > 500
    with open_audit(db, payloads=copy / "payloads") as audit:
        verified = audit.verify()
    assert verified.ok, verified.mismatches
    (copy / "output.jsonl").rename(copy / "state" / "output.jsonl")  # a copy that keeps it beside the database
    import_into_store(db, tmp_path / "store", payloads=copy / "payloads")
    with open_audit(tmp_path / "store") as audit:
        verified = audit.verify()
    assert verified.ok, verified.mismatches


def test_missing_columns_are_named(tmp_path: Path) -> None:
    db = copy_sample(QUORUM, tmp_path)
    mutate(db, "ALTER TABLE operations DROP COLUMN input_data_hash")
    with pytest.raises(SchemaVersionError, match=r"operations\.input_data_hash"):
        read_landscape(db)


def test_missing_file_and_unknown_run(tmp_path: Path) -> None:
    with pytest.raises(AuditStoreError, match="does not exist"):
        read_landscape(tmp_path / "audit.db")
    with pytest.raises(RunNotFoundError, match="9a0057849be840d187bca5ca74d3b6f9"):
        read_landscape(QUORUM / "audit.db", run_ids=["nope"])


def test_run_filter_and_two_runs_in_one_file(tmp_path: Path) -> None:
    db = copy_sample(QUORUM, tmp_path)
    bench = _bench_module()
    two = tmp_path / "two.db"
    shutil.copy(db, two)
    bench.add_run_copy(two, "second-run")
    both = read_landscape(two)
    assert sorted(both.run_ids) == sorted(["9a0057849be840d187bca5ca74d3b6f9", "second-run"])
    assert len(events(both, "merged")) == 200 and len(events(both, "late_arrival")) == 164
    only = read_landscape(two, run_ids=["second-run"])
    assert only.run_ids == ["second-run"] and only.tables["node_states"].num_rows == 882
    assert set(only.tables["routing_events"].column("run_id").to_pylist()) == {"second-run"}
    assert len(events(only, "late_arrival")) == 82


def test_each_run_keeps_only_its_own_payload_problems(tmp_path: Path) -> None:
    """One database, two runs, one payload missing for one of them: both runs listed it as their problem."""
    db = copy_sample(QUORUM, tmp_path)
    _bench_module().add_run_copy(db, "second-run")
    missing = "f" * 64
    mutate(db, "UPDATE rows SET source_data_ref = ? WHERE run_id = 'second-run' AND row_index = 0", params=(missing,))
    imported = read_landscape(db, payloads=db.parent / "payloads")
    kept = {r["run_id"]: json.loads(r["import_problems_json"] or "[]") for r in rows_of(imported, "runs")}
    assert [p for p in kept["second-run"] if missing in p] and not any(missing in p for p in kept[QUORUM_RUN])
    assert any(missing in p for p in imported.problems)  # the import as a whole still lists it
    import_into_store(db, tmp_path / "store", payloads=db.parent / "payloads", sync_duckdb=False)
    stored = dict(duckdb.sql(f"SELECT run_id, any_value(import_problems_json) FROM read_parquet("
                             f"'{tmp_path / 'store'}/parquet/runs/*/*.parquet', hive_partitioning = true) "
                             "GROUP BY run_id").fetchall())
    assert missing in (stored["second-run"] or "") and missing not in (stored[QUORUM_RUN] or "")


def test_reading_never_writes(tmp_path: Path) -> None:
    db = copy_sample(QUORUM, tmp_path)
    before = {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in db.parent.iterdir()
              if p.is_file()}
    db.chmod(0o444)
    read_landscape(db, payloads=db.parent / "payloads")
    after = {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in db.parent.iterdir()
             if p.is_file()}
    assert after == before  # no -wal/-shm side files, nothing touched


# -- the benchmark's generator ---------------------------------------------------------------------
def _bench_module(name: str = "import_throughput") -> Any:
    path = Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_replication_keeps_foreign_keys(tmp_path: Path) -> None:
    bench = _bench_module()
    db, payloads = bench.build_landscape(300, sample=QUORUM, stores=tmp_path)
    imported = read_landscape(db, payloads=payloads)
    assert imported.source_rows == 300 and imported.problems == []
    assert len(events(imported, "merged")) == 300 and len(events(imported, "late_arrival")) == 246
    assert len(set(imported.tables["payloads"].column("payload_hash").to_pylist())) == 304
    tokens = set(imported.tables["tokens"].column("token_id").to_pylist())
    assert set(pc.unique(imported.tables["node_states"].column("token_id")).to_pylist()) <= tokens
    rows = {r["row_id"]: r for r in rows_of(imported, "rows")}
    first_states = {s["token_id"]: s for s in rows_of(imported, "node_states") if s["step_index"] == 0}
    for token in rows_of(imported, "tokens"):
        if token["token_id"] in first_states:
            assert first_states[token["token_id"]]["input_hash"] == rows[token["row_id"]]["source_data_hash"]


def test_import_floor_times_each_piece_on_everything_an_import_touches(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    floor = _bench_module("import_floor")
    figures = floor.measure(300, 1, tmp_path)
    db, payloads = _bench_module().build_landscape(300, sample=QUORUM, stores=tmp_path)
    with sqlite3.connect(db) as con:
        records = sum(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in LANDSCAPE_TABLES)
    counted = [count for _, _, count in figures.values()]
    imported = read_landscape(db, payloads=payloads)
    assert counted[0] == records  # every record of every table read
    assert counted[1] == 300  # every source row's payload file matched its ref
    assert counted[2] > 0 and all(cpu > 0 for _, cpu, _ in figures.values())
    written = int(list(figures)[2].split()[1].replace(",", ""))  # "write N records as Parquet"
    assert written >= sum(t.num_rows for t in imported.tables.values())  # every imported record, plus digests
    monkeypatch.setattr(floor, "measure", lambda rows, repeat, stores: figures)
    assert floor.main(["--rows", "300", "--repeat", "1", "--stores", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    total_cpu = sum(cpu for _, cpu, _ in figures.values())
    assert f"{300 / (total_cpu / (os.cpu_count() or 1)):,.0f} source rows/s" in out
    assert "rerun: .venv/bin/python bench/import_floor.py --rows 300" in out


def test_stdlib_sqlite3_fallback_reads_the_same_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    from elspeth_nb.audit.importers.elspeth import _sqlite

    def no_adbc(uri: str, query: str) -> pa.Table:
        raise ImportError("pretend adbc_driver_sqlite is not installed")

    via_adbc = read_landscape(QUORUM / "audit.db", payloads=QUORUM / "payloads")
    monkeypatch.setattr(_sqlite, "_read_adbc", no_adbc)
    via_sqlite3 = read_landscape(QUORUM / "audit.db", payloads=QUORUM / "payloads")
    for name in TABLES:
        assert via_sqlite3.tables[name].equals(via_adbc.tables[name]), name


def test_a_reimport_left_for_a_later_sync_is_read_from_its_new_segments(tmp_path: Path) -> None:
    from elspeth_nb.analysis import open_audit

    db = copy_sample(REQUIRE_ALL, tmp_path)
    audit = tmp_path / "audit"
    (run_id,) = import_into_store(db, audit).run_ids
    with open_audit(audit) as before:
        assert set(before.coalesce_events(run_id)["policy"]) == {"require_all"}
        assert before._db.native_answers == 1
    mutate(db, "UPDATE nodes SET config_json = json_patch(config_json, ?) WHERE node_type = 'coalesce'",
           params=(json.dumps({"policy": "first"}),))
    report = import_into_store(db, audit, sync_duckdb=False)
    assert "pending" in report.duckdb_message and "sync_duckdb_s" not in report.timings
    store = AuditStore.open(audit)
    assert store.pending_runs() == [run_id]  # audit.duckdb still holds the first import's rows
    with open_audit(audit) as later:
        assert set(later.coalesce_events(run_id)["policy"]) == {"first"}
        assert later._db.native_answers == 0
    assert store.sync_duckdb([]).synced == [run_id] and store.pending_runs() == []
    with open_audit(audit) as synced:
        assert set(synced.coalesce_events(run_id)["policy"]) == {"first"}
        assert synced._db.native_answers == 1


def test_import_says_which_duckdb_timings_it_accepts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sync_duckdb: expected True, False or 'background', got 'soon'"):
        import_into_store(REQUIRE_ALL / "audit.db", tmp_path / "audit", sync_duckdb="soon")
    assert not (tmp_path / "audit").exists()


def test_the_import_command_prints_its_report_and_can_leave_duckdb_for_later(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from elspeth_nb.cli import main

    audit = tmp_path / "audit"
    assert main(["import", str(REQUIRE_ALL / "audit.db"), "--payloads", str(REQUIRE_ALL / "payloads"),
                 "--audit", str(audit), "--duckdb", "later"]) == 0
    printed = capsys.readouterr().out
    assert "ImportReport: 1 run(s) from audit.db" in printed and "100 source rows" in printed
    assert "phases: read sqlite" in printed and "write parquet" in printed and "sync duckdb" not in printed
    assert f"pending until `elspeth-nb sync --audit {audit}`" in printed
    assert AuditStore.open(audit).pending_runs() and not (audit / "audit.duckdb").exists()
