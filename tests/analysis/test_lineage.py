"""lineage(): the exact tokens, states, decisions and stored rows of one source row's tree."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from elspeth_nb.analysis import Audit, Lineage, open_audit
from elspeth_nb.engine.clock import FakeClock
from elspeth_nb.engine.runner import run_pipeline
from elspeth_nb.errors import NotFoundError
from tests.analysis.conftest import HASHES_ONLY, JITTER, Matrix
from tests.cases import FIELDS, ROWS, write_csv

TREES = [("require_all-union-all", 0), ("require_all-nested-lost", 1), ("quorum-nested-lost", 1),
         ("best_effort-union-timeout", 2), ("first-select-all", 3), ("quorum-union-delayed", 0), (JITTER, 7),
         (HASHES_ONLY, 1)]


def _row_id(matrix: Matrix, case: str, index: int) -> str:
    return next(r["row_id"] for r in matrix.raw("rows", case) if r["row_index"] == index)


@pytest.mark.parametrize(("case", "index"), TREES)
def test_lineage_holds_exactly_the_rows_tree(audit: Audit, matrix: Matrix, case: str, index: int) -> None:
    row_id = _row_id(matrix, case, index)
    tree = audit.lineage(matrix.runs[case], row_index=index)
    tokens = {t["token_id"]: t for t in matrix.raw("tokens", case) if t["row_id"] == row_id}
    assert tree.row_id == row_id and set(tree.token_ids) == set(tokens)
    parents: dict[str, list[tuple[int, str]]] = {}
    for link in matrix.raw("token_parents", case):
        if link["token_id"] in tokens:
            parents.setdefault(link["token_id"], []).append((link["ordinal"], link["parent_token_id"]))
    outcomes = {o["token_id"]: o for o in matrix.raw("token_outcomes", case) if o["token_id"] in tokens}
    for record in tree.tokens.iter_rows(named=True):
        token = tokens[record["token_id"]]
        assert record["parents"] == [p for _, p in sorted(parents.get(record["token_id"], []))]
        assert (record["branch"], record["fork_group_id"], record["join_group_id"]) == (
            token["branch_name"], token["fork_group_id"], token["join_group_id"])
        assert record["outcome"] == outcomes[record["token_id"]]["outcome"]
        assert record["sink"] == outcomes[record["token_id"]]["sink_name"]
        want_depth = 0 if not record["parents"] else 1 + max(
            tree.tokens.filter(tree.tokens["token_id"].is_in(record["parents"]))["depth"])
        assert record["depth"] == want_depth

    states = [s for s in matrix.raw("node_states", case) if s["token_id"] in tokens]
    assert set(tree.states["state_id"]) == {s["state_id"] for s in states}
    assert tree.to_polars() is tree.states
    started = tree.states["started_at"].to_list()
    assert started == sorted(started)
    by_id = {s["state_id"]: s for s in states}
    for record in tree.states.iter_rows(named=True):
        state = by_id[record["state_id"]]
        for column in ("status", "input_hash", "output_hash", "duration_ms", "context_after_json", "error_json"):
            assert record[column] == state[column], column

    events = [e for e in matrix.raw("coalesce_events", case) if e["row_id"] == row_id]
    assert set(tree.decisions["event_id"]) == {e["event_id"] for e in events}
    for event in events:
        assert tree.context(event["event_id"]) == json.loads(event["context_json"])

    transform_errors = {e["error_id"] for e in matrix.raw("transform_errors", case) if e["token_id"] in tokens}
    assert set(tree.errors["error_id"]) == transform_errors
    routing = {e["event_id"] for e in matrix.raw("routing_events", case) if e["state_id"] in by_id}
    assert set(tree.routing["event_id"]) == routing


@pytest.mark.parametrize(("case", "index"), [("require_all-nested-lost", 1), (JITTER, 4)])
def test_every_selector_gives_the_same_tree(audit: Audit, matrix: Matrix, case: str, index: int) -> None:
    run = matrix.runs[case]
    by_index = audit.lineage(run, row_index=index)
    assert audit.lineage(run, row_id=by_index.row_id).token_ids == by_index.token_ids
    for token_id in (by_index.token_ids[-1], by_index.token_ids[1]):  # the last token and a branch token
        assert audit.lineage(run, token_id=token_id).token_ids == by_index.token_ids


def test_stored_rows_say_what_is_stored(audit: Audit, matrix: Matrix) -> None:
    tree = audit.lineage(matrix.runs["require_all-union-all"], row_index=2)
    assert tree.source_row == ROWS[2]
    assert tree.data.filter(tree.data["kind"] == "source")["stored"].to_list() == [True]
    kinds = set(tree.data["kind"])
    assert kinds == {"source", "state_output", "merged", "sink_output"}
    assert tree.data["stored"].all()
    for record in tree.data.iter_rows(named=True):
        assert hashlib.sha256(record["payload_json"].encode()).hexdigest() == record["hash"]
    [sink] = tree.data.filter(tree.data["kind"] == "sink_output").rows(named=True)
    lines = (matrix.folders["require_all-union-all"] / "output.jsonl").read_bytes().splitlines()
    assert sink["payload_json"].encode() in lines
    assert json.loads(sink["payload_json"]) == {**ROWS[2], "note": "anothe..", "amount_c": ROWS[2]["amount"]}


def test_hashes_only_run_never_shows_a_row(audit: Audit, matrix: Matrix) -> None:
    tree = audit.lineage(matrix.runs[HASHES_ONLY], row_index=1)
    assert tree.payload_mode == "hashes" and tree.source_row is None
    assert tree.data.height > 0 and not tree.data["stored"].any()
    assert tree.data["payload_json"].null_count() == tree.data.height
    text = repr(tree)
    assert "(hashes only)" in text and "short" not in text  # row 1's note is "short"
    assert "short" not in tree.to_html() and "hashes only" in tree.to_html()


def _tree_text(audit: Audit, matrix: Matrix, case: str, index: int) -> tuple[Lineage, str]:
    tree = audit.lineage(matrix.runs[case], row_index=index)
    return tree, repr(tree)


def test_text_tree_of_a_failed_require_all(audit: Audit, matrix: Matrix) -> None:
    tree, text = _tree_text(audit, matrix, "require_all-nested-lost", 1)
    lines = text.splitlines()
    assert lines[0].startswith(f"Lineage of row 1 (row_id {tree.row_id}) in run {tree.run_id} — 4 tokens")
    assert lines[1] == 'source row 1: {"amount":20,"category":"toys","id":2,"note":"short"}'
    assert lines[2].endswith("source ✓ → fork_gate ✓  forked")
    assert lines[3].startswith("├─ a  token …") and lines[3].endswith("a_pass ✓ → merge3 ✗  failed")
    assert any(line.startswith("├─ c  token …") and "c_filter ✗  quarantined  (lost to merge3 before its decision: "
               "quarantined at c_filter: blocked_content)" in line for line in lines)
    decision = next(i for i, line in enumerate(lines) if "merge3: FAILED" in line)
    assert lines[decision] == ("└─ merge3: FAILED (branch_lost) — policy require_all, merge nested, trigger "
                               "branch_lost, waited 0 ms")
    assert lines[decision + 1].strip() == "arrived: a +0 ms, b +0 ms"
    assert lines[decision + 2].strip() == "lost: c (quarantined at c_filter)"


def test_text_tree_of_a_timeout_merge_with_late_branches(audit: Audit, matrix: Matrix) -> None:
    tree, text = _tree_text(audit, matrix, "best_effort-union-timeout", 2)
    assert "└─ merge3: merged — policy best_effort, timeout 1 s, merge union, trigger timeout, waited 1,000 ms" in text
    assert "late: b arrived 1,000 ms after the decision" in text and "late: c arrived" in text
    merged = tree.tokens.filter(tree.tokens["join_group_id"].is_not_null())["token_id"][0]
    merged_line = next(line for line in text.splitlines() if f"token …{merged[-8:]}" in line)
    assert merged_line.strip().startswith("└─ merged  token") and merged_line.endswith("completed → sink output")
    assert 'wrote: {"amount":30,"category":"books","id":3,"note":"another long note here"}' in text


def test_lineage_html_holds_the_tree_and_tables(audit: Audit, matrix: Matrix) -> None:
    tree = audit.lineage(matrix.runs["quorum-union-delayed"], row_index=0)
    html = tree._repr_html_()
    assert html == tree.to_html()
    assert "<pre>" in html and "Node states (time order)" in html and "Coalesce decisions" in html
    assert "&quot;" in html or "&#x27;" in html  # JSON is escaped, never raw markup


def _fails(audit: Audit, run: str, **selector: Any) -> str:
    with pytest.raises((NotFoundError, ValueError, TypeError)) as caught:
        audit.lineage(run, **selector)
    return str(caught.value)


def test_lineage_selectors_and_unknown_ids_fail_clearly(audit: Audit, matrix: Matrix) -> None:
    run = matrix.runs["require_all-union-all"]
    assert "exactly one of row_id=, row_index= or token_id=; got none" in _fails(audit, run)
    assert "got row_id, row_index" in _fails(audit, run, row_id="x", row_index=1)
    message = _fails(audit, run, row_id="nope")
    assert f"Run `{run}`: row_id `nope` not found" in message and _row_id(matrix, "require_all-union-all", 0) in message
    message = _fails(audit, run, row_index=9)
    assert "row_index `9` not found" in message and "`0..3`" in message and "4 source rows" in message
    message = _fails(audit, run, token_id="t-1")
    some_token = min(t["token_id"] for t in matrix.raw("tokens", "require_all-union-all"))
    assert "token_id `t-1` not found" in message and some_token in message
    assert "row_index must be an int" in _fails(audit, run, row_index="1")
    with pytest.raises(KeyError):
        audit.lineage(run, row_index=-1)


def nested_pipeline(folder: Path) -> dict[str, Any]:
    """source -> fork [a, b]; a -> fork [a1, a2] -> coalesce inner -> a; [a, b] -> coalesce outer -> sink.

    a2 drops the toys row, so for that row inner fails and outer merges without branch a.
    """
    source = write_csv(folder / "input.csv")
    return {
        "source": {"plugin": "csv", "on_success": "raw",
                   "options": {"path": str(source), "schema": {"mode": "fixed", "fields": FIELDS}}},
        "gates": [{"name": "g1", "input": "raw", "condition": "True", "routes": {"true": "fork", "false": "output"},
                   "fork_to": ["a", "b"]},
                  {"name": "g2", "input": "a", "condition": "True", "routes": {"true": "fork", "false": "output"},
                   "fork_to": ["a1", "a2"]}],
        "transforms": [
            {"name": "a1_pass", "plugin": "passthrough", "input": "a1", "on_success": "out_a1", "options": {}},
            {"name": "a2_filter", "plugin": "keyword_filter", "input": "a2", "on_success": "out_a2",
             "on_error": "discard", "options": {"fields": ["category"], "blocked_patterns": ["^toys$"]}},
            {"name": "b_pass", "plugin": "passthrough", "input": "b", "on_success": "out_b", "options": {}}],
        "coalesce": [{"name": "inner", "branches": {"a1": "out_a1", "a2": "out_a2"}, "on_success": "out_a"},
                     {"name": "outer", "branches": {"a": "out_a", "b": "out_b"}, "policy": "best_effort",
                      "timeout_seconds": 1, "merge": "nested", "on_success": "output"}],
        "sinks": {"output": {"plugin": "jsonl", "options": {"path": str(folder / "output.jsonl")}}},
    }


def test_nested_forks_and_coalesces(tmp_path: Path) -> None:
    result = run_pipeline(nested_pipeline(tmp_path), audit=tmp_path / "audit", clock=FakeClock(), sync_duckdb=False)
    audit = open_audit(tmp_path / "audit")
    assert audit.check().ok and audit.verify().ok
    tree = audit.lineage(result.run_id, row_index=1)
    assert tree.tokens["depth"].to_list() == [0, 1, 1, 2, 2, 2]
    lines = tree.tree().splitlines()
    assert lines[1].endswith("source ✓ → g1 ✓  forked")
    assert lines[2].startswith("├─ a  token") and lines[2].endswith("g2 ✓  forked")
    assert lines[3].startswith("│  ├─ a1  token") and lines[3].endswith("a1_pass ✓ → inner ✗  failed")
    assert any(line.startswith("│  └─ inner: FAILED (branch_lost)") for line in lines)
    assert any(line.startswith("└─ outer: merged — policy best_effort") and "trigger all_accounted" in line
               for line in lines)
    assert "lost: a (coalesce_failed at inner)" in tree.tree()
    timings = audit.merge_timings(result.run_id, coalesce="outer")
    assert timings.filter(timings["status"] == "lost")["lost_reason"].to_list() == ["coalesce_failed"]
