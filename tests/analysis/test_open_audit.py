"""open_audit: store folder, audit.duckdb, errors for everything else, read-only, schema evolution."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from elspeth_nb.analysis import Audit, ReadOnlyError, open_audit
from elspeth_nb.audit.schema import RUNS, TABLES
from elspeth_nb.audit.store import AuditStore
from elspeth_nb.audit.writer import ParquetSegmentWriter
from elspeth_nb.engine.clock import FakeClock
from elspeth_nb.engine.runner import run_pipeline
from elspeth_nb.errors import (
    AuditClosedError,
    AuditStoreError,
    AuditStoreWarning,
    NotFoundError,
    RunNotFoundError,
    SchemaVersionError,
)
from tests.analysis import raw
from tests.analysis.conftest import CASES, HASHES_ONLY, JITTER, Matrix
from tests.cases import fork_pipeline, write_csv

RUNS_COLUMNS = ["run_id", "status", "started_at", "completed_at", "duration_s", "producer", "pipeline_path",
                "payload_mode", "rows", "tokens", "merged", "coalesce_failed", "late_arrivals"]


def test_every_table_is_a_view_with_the_schema_columns_in_order(any_audit: Audit) -> None:
    for name, table in TABLES.items():
        described = any_audit.sql(f'DESCRIBE "{name}"')["column_name"].to_list()
        assert described == table.columns, name
    assert any_audit.sql("DESCRIBE run_revisions")["column_name"].to_list() == RUNS.columns


def test_runs_lists_every_run_newest_first_with_counts_from_the_raw_segments(any_audit: Audit, matrix: Matrix) -> None:
    runs = any_audit.runs()
    assert runs.columns == RUNS_COLUMNS
    assert set(runs["run_id"]) == set(matrix.runs.values())
    # all runs started at the fake clock's epoch: ties go to the order they landed in the store
    assert runs["run_id"].to_list() == list(reversed(AuditStore(matrix.store).run_ids()))
    for record in runs.iter_rows(named=True):
        run = record["run_id"]
        events = raw.rows(matrix.store, "coalesce_events", run)
        latest = raw.latest_run(matrix.store, run)
        assert record["status"] == latest["status"] == "completed"
        assert record["rows"] == len(raw.rows(matrix.store, "rows", run))
        assert record["tokens"] == len(raw.rows(matrix.store, "tokens", run))
        assert record["merged"] == sum(e["event_type"] == "merged" for e in events)
        assert record["coalesce_failed"] == sum(e["event_type"] == "failed" for e in events)
        assert record["late_arrivals"] == sum(e["event_type"] == "late_arrival" for e in events)
        assert record["duration_s"] == pytest.approx((latest["completed_at"] - latest["started_at"]).total_seconds())
        assert record["payload_mode"] == ("hashes" if run == matrix.runs[HASHES_ONLY] else "all")


def test_store_and_duckdb_answer_identically(audit: Audit, duck_audit: Audit, matrix: Matrix) -> None:
    store, copy = audit, duck_audit
    assert_frame_equal(store.runs(), copy.runs())
    for case in ("quorum-nested-lost", JITTER):
        run = matrix.runs[case]
        assert_frame_equal(store.coalesce_events(run, include_late=True), copy.coalesce_events(run, include_late=True))
        assert_frame_equal(store.merge_timings(run), copy.merge_timings(run))
        assert_frame_equal(store.merge_timing_summary(run), copy.merge_timing_summary(run))
        assert_frame_equal(store.policy_outcomes(run).to_polars(), copy.policy_outcomes(run).to_polars())
        summary, summary_copy = store.run_summary(run), copy.run_summary(run)
        assert summary.header == summary_copy.header
        assert_frame_equal(summary.nodes, summary_copy.nodes)
        assert_frame_equal(summary.outcomes, summary_copy.outcomes)
        lineage, lineage_copy = store.lineage(run, row_index=1), copy.lineage(run, row_index=1)
        assert repr(lineage) == repr(lineage_copy)
        for frame in ("tokens", "states", "decisions", "data"):
            assert_frame_equal(getattr(lineage, frame), getattr(lineage_copy, frame))
        assert_frame_equal(store.check(run).invariants, copy.check(run).invariants)
        assert store.verify(run).checked == copy.verify(run).checked
    jitter = matrix.runs[JITTER]
    assert_frame_equal(store.diff_runs(jitter).to_polars(), copy.diff_runs(jitter).to_polars())


def test_latest_ids_and_unique_prefixes_resolve(audit: Audit, matrix: Matrix) -> None:
    run = matrix.runs["quorum-union-delayed"]
    assert audit.run_summary("latest").run_id == AuditStore(matrix.store).run_ids()[-1]
    assert audit.run_summary(run).run_id == run
    assert audit.run_summary(run[:12]).run_id == run


def test_unknown_run_names_what_exists(audit: Audit, matrix: Matrix) -> None:
    with pytest.raises(RunNotFoundError) as caught:
        audit.run_summary("no-such-run")
    message = str(caught.value)
    assert "`no-such-run` not found" in message
    assert AuditStore(matrix.store).run_ids()[-1] in message and "latest" in message
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, NotFoundError)


def test_empty_store_has_an_empty_runs_frame_and_a_clear_latest_error(tmp_path: Path) -> None:
    AuditStore.create(tmp_path / "audit")
    audit = open_audit(tmp_path / "audit")
    runs = audit.runs()
    assert runs.height == 0 and runs.columns == RUNS_COLUMNS
    with pytest.raises(RunNotFoundError, match=f"no runs in {tmp_path / 'audit'}"):
        audit.run_summary("latest")
    assert "0 run(s)" in repr(audit)


@pytest.mark.parametrize("what", ["missing", "empty_folder", "text_file", "foreign_duckdb", "foreign_sqlite"])
def test_paths_that_are_no_audit_fail_clearly(tmp_path: Path, what: str) -> None:
    path = tmp_path / what
    if what == "empty_folder":
        path.mkdir()
    elif what == "text_file":
        path.write_text("run_id,status\n")
    elif what == "foreign_duckdb":
        con = duckdb.connect(str(path))
        con.execute("CREATE TABLE t (a INTEGER)")
        con.close()
    elif what == "foreign_sqlite":
        con3 = sqlite3.connect(path)
        con3.execute("CREATE TABLE t (a INTEGER)")
        con3.commit()
        con3.close()
    with pytest.raises(AuditStoreError) as caught:
        open_audit(path)
    message = str(caught.value)
    assert str(path) in message
    expected = {"missing": "does not exist", "empty_folder": "not an elspeth-nb audit store",
                "text_file": "neither a DuckDB nor an SQLite", "foreign_duckdb": "without the audit tables",
                "foreign_sqlite": "not an ELSPETH Landscape"}[what]
    assert expected in message
    if what != "foreign_sqlite":
        assert "audit.duckdb" in message and "Landscape" in message  # says what was expected


def test_the_folder_above_a_store_points_at_it(matrix: Matrix) -> None:
    with pytest.raises(AuditStoreError, match=f"contains the store {matrix.store}"):
        open_audit(matrix.store.parent)


def test_payload_folder_only_applies_to_elspeth_files(matrix: Matrix) -> None:
    with pytest.raises(ValueError, match="payload folder of an ELSPETH Landscape"):
        open_audit(matrix.store, payloads=matrix.store)


def test_sql_runs_reads_and_refuses_writes(audit: Audit, matrix: Matrix) -> None:
    run = matrix.runs["require_all-union-all"]
    got = audit.sql("SELECT count(*) AS n FROM tokens WHERE run_id = $run", {"run": run})
    assert got["n"].to_list() == [len(raw.rows(matrix.store, "tokens", run))]
    assert audit.sql("SELECT ? AS x", ["a'b"])["x"].to_list() == ["a'b"]
    assert audit.sql("EXPLAIN SELECT 1").height >= 1
    for statement in ("CREATE TABLE t AS SELECT 1", "INSERT INTO runs SELECT * FROM runs", "DELETE FROM tokens",
                      "DROP VIEW tokens", "COPY tokens TO 'x.csv'", "ATTACH 'x.duckdb' AS x", "SET threads = 1",
                      "SELECT 1; DROP VIEW runs", "EXPLAIN ANALYZE COPY tokens TO 'x.csv'", "PRAGMA version"):
        with pytest.raises(ReadOnlyError, match="read"):
            audit.sql(statement)
    assert audit.sql("SELECT count(*) AS n FROM runs")["n"][0] == len(matrix.runs)


PIVOT_OUTCOMES = "PIVOT (SELECT * FROM token_outcomes WHERE is_terminal = 1) ON outcome USING count(*) GROUP BY run_id"


def test_sql_comments_are_whitespace_wherever_they_are(audit: Audit) -> None:
    """A comment before EXPLAIN recursed without end; one before ANALYZE or after a PIVOT's ';' was refused."""
    assert audit.sql("-- how many runs?\nEXPLAIN SELECT count(*) FROM runs").height == 1
    assert "Total Time" in audit.sql("EXPLAIN /* timed */ ANALYZE SELECT 1").row(0)[1]
    assert audit.sql(PIVOT_OUTCOMES + "; -- one row per run").height == audit.sql("SELECT * FROM runs").height
    assert audit.sql("SELECT '--kept' AS s /* gone */").rows() == [("--kept",)]
    assert audit.sql("SELECT '日本語' AS a -- note\n , 2 AS b").columns == ["a", "b"]  # positions count UTF-8 bytes
    for statement in ("-- note\nEXPLAIN ANALYZE CREATE TABLE t AS SELECT 1", "/* x */ DROP VIEW runs",
                      "SELECT 1; -- one\nDROP VIEW runs"):
        with pytest.raises(ReadOnlyError, match="read-only"):
            audit.sql(statement)


def test_sql_runs_pivot_unpivot_and_the_describing_statements(any_audit: Audit, matrix: Matrix) -> None:
    run = matrix.runs[JITTER]
    pivoted = any_audit.sql(PIVOT_OUTCOMES + ";").filter(pl.col("run_id") == run).row(0, named=True)
    assert {k: v for k, v in pivoted.items() if k != "run_id" and v} == dict(any_audit.outcomes(run)
                                                                           .select("outcome", "count").rows())
    assert any_audit.sql(f"SELECT count(*) AS n FROM ({PIVOT_OUTCOMES})")["n"][0] == len(matrix.runs)
    assert any_audit.sql("UNPIVOT (SELECT 1 AS a, 2 AS b) ON a, b").rows() == [("a", 1), ("b", 2)]
    assert any_audit.sql("DESCRIBE runs")["column_name"].to_list() == RUNS.columns
    assert "tokens" in any_audit.sql("SHOW TABLES")["name"].to_list()
    assert any_audit.sql("SUMMARIZE runs")["column_name"].to_list() == RUNS.columns
    explained = any_audit.sql("EXPLAIN ANALYZE " + PIVOT_OUTCOMES)  # DuckDB parses this as MULTI too
    plan = explained.row(0)[1]
    assert explained.height == 1 and "Total Time" in plan and "count_star()" in plan  # run and timed: ANALYZE
    assert any_audit.sql("SELECT count(*) AS n FROM duckdb_types() WHERE type_name LIKE '__pivot%'")["n"][0] == 0


@pytest.mark.parametrize("statement", [
    f"CREATE TABLE t AS {PIVOT_OUTCOMES}",
    f"INSERT INTO runs SELECT * FROM runs WHERE run_id IN (SELECT run_id FROM ({PIVOT_OUTCOMES}))",
    f"DELETE FROM tokens WHERE run_id IN (SELECT run_id FROM ({PIVOT_OUTCOMES}))",
    f"COPY ({PIVOT_OUTCOMES}) TO 'x.csv'",
    f"{PIVOT_OUTCOMES}; DROP VIEW runs",
    "CALL pragma_version()",
])
def test_sql_refuses_writes_that_carry_a_pivot(any_audit: Audit, matrix: Matrix, statement: str) -> None:
    with pytest.raises(ReadOnlyError, match="read-only"):
        any_audit.sql(statement)
    assert any_audit.sql("SELECT count(*) AS n FROM runs")["n"][0] == len(matrix.runs)


def test_the_connection_cannot_touch_files_outside_the_store(audit: Audit, tmp_path: Path) -> None:
    target = tmp_path / "leak.csv"
    with pytest.raises(duckdb.PermissionException):
        audit.con.execute("COPY (SELECT 1) TO $p", {"p": str(target)})
    with pytest.raises(duckdb.Error):
        audit.con.execute("SET enable_external_access = true")
    assert not target.exists()


def test_reading_never_changes_the_store(matrix: Matrix, tmp_path: Path) -> None:
    copy = tmp_path / "audit"
    shutil.copytree(matrix.store, copy)

    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(copy)): (p.stat().st_size, p.stat().st_mtime_ns) for p in copy.rglob("*")}

    before = snapshot()
    audit = open_audit(copy)
    run = matrix.runs[JITTER]
    audit.runs(), audit.run_summary(run), audit.lineage(run, row_index=0), audit.check(run), audit.verify(run)
    audit.merge_timing_summary(run), audit.policy_outcomes(run), audit.diff_runs(run, "latest")
    audit.refresh()
    audit.close()
    duck = open_audit(copy / "audit.duckdb")
    duck.runs(), duck.check(run)
    duck.close()
    assert snapshot() == before


def test_a_store_written_before_a_column_existed_reads_it_as_null(matrix: Matrix, tmp_path: Path) -> None:
    copy = tmp_path / "audit"
    shutil.copytree(matrix.store, copy)
    for path in (copy / "parquet" / "nodes").rglob("part-*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["node_name"]), path)
    audit = open_audit(copy)
    nodes = audit.sql("SELECT * FROM nodes")
    assert nodes.columns == TABLES["nodes"].columns
    assert nodes.height > 0 and nodes["node_name"].null_count() == nodes.height
    assert audit.run_summary(matrix.runs[JITTER]).nodes.height > 0


def test_a_table_with_no_segment_at_all_is_an_empty_view(matrix: Matrix, tmp_path: Path) -> None:
    copy = tmp_path / "audit"
    shutil.copytree(matrix.store, copy)
    shutil.rmtree(copy / "parquet" / "calls")
    audit = open_audit(copy)
    assert audit.sql("SELECT * FROM calls").columns == TABLES["calls"].columns
    assert audit.sql("SELECT count(*) AS n FROM calls")["n"][0] == 0


def test_runs_written_by_a_newer_schema_are_refused(matrix: Matrix, tmp_path: Path) -> None:
    copy = tmp_path / "audit"
    shutil.copytree(matrix.store, copy)
    run = matrix.runs["first-select-all"]
    row = raw.latest_run(copy, run)
    row.update(revision=row["revision"] + 1, schema_version=99)
    row.pop("run_id")
    writer = ParquetSegmentWriter(copy / "parquet")
    writer.write_segment(RUNS, run, pa.Table.from_pylist([row], schema=RUNS.file_schema))
    with pytest.raises(SchemaVersionError, match="version 99"):
        open_audit(copy)


def test_repr_and_html_list_the_runs(audit: Audit, matrix: Matrix) -> None:
    text = repr(audit)
    assert text.startswith(f"Audit (store) {matrix.store}: {len(matrix.runs)} run(s)")
    assert all(run in text for run in matrix.runs.values())
    assert matrix.runs[JITTER] in audit._repr_html_()


def test_context_manager_closes_the_connection(simple_store: Path) -> None:
    with open_audit(simple_store) as audit:
        assert audit.runs().height == 1
        con = audit.con
    with pytest.raises(duckdb.ConnectionException):
        con.execute("SELECT 1")
    with pytest.raises(AuditClosedError, match="closed"):
        audit.con.execute("SELECT 1")


CLOSED_CALLS = {
    "runs": lambda a: a.runs(), "run_summary": lambda a: a.run_summary(), "outcomes": lambda a: a.outcomes(),
    "lineage": lambda a: a.lineage(row_index=0), "coalesce_events": lambda a: a.coalesce_events(),
    "merge_timings": lambda a: a.merge_timings(), "merge_timing_summary": lambda a: a.merge_timing_summary(),
    "policy_outcomes": lambda a: a.policy_outcomes(), "check": lambda a: a.check(), "verify": lambda a: a.verify(),
    "diff_runs": lambda a: a.diff_runs("latest", "latest"), "sql": lambda a: a.sql("SELECT 1"),
    "refresh": lambda a: a.refresh(), "con": lambda a: a.con,
}


def test_a_closed_audit_says_so_and_every_helper_refuses_clearly(simple_store: Path) -> None:
    audit = open_audit(simple_store)
    audit.close()
    audit.close()  # closing twice is harmless
    assert audit.closed
    assert repr(audit) == f"Audit (store) {simple_store.resolve()}: closed"
    assert "closed" in audit._repr_html_() and audit.kind == "store"
    for name, call in CLOSED_CALLS.items():
        with pytest.raises(AuditClosedError) as caught:
            call(audit)
        assert str(caught.value) == (f"this Audit of {simple_store.resolve()} is closed; "
                                     f"open_audit('{simple_store.resolve()}') again to read it"), name
        assert isinstance(caught.value, ValueError)


def test_cases_cover_every_policy_and_merge_strategy() -> None:
    assert {p for p, _, _ in CASES.values()} == {"require_all", "quorum", "best_effort", "first"}
    assert {m for _, m, _ in CASES.values()} == {"union", "nested", "select"}
    assert {s for _, _, s in CASES.values()} == {"all", "lost", "delayed", "timeout"}


def test_frames_are_polars(audit: Audit) -> None:
    assert isinstance(audit.runs(), pl.DataFrame)
    assert os.fspath(audit.path) == os.fspath(audit.path.resolve())


def test_a_truncated_segment_of_one_run_is_left_out_and_the_other_runs_read_as_usual(tmp_path: Path) -> None:
    store = tmp_path / "audit"
    old, new = (run_pipeline(fork_pipeline(write_csv(tmp_path / f"input{i}.csv")), audit=store, clock=FakeClock(),
                             sync_duckdb=False).run_id for i in range(2))
    shutil.copytree(store, tmp_path / "sound")
    segment = store / "parquet" / "tokens" / f"run_id={old}" / "part-000000.parquet"
    whole = segment.read_bytes()
    segment.write_bytes(whole[: len(whole) // 2])

    with pytest.warns(AuditStoreWarning, match=f"cannot be read: {segment}: ") as warned:
        audit = open_audit(store)
    assert len(warned) == 1
    [problem] = audit.problems
    assert problem.startswith(f"{segment}: ") and "magic bytes" in problem
    assert "1 segment(s) cannot be read and are left out:" in repr(audit) and str(segment) in audit.to_html()
    assert audit.runs()["run_id"].to_list() == [new, old]

    sound = open_audit(tmp_path / "sound")
    for helper in ("run_summary", "outcomes", "coalesce_events", "merge_timings", "merge_timing_summary"):
        found, expected = getattr(audit, helper)(new), getattr(sound, helper)(new)
        assert_frame_equal(found if isinstance(found, pl.DataFrame) else found.to_polars(),
                           expected if isinstance(expected, pl.DataFrame) else expected.to_polars())
    assert audit.lineage(new, row_index=2).tokens.height == sound.lineage(new, row_index=2).tokens.height
    assert audit.check(new).ok and audit.verify(new).ok

    with pytest.raises(AuditStoreError, match=f"^{store}: run {old} cannot be read in full: a segment of the audit "
                                              f"store cannot be read: {segment}: ") as refused:
        audit.outcomes(old)
    assert list(refused.value.segments) == [segment]
    verified = audit.verify(old)
    assert verified.merkle == "mismatch"
    assert verified.mismatches.select("check", "table", "record_id").rows() == [
        ("segment_unreadable", "tokens", segment.name), ("merkle_segment_unreadable", "tokens", segment.name)]

    # segments that land later are still read, without refresh()
    count = "SELECT count(*) AS n FROM tokens WHERE run_id = $run"
    before = audit.sql(count, {"run": new})["n"][0]
    token = {**raw.rows(store, "tokens", new)[0], "token_id": "landed-later"}
    ParquetSegmentWriter(store / "parquet", fsync=False).write_segment(
        TABLES["tokens"], new, pa.Table.from_pylist([token], schema=TABLES["tokens"].file_schema))
    assert audit.sql(count, {"run": new})["n"][0] == before + 1

    audit.refresh()  # still damaged: no second warning (filterwarnings = error)
    assert audit.problems == [problem]
    segment.write_bytes(whole)
    audit.refresh()
    assert audit.problems == [] and audit.check(old).ok
