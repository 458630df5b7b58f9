"""check() and verify(): sound trails pass; each kind of damage is reported, and only it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from elspeth_nb.analysis import Audit, CheckResult, open_audit
from elspeth_nb.analysis.integrity import INVARIANTS
from elspeth_nb.audit.schema import TABLES
from elspeth_nb.audit.store import AuditStore
from elspeth_nb.audit.writer import ParquetSegmentWriter
from elspeth_nb.engine.clock import FakeClock
from elspeth_nb.engine.runner import run_pipeline
from elspeth_nb.errors import AuditStoreError, AuditStoreWarning
from tests.analysis import raw
from tests.analysis.conftest import JITTER, Matrix
from tests.cases import fork_pipeline, write_csv


def test_every_matrix_run_is_sound_and_verifies(duck_audit: Audit, matrix: Matrix) -> None:
    for case, run in matrix.runs.items():
        result = duck_audit.check(run)
        assert result.ok, (case, result)
        assert result.invariants["applied"].all() and result.invariants.height == len(INVARIANTS)
        verified = duck_audit.verify(run)
        assert verified.ok and verified.merkle == "verified", (case, verified)
        assert verified.merkle_root == raw.latest_run(matrix.store, run)["merkle_root"]
        assert verified.checked["artifacts"] == 1
        lines = (matrix.folders[case] / "output.jsonl").read_bytes().count(b"\n")
        assert verified.checked["lines"] == lines


def test_check_and_verify_from_the_store(audit: Audit, matrix: Matrix) -> None:
    result = audit.check(matrix.runs[JITTER])
    assert result.ok and result.status == "completed"
    assert result.violations.columns == ["invariant", "table", "record_id", "detail"]
    assert repr(result).startswith(f"Check of run {matrix.runs[JITTER]} (completed): OK, all {len(INVARIANTS)}")
    verified = audit.verify(matrix.runs[JITTER])
    assert verified.ok and verified.checked["payloads"] == len(matrix.raw("payloads", JITTER))
    assert verified.checked["source_rows"] == 40
    assert "OK" in repr(verified) and "enb-ok" in verified._repr_html_()


@dataclass
class Run:
    store: Path
    run_id: str
    folder: Path

    def raw(self, table: str) -> list[dict[str, Any]]:
        return raw.rows(self.store, table, self.run_id)

    def append(self, table: str, records: list[dict[str, Any]]) -> None:
        """A forged segment: what a tampered or buggy writer would leave."""
        schema = TABLES[table].file_schema
        rows = [{k: v for k, v in r.items() if k in schema.names} for r in records]
        ParquetSegmentWriter(self.store / "parquet", fsync=False).write_segment(
            TABLES[table], self.run_id, pa.Table.from_pylist(rows, schema=schema))


@pytest.fixture
def run(tmp_path: Path) -> Run:
    """A quorum run with a lost branch, its own store and sink file."""
    pipeline = fork_pipeline(write_csv(tmp_path / "input.csv"), policy="quorum", quorum_count=2, lose_c_for="toys")
    result = run_pipeline(pipeline, audit=tmp_path / "audit", clock=FakeClock(), sync_duckdb=False)
    return Run(tmp_path / "audit", result.run_id, tmp_path)


def _found(result: CheckResult) -> set[tuple[str, str]]:
    return {(r["invariant"], r["record_id"]) for r in result.violations.iter_rows(named=True)}


def test_each_invariant_reports_its_own_breach(run: Run) -> None:
    tokens = run.raw("tokens")
    outcomes = {o["token_id"]: o for o in run.raw("token_outcomes")}
    states = run.raw("node_states")
    nodes = {n["node_type"]: n for n in run.raw("nodes")}
    events = run.raw("coalesce_events")
    merged = next(e for e in events if e["event_type"] == "merged")
    fork_child = next(t for t in tokens if t["fork_group_id"])
    prefix = run.run_id[:12] + "2"
    stray, orphan, unnamed, ungrouped = (f"{prefix}9{n:018d}" for n in range(4))
    twice = outcomes[fork_child["token_id"]]
    run.append("token_outcomes", [{**twice, "outcome_id": twice["outcome_id"] + "x", "outcome": "failed"}])
    run.append("tokens", [
        {**fork_child, "token_id": stray, "fork_group_id": None, "branch_name": None},           # no outcome
        {**fork_child, "token_id": orphan, "join_group_id": "g-two"},                             # 2 groups, no parents
        {**fork_child, "token_id": unnamed},                                                      # coalesced, unnamed
        {**fork_child, "token_id": ungrouped, "fork_group_id": None},                            # coalesced, no group
    ])
    run.append("token_parents", [{"token_id": unnamed, "parent_token_id": tokens[0]["token_id"], "ordinal": 0},
                                 {"token_id": ungrouped, "parent_token_id": "nobody", "ordinal": 0}])
    run.append("token_outcomes", [
        {**twice, "outcome_id": "o-orphan", "token_id": orphan, "outcome": "failed"},
        {**twice, "outcome_id": "o-unnamed", "token_id": unnamed, "outcome": "coalesced"},
        {**twice, "outcome_id": "o-ungrouped", "token_id": ungrouped, "outcome": "coalesced", "join_group_id": None},
    ])
    context = json.loads(merged["context_json"])
    run.append("coalesce_events", [
        {**merged, "event_id": "e-ghost", "arrived_token_ids": [*merged["arrived_token_ids"][:1], "ghost"],
         "context_json": json.dumps({**context, "arrival_order": [
             *context["arrival_order"][:1], {**context["arrival_order"][1], "token_id": "ghost"}]})},
        {**merged, "event_id": "e-edited", "context_json": merged["context_json"].replace('"quorum_met"', '"x"')},
    ])
    open_state = next(s for s in states if s["node_id"] == nodes["transform"]["node_id"])
    sink_state = next(s for s in states if s["node_id"] == nodes["sink"]["node_id"])
    run.append("node_states", [{**open_state, "state_id": "s-open", "status": "open", "completed_at": None},
                               {**sink_state, "state_id": "s-sink", "output_hash": None}])

    result = open_audit(run.store).check(run.run_id)
    assert not result.ok
    assert _found(result) == {
        ("one_terminal_outcome", fork_child["token_id"]),
        ("token_has_outcome", stray),
        ("parent_links_iff_group", orphan),
        ("parent_links_iff_group", ungrouped),
        ("parent_exists", ungrouped),
        ("fork_child_accounted", unnamed),
        ("coalesce_tokens_consistent", "e-ghost"),   # ghost is no token and has no coalesce state
        ("coalesce_state_context", "e-ghost"),
        ("coalesce_state_context", "e-edited"),
        ("no_open_states", "s-open"),
        ("coalesced_has_join_group", "o-ungrouped"),
        ("outcome_required_fields", twice["outcome_id"] + "x"),  # failed, no error_hash
        ("outcome_required_fields", "o-orphan"),
        ("one_group_per_token", orphan),
        ("sink_output_hash", "s-sink"),
        ("record_counts_match", run.run_id),  # the records added above are more than the run wrote
    }
    details = {(r["invariant"], r["record_id"]): r["detail"] for r in result.violations.iter_rows(named=True)}
    assert details[("one_terminal_outcome", fork_child["token_id"])].startswith("2 terminal outcomes")
    assert "ghost is not a token of the run" in str(result.violations.filter(
        result.violations["invariant"] == "coalesce_tokens_consistent")["detail"].to_list())
    text = repr(result)
    assert "violation(s) of 13 of 13 invariants" in text and "Violations:" in text
    assert details[("one_group_per_token", orphan)] == "token has a fork_group_id and a join_group_id"
    assert details[("outcome_required_fields", "o-orphan")] == f"failed outcome of token {orphan} has no error_hash"
    counted = result.violations.filter(result.violations["invariant"] == "record_counts_match")
    assert sorted(counted["table"]) == ["coalesce_events", "node_states", "token_outcomes", "token_parents", "tokens"]
    assert all(" record(s), the store holds " in d for d in counted["detail"])
    assert "enb-bad" in result.to_html()


def test_merged_token_with_other_parents_breaks_consistency(run: Run) -> None:
    merged = next(e for e in run.raw("coalesce_events") if e["event_type"] == "merged")
    run.append("coalesce_events", [{**merged, "event_id": "e-swapped",
                                    "arrived_token_ids": list(reversed(merged["arrived_token_ids"]))}])
    result = open_audit(run.store).check(run.run_id)
    details = result.violations.filter(result.violations["record_id"] == "e-swapped")["detail"].to_list()
    assert any("has parents" in d and "arrival order is" in d for d in details)
    assert "arrival_order in context_json differs from arrived_token_ids" in details


def _half_written(run: Run, landed: Collection[str]) -> Run:
    """A copy of the run as a reader sees it mid-run: its first ``runs`` revision (running) and, of the other
    tables, only ``landed`` (a writer lands each table's segment when it fills up, not all at once)."""
    copy = run.folder / "half-written"
    shutil.copytree(run.store, copy)
    for part in sorted((copy / "parquet" / "runs" / f"run_id={run.run_id}").glob("part-*.parquet"))[1:]:
        part.unlink()
    for table in set(TABLES) - set(landed) - {"runs"}:
        shutil.rmtree(copy / "parquet" / table / f"run_id={run.run_id}", ignore_errors=True)
    return Run(copy, run.run_id, run.folder)


#: Tables whose segments land last in the half-written copy: parent links, decisions, sink states.
NOT_YET = ("token_parents", "coalesce_events", "node_states")


def test_a_run_still_being_written_reports_no_records_not_yet_written(run: Run) -> None:
    live = _half_written(run, [t for t in TABLES if t not in NOT_YET])
    with AuditStore(live.store).writing(run.run_id):
        result = open_audit(live.store).check(run.run_id)
        assert result.status == "running"
        assert result.ok, result.violations
        assert result.partial
        scopes = dict(result.invariants.select("invariant", "scope").iter_rows())
        assert scopes == {"one_terminal_outcome": "full", "token_has_outcome": "skipped",
                          "parent_links_iff_group": "limited", "parent_exists": "skipped",
                          "fork_child_accounted": "limited", "coalesce_tokens_consistent": "limited",
                          "coalesce_state_context": "skipped", "no_open_states": "skipped",
                          "coalesced_has_join_group": "full", "outcome_required_fields": "full",
                          "one_group_per_token": "full", "sink_output_hash": "limited",
                          "record_counts_match": "skipped"}
        left_out = {name for name, scope in scopes.items() if scope != "full"}
        frame = result.to_polars()
        assert set(frame["invariant"]) == left_out and frame["record_id"].null_count() == frame.height
        assert all(d.startswith("not a violation: ") and "still being written" in d for d in frame["detail"])
        text, html = repr(result), result._repr_html_()
        assert text.startswith(f"Check of run {run.run_id} (running): no violation so far; the run is still being "
                               f"written, so this check is partial: 4 invariants checked in full, 4 limited, "
                               f"5 skipped until it finishes")
        assert "parent_exists (skipped): a parent's token record may land after the links to it" in text
        assert "still being written" in html and "Limited or skipped while the run is written" in html
    # the writer is gone: the run reads interrupted, and what it never wrote is not taken for a violation
    stopped = open_audit(live.store).check(run.run_id)
    assert stopped.status == "interrupted" and stopped.partial and stopped.ok, stopped.violations
    assert dict(stopped.invariants.select("invariant", "scope").iter_rows()) == scopes
    assert repr(stopped).startswith(f"Check of run {run.run_id} (interrupted): no violation so far; the run was "
                                    f"interrupted, so its trail ends where it stopped, so this check is partial: "
                                    f"4 invariants checked in full, 4 limited, 5 skipped\n")
    assert "Limited or skipped because the run was interrupted" in stopped._repr_html_()
    assert all("because the run was interrupted" in d for d in stopped.to_polars()["detail"])
    # a finished run with the same records missing is checked in full: there they are violations
    shutil.copytree(run.store / "parquet" / "runs", live.store / "parquet" / "runs", dirs_exist_ok=True)
    finished = open_audit(live.store).check(run.run_id)
    assert finished.status == "completed" and not finished.partial
    assert set(finished.invariants["scope"]) == {"full"} and finished.to_polars() is finished.violations
    assert {"parent_links_iff_group", "fork_child_accounted", "sink_output_hash"} <= set(
        finished.violations["invariant"])


def test_a_run_still_being_written_reports_what_no_later_record_can_fix(run: Run) -> None:
    live = _half_written(run, [t for t in TABLES if t not in ("token_parents", "coalesce_events")])
    tokens = live.raw("tokens")
    fork_child = next(t for t in tokens if t["fork_group_id"])
    outcome = next(o for o in live.raw("token_outcomes") if o["token_id"] == fork_child["token_id"])
    sink = next(n for n in live.raw("nodes") if n["node_type"] == "sink")
    state = next(s for s in live.raw("node_states") if s["node_id"] == sink["node_id"])
    live.append("token_outcomes", [{**outcome, "outcome_id": "o-twice", "outcome": "failed"},
                                   {**outcome, "outcome_id": "o-sinkless", "token_id": "t-sinkless",
                                    "outcome": "completed", "sink_name": None}])
    live.append("tokens", [{**fork_child, "token_id": "t-sinkless"}])
    live.append("node_states", [{**state, "state_id": "s-unhashed", "output_hash": None}])
    with AuditStore(live.store).writing(run.run_id):
        result = open_audit(live.store).check(run.run_id)
    assert _found(result) == {("one_terminal_outcome", fork_child["token_id"]),
                              ("fork_child_accounted", "t-sinkless"), ("sink_output_hash", "s-unhashed"),
                              ("outcome_required_fields", "o-twice"), ("outcome_required_fields", "o-sinkless")}
    assert result.partial and not result.ok
    assert repr(result).startswith(f"Check of run {run.run_id} (running): 5 violation(s) so far; the run is still")


def _damage_last_row_group(path: Path) -> None:
    """Invert the data pages of the segment's last row group, footer intact: DuckDB fails mid-read, naming no file."""
    group = pq.read_metadata(path).row_group(pq.read_metadata(path).num_row_groups - 1)
    data = bytearray(path.read_bytes())
    for chunk in map(group.column, range(group.num_columns)):
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        for i in range(start, start + chunk.total_compressed_size):
            data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_data_page_is_named_by_check_and_reported_by_verify(run: Run) -> None:
    states = run.raw("node_states")
    run.append("node_states", [{**s, "state_id": f"{s['state_id']}-{i}"} for i in range(5000 // len(states) + 1)
                               for s in states])  # several row groups
    [segment] = sorted((run.store / "parquet" / "node_states" / f"run_id={run.run_id}").glob("part-*.parquet"))[-1:]
    assert pq.read_metadata(segment).num_row_groups > 1
    _damage_last_row_group(segment)
    audit = open_audit(run.store)
    with pytest.raises(AuditStoreError, match=f"^{run.store}: a segment of the audit store cannot be read: "
                                              f"{segment}: ") as caught:
        audit.check(run.run_id)
    assert list(caught.value.segments) == [segment]
    verified = audit.verify(run.run_id)
    assert verified.merkle == "mismatch"
    rows = verified.mismatches.select("check", "table", "record_id", "detail").rows()
    assert rows[0][:3] == ("segment_unreadable", "node_states", segment.name)
    assert rows[0][3].startswith(f"{segment} cannot be read (") and "; not verified: sink file " in rows[0][3]
    assert ("merkle_segment_added", "node_states", segment.name) in [r[:3] for r in rows]


def test_a_segment_left_out_when_opened_stops_the_checks_that_read_its_table(run: Run) -> None:
    """A truncated node_states segment used to make every line of the intact sink file a mismatch."""
    [segment] = sorted((run.store / "parquet" / "node_states" / f"run_id={run.run_id}").glob("part-*.parquet"))[:1]
    segment.write_bytes(segment.read_bytes()[: segment.stat().st_size // 2])
    with pytest.warns(AuditStoreWarning, match=f"cannot be read: {segment}: "):
        verified = open_audit(run.store).verify(run.run_id)
    rows = verified.mismatches.select("check", "table", "record_id", "detail").rows()
    assert not verified.ok and "artifact_line" not in {r[0] for r in rows}
    assert rows[0][:3] == ("segment_unreadable", "node_states", segment.name)
    assert rows[0][3].endswith("; it was left out of every table when the audit was opened; not verified: sink files")
    assert verified.checked["source_rows"] > 0 and "artifacts" not in verified.checked  # the others still ran


def test_verify_does_not_blame_a_live_run_or_only_the_digests_for_tampering(run: Run) -> None:
    """A sealed run whose digests are gone is tampered with, not still running; a forged root may be either side."""
    for segment in (run.store / "parquet" / "runs" / f"run_id={run.run_id}").glob("part-*.parquet"):
        table = pq.read_table(segment, schema=TABLES["runs"].file_schema)
        forged = table.set_column(table.schema.get_field_index("merkle_root"), "merkle_root",
                                  pa.array(["ab" * 32] * table.num_rows, pa.string()))
        pq.write_table(forged, segment, store_schema=False)
    (run.store / "audit.duckdb").unlink(missing_ok=True)  # the helpers read the Parquet that was edited
    details = {r["check"]: r["detail"] for r in open_audit(run.store).verify(run.run_id).mismatches.to_dicts()}
    assert details["merkle_digests_changed"].endswith("one of them or the stored root was changed")
    shutil.rmtree(run.store / "parquet" / "segment_digests" / f"run_id={run.run_id}")
    details = {r["check"]: r["detail"] for r in open_audit(run.store).verify(run.run_id).mismatches.to_dicts()}
    assert "gone, yet it was sealed with a Merkle root" in details["merkle_no_digests"]


def _rewrite(run: Run, table: str, change: Callable[[pa.Table], pa.Table]) -> None:
    """Rewrite every segment of ``table`` in place, as a tamperer with write access would."""
    for segment in (run.store / "parquet" / table / f"run_id={run.run_id}").glob("part-*.parquet"):
        pq.write_table(change(pq.read_table(segment, schema=TABLES[table].file_schema)), segment, store_schema=False)


def _with(table: pa.Table, column: str, value: Any) -> pa.Table:
    field = table.schema.field(column)
    return table.set_column(table.schema.get_field_index(column), field, pa.array([value] * table.num_rows, field.type))


def test_the_root_covers_the_runs_own_row(run: Run) -> None:
    """Status, error, configuration or counts forged in the runs segment: the root no longer matches."""
    for column, value in (("status", "failed"), ("error_message", "forged"), ("config_hash", "0" * 64),
                          ("counts_json", "{}")):
        saved = {p: p.read_bytes() for p in (run.store / "parquet" / "runs").rglob("part-*.parquet")}
        _rewrite(run, "runs", lambda t, c=column, v=value: _with(t, c, v))
        verified = open_audit(run.store).verify(run.run_id)
        assert not verified.ok and verified.merkle == "mismatch", column
        [detail] = [r["detail"] for r in verified.mismatches.to_dicts() if r["check"] == "merkle_digests_changed"]
        assert "the run's own row (status, configuration, counts, error)" in detail
        for path, data in saved.items():
            path.write_bytes(data)
        assert open_audit(run.store).verify(run.run_id).ok, column


def test_forged_fingerprints_are_found_and_not_used_to_name_a_record(run: Run) -> None:
    [segment] = (run.store / "parquet" / "token_outcomes" / f"run_id={run.run_id}").glob("part-*.parquet")

    def zero_first_fingerprint(digests: pa.Table) -> pa.Table:
        blobs = [b"\0" * 8 + blob[8:] if name == "token_outcomes" else blob for name, blob in
                 zip(digests["table_name"].to_pylist(), digests["fingerprints"].to_pylist(), strict=True)]
        return digests.set_column(digests.schema.get_field_index("fingerprints"), "fingerprints",
                                  pa.array(blobs, pa.binary()))

    _rewrite(run, "segment_digests", zero_first_fingerprint)
    records = pq.read_table(segment, schema=TABLES["token_outcomes"].file_schema).to_pylist()
    records[5]["sink_name"] = "elsewhere"
    pq.write_table(pa.Table.from_pylist(records, schema=TABLES["token_outcomes"].file_schema), segment)
    found = {r["check"]: r for r in open_audit(run.store).verify(run.run_id).mismatches.to_dicts()}
    assert found["merkle_fingerprints_changed"]["table"] == "segment_digests"
    assert segment.name in found["merkle_fingerprints_changed"]["detail"]
    assert "merkle_record_changed" not in found  # the forged fingerprints would have named position 0
    assert found["merkle_bytes_changed"]["table"] == "token_outcomes"


def test_a_run_sealed_before_schema_2_still_verifies(run: Run) -> None:
    """Its root covers the segments only, and its digests have no fingerprint hashes."""
    from elspeth_nb.audit.integrity import run_root
    from elspeth_nb.audit.store import AuditStore

    _rewrite(run, "segment_digests", lambda t: _with(t, "fingerprints_sha256", None))
    old_root = run_root(AuditStore.open(run.store).segment_digests(run.run_id))
    _rewrite(run, "runs", lambda t: _with(_with(t, "schema_version", 1), "merkle_root", old_root))
    verified = open_audit(run.store).verify(run.run_id)
    assert verified.ok and verified.merkle_root == old_root, verified.mismatches
    _rewrite(run, "runs", lambda t: _with(t, "status", "failed"))
    assert open_audit(run.store).verify(run.run_id).ok  # what schema 1 could not see, and why 2 covers the row


def test_a_run_whose_runs_partition_was_removed_is_listed_not_silently_ignored(
        run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    """Plain `elspeth-nb verify` used to check the other run and exit 0."""
    from elspeth_nb.cli import main

    other = run_pipeline(fork_pipeline(run.folder / "input.csv"), audit=run.store, clock=FakeClock(),
                         sync_duckdb=False)
    shutil.rmtree(run.store / "parquet" / "runs" / f"run_id={run.run_id}")
    with open_audit(run.store) as audit:
        assert audit.runs()["run_id"].to_list() == [other.run_id]
        orphans = audit.orphaned_runs
        assert list(orphans) == [run.run_id] and {"rows", "tokens", "node_states"} <= set(orphans[run.run_id])
        assert f"1 run(s) have records but no runs row (removed or tampered with):\n  {run.run_id}: " in repr(audit)
    capsys.readouterr()
    assert main(["verify", "--audit", str(run.store)]) == 1  # the other run verifies; the orphan fails the command
    assert f"run {run.run_id} has records in " in capsys.readouterr().err


def test_verify_recomputes_payload_and_source_hashes(run: Run) -> None:
    row = next(r for r in run.raw("rows") if r["row_index"] == 2)
    [segment] = (run.store / "parquet" / "payloads" / f"run_id={run.run_id}").glob("part-*.parquet")
    table = pq.read_table(segment).to_pylist()
    for record in table:
        if record["payload_hash"] == row["source_data_hash"]:
            record["payload_json"] = record["payload_json"].replace("30", "31")
    pq.write_table(pa.Table.from_pylist(table, schema=TABLES["payloads"].file_schema), segment)
    result = open_audit(run.store).verify(run.run_id)
    assert not result.ok and result.merkle == "mismatch"
    found = {(r["check"], r["record_id"]) for r in result.mismatches.iter_rows(named=True)}
    assert found == {("payload_hash", row["source_data_hash"]), ("source_row_hash", row["row_id"]),
                     ("merkle_record_changed", f"payload_hash={row['source_data_hash']}")}
    assert "3 mismatch(es)" in repr(result)


def test_verify_reads_every_line_of_the_sink_file(run: Run) -> None:
    output = run.folder / "output.jsonl"
    lines = output.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"id":2', b'"id":7')
    output.write_bytes(b"".join(lines))
    result = open_audit(run.store).verify(run.run_id)
    checks = sorted(result.mismatches["check"])
    assert checks == ["artifact_hash", "artifact_line", "artifact_lines_missing"]
    line = result.mismatches.filter(result.mismatches["check"] == "artifact_line").row(0, named=True)
    assert line["detail"].startswith("line 2 of output.jsonl matches no remaining output_hash of sink output")
    assert result.checked["lines"] == 4


def test_verify_reports_a_missing_sink_file(run: Run) -> None:
    (run.folder / "output.jsonl").unlink()
    result = open_audit(run.store).verify(run.run_id)
    assert result.mismatches["check"].to_list() == ["artifact_file"]
    assert "cannot read the sink file" in result.mismatches["detail"][0]
    assert result.merkle == "verified"  # the trail itself is intact


def test_verify_recomputes_the_merkle_root(run: Run) -> None:
    stored = raw.latest_run(run.store, run.run_id)["merkle_root"]
    audit = open_audit(run.store)
    result = audit.verify(run.run_id, expected_root=stored)
    assert result.ok and (result.merkle, result.merkle_root) == ("verified", stored)
    assert f"Merkle root verified {stored}" in repr(result)
    wrong = audit.verify(run.run_id, expected_root="ab" * 32)
    [mismatch] = wrong.mismatches.rows(named=True)
    assert (mismatch["check"], mismatch["expected"], mismatch["actual"]) == ("merkle_root_changed", "ab" * 32, stored)
    run.append("token_parents", [{"token_id": "forged", "parent_token_id": "forged-parent", "ordinal": 0}])
    forged = open_audit(run.store).verify(run.run_id)
    assert forged.merkle == "mismatch" and set(forged.mismatches["check"]) == {"merkle_segment_added"}


def test_verify_without_segment_files_says_the_root_is_unavailable(run: Run) -> None:
    from elspeth_nb.audit.store import AuditStore

    AuditStore.open(run.store).sync_duckdb([run.run_id])
    copy = run.folder / "elsewhere.duckdb"
    shutil.copy(run.store / "audit.duckdb", copy)
    audit = open_audit(copy)
    assert audit.verify(run.run_id).merkle == "unavailable" and audit.verify(run.run_id).ok
    result = audit.verify(run.run_id, expected_root="ab" * 32)
    assert result.mismatches["check"].to_list() == ["merkle_root"]
    assert open_audit(run.store / "audit.duckdb").verify(run.run_id).merkle == "verified"  # its store is beside it


def test_a_lost_segment_of_a_finished_run_breaks_the_record_counts(run: Run) -> None:
    """A partition gone (a race, a bad copy) left check() OK: the run's own record counts now say so."""
    import shutil

    partition = run.store / "parquet" / "node_states" / f"run_id={run.run_id}"
    written = len(run.raw("node_states"))
    shutil.rmtree(partition)
    result = open_audit(run.store).check(run.run_id)
    assert not result.ok
    counted = result.violations.filter(result.violations["invariant"] == "record_counts_match")
    assert counted.select("table", "detail").rows() == [
        ("node_states", f"node_states: the run recorded {written} record(s), the store holds 0")]
