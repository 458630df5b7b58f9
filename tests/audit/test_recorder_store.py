"""The recorder buffers tuples in schema order and writes them as atomic Parquet segments."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from elspeth_nb.audit.recorder import Recorder, finish_batches, format_id
from elspeth_nb.audit.schema import TABLES
from elspeth_nb.audit.store import AuditStore, duckdb_type
from elspeth_nb.audit.writer import MemoryWriter, ParquetSegmentWriter
from elspeth_nb.errors import AuditStoreError, SchemaVersionError


@pytest.mark.parametrize("name", sorted(set(TABLES) - {"segment_digests"}))  # digests come from the writer
def test_each_recorder_method_takes_exactly_its_table_columns(name: str) -> None:
    params = list(inspect.signature(getattr(Recorder, name)).parameters)[1:]
    assert params == TABLES[name].file_columns


def test_every_column_type_maps_to_duckdb() -> None:
    for table in TABLES.values():
        for f in table.schema:
            assert duckdb_type(f.type)


def test_ids_become_text_and_engine_times_become_utc_timestamps() -> None:
    writer = MemoryWriter()
    rec = Recorder("0123456789abcdef", writer, time_offset=1767225600.0, background=False)
    rec.node_states(5, 7, "n", 1, 0, "completed", "h", None, None, '{"a":1}', 1.5, None, None, 0.25, None)
    rec.close()
    [row] = writer.table("node_states").to_pylist()
    assert row["state_id"] == format_id("0123456789abcdef", "state", 5) == "0123456789ab31000000000000000005"
    assert row["token_id"] == "0123456789ab21000000000000000007"
    assert row["started_at"].isoformat() == "2026-01-01T00:00:00.250000+00:00"
    assert row["completed_at"] is None and row["output_hash"] is None


def test_flush_writes_one_segment_per_table_and_memory_writer_adds_run_id() -> None:
    writer = MemoryWriter()
    rec = Recorder("run1", writer)
    rec.token_parents(2, 1, 0)
    rec.payloads("h1", '{"a":1}')
    rec.payloads("h1", '{"a":1}')  # deduplicated
    rec.close()
    parents = writer.table("token_parents")
    assert parents.column_names == TABLES["token_parents"].columns
    assert parents.to_pylist() == [{"token_id": format_id("run1", "token", 2),
                                    "parent_token_id": format_id("run1", "token", 1), "ordinal": 0, "run_id": "run1"}]
    assert writer.table("payloads").num_rows == 1
    assert writer.table("rows").num_rows == 0


def test_buffers_flush_when_full(tmp_path: Path) -> None:
    writer = ParquetSegmentWriter(tmp_path, fsync=False)
    rec = Recorder("r", writer, segment_rows=3, background=False)
    for i in range(7):
        rec.token_parents(i, 100, i)
        rec.tick()
    files = sorted((tmp_path / "token_parents" / "run_id=r").glob("part-*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [3, 3]
    rec.close()
    files = sorted((tmp_path / "token_parents" / "run_id=r").iterdir())
    assert [f.name for f in files] == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]


def test_segment_write_failure_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    writer = ParquetSegmentWriter(tmp_path, fsync=True)
    batch = TABLES["token_parents"].file_schema.empty_table()
    with pytest.raises(AuditStoreError, match="No space left on device"):
        writer.write_segment(TABLES["token_parents"], "r", batch)
    assert list((tmp_path / "token_parents" / "run_id=r").iterdir()) == []


def test_store_refuses_unwritable_path(tmp_path: Path) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    try:
        if os.access(target, os.W_OK):  # running as root: permissions do not apply
            blocker = tmp_path / "file"
            blocker.write_text("x")
            target = blocker / "audit"
        with pytest.raises(AuditStoreError, match="not writable"):
            AuditStore.create(target)
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_store_is_never_created_among_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".gitkeep").write_text("")
    with pytest.raises(AuditStoreError, match=r"already holds other files \(notes.txt\) and is not an elspeth-nb"):
        AuditStore.create(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gitkeep", "notes.txt"]
    (tmp_path / "notes.txt").unlink()
    assert AuditStore.create(tmp_path).manifest_path.exists()  # hidden files alone do not count
    (tmp_path / "notes.txt").write_text("mine")
    assert AuditStore.create(tmp_path).root == tmp_path  # an existing store is reused, whatever else it holds


def test_store_refuses_newer_schema(tmp_path: Path) -> None:
    AuditStore.create(tmp_path)
    (tmp_path / "elspeth-nb-store.json").write_text('{"format": "elspeth-nb-audit-store", "schema_version": 99}')
    with pytest.raises(SchemaVersionError, match="version 99"):
        AuditStore.open(tmp_path)


def test_open_rejects_a_folder_that_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(AuditStoreError, match="not an elspeth-nb audit store"):
        AuditStore.open(tmp_path)


def _write_run(store: AuditStore, run_id: str) -> None:
    rec = Recorder(run_id, ParquetSegmentWriter(store.parquet_root, fsync=False))
    rec.runs(1.0, None, "c", "{}", None, "v", None, None, "running")
    rec.runs(1.0, 2.0, "c", "{}", None, "v", None, None, "completed", revision=1)
    rec.token_parents(2, 1, 0)
    rec.payloads("h", "{}")
    rec.close()


def test_duckdb_sync_is_idempotent_and_keeps_the_latest_run_revision(tmp_path: Path) -> None:
    store = AuditStore.create(tmp_path)
    _write_run(store, "r1")
    assert store.sync_duckdb(["r1"]).ok
    assert store.sync_duckdb(["r1"]).ok
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:
        assert con.execute("SELECT run_id, status, revision FROM runs").fetchall() == [("r1", "completed", 1)]
        assert con.execute("SELECT count(*) FROM token_parents").fetchone() == (1,)


def test_duckdb_sync_marks_runs_pending_while_another_process_holds_the_file(tmp_path: Path) -> None:
    store = AuditStore.create(tmp_path)
    _write_run(store, "r1")
    assert store.sync_duckdb(["r1"]).ok
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import duckdb, sys, time
            con = duckdb.connect({str(store.duckdb_path)!r})
            print("ready", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        result = store.sync_duckdb(["r1"], attempts=2, wait_s=0.01)
        assert not result.ok and result.pending == ["r1"]
        assert "held by another process" in result.message and "`elspeth-nb sync --audit" in result.message
        assert store.pending_runs() == ["r1"]
    finally:
        holder.communicate("\n", timeout=30)
    assert store.sync_duckdb([]).synced == ["r1"]
    assert store.pending_runs() == []


def test_rebuild_recreates_duckdb_from_parquet(tmp_path: Path) -> None:
    store = AuditStore.create(tmp_path)
    _write_run(store, "r1")
    _write_run(store, "r2")
    store.duckdb_path.write_bytes(b"garbage")
    result = store.rebuild_duckdb()
    assert sorted(result.synced) == ["r1", "r2"]
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (2,)



def test_a_run_with_a_segment_that_no_longer_reads_is_left_out_and_the_others_are_copied(tmp_path: Path) -> None:
    """One damaged pending run used to stop every later sync, rebuild and run with a DuckDB traceback."""
    store = AuditStore.create(tmp_path)
    _write_run(store, "r1")
    [segment] = (store.parquet_root / "token_parents" / "run_id=r1").glob("part-*.parquet")
    segment.write_bytes(segment.read_bytes()[:200])  # truncated: no footer
    _write_run(store, "r2")
    result = store.sync_duckdb(["r1", "r2"])
    assert result.synced == ["r2"] and result.pending == ["r1"] and not result.ok and not result.failed
    assert result.message.startswith("1 run(s) left out of audit.duckdb and kept pending, because a segment no "
                                     f"longer reads: run r1: {segment} does not read (")
    assert store.pending_runs() == ["r1"]
    _write_run(store, "r3")  # the next run's own update goes through
    assert store.update_duckdb(["r3"], True).synced == ["r3"]
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:  # r1 whole or not at all
        assert con.execute("SELECT DISTINCT run_id FROM token_parents ORDER BY 1").fetchall() == [("r2",), ("r3",)]
    rebuilt = store.rebuild_duckdb()
    assert rebuilt.synced == ["r2", "r3"] and rebuilt.pending == ["r1"] and store.pending_runs() == ["r1"]
    assert not list(tmp_path.glob(".audit.duckdb.rebuild*"))
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:
        assert con.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall() == [("r2",), ("r3",)]


def test_a_copy_that_fails_at_commit_is_reported_and_the_run_stays_pending(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed COMMIT ends the transaction itself; the error must still surface, never a silent success."""
    store = AuditStore.create(tmp_path)
    _write_run(store, "r1")
    assert store.sync_duckdb(["r1"]).ok
    _write_run(store, "r2")
    copy_table = AuditStore._copy_table

    def failing_commit(self: AuditStore, cursor: duckdb.DuckDBPyConnection, table: object, run_id: str) -> None:
        copy_table(self, cursor, table, run_id)  # type: ignore[arg-type]
        if getattr(table, "name", "") == "token_parents":
            cursor.execute("COMMIT")  # the transaction is gone, as after a commit that ran out of memory
            raise duckdb.OutOfMemoryException("failed to pin block")

    monkeypatch.setattr(AuditStore, "_copy_table", failing_commit)
    with pytest.raises(duckdb.OutOfMemoryException, match="failed to pin block"):
        store.sync_duckdb(["r2"])
    assert store.pending_runs() == ["r2"]
    with pytest.raises(duckdb.OutOfMemoryException):
        store.rebuild_duckdb()
    monkeypatch.undo()
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:  # the failed rebuild replaced nothing
        assert con.execute("SELECT count(*) FROM token_parents WHERE run_id = 'r1'").fetchone() == (1,)
    assert store.sync_duckdb([]).synced == ["r2"] and store.pending_runs() == []

def test_a_failing_background_write_surfaces_on_close(tmp_path: Path) -> None:
    class Broken(MemoryWriter):
        def write_segment(self, table, run_id, batch):  # type: ignore[no-untyped-def]
            raise OSError(28, "No space left on device")

    rec = Recorder("r", Broken())
    rec.token_parents(1, 0, 0)
    with pytest.raises(OSError, match="No space left"):
        rec.close()


def test_finish_batches_of_an_empty_table_has_the_file_schema() -> None:
    table = finish_batches(TABLES["tokens"], "r", 0.0, [])
    assert table.schema == TABLES["tokens"].file_schema and table.num_rows == 0


def test_a_record_torn_by_an_interrupt_is_dropped_and_the_whole_ones_are_written() -> None:
    """Ctrl-C can land between two column appends of a record; the records before it must still reach the store."""
    writer = MemoryWriter()
    rec = Recorder("run1", writer, background=False)
    rec.token_parents(2, 1, 0)
    rec.coalesce_events(*([None] * 33))  # a whole record, so the torn one below is not the only one
    parents, events = rec._tables["token_parents"], rec._tables["coalesce_events"]
    parents.appends[0](3)  # torn: token_id appended, parent and ordinal not
    for append, value in zip(events.appends[:13], [9, "n", "c", 1, "merged", "t", None, "p", "m", None, None, None,
                                                    ["a", "b"]], strict=True):
        append(value)  # torn inside the list columns: expected_branches added, branches_arrived not
    events.columns[13].values.append("a")  # ...and branches_arrived cut between its elements and its offset
    assert rec.pending_counts()["token_parents"] == rec.pending_counts()["coalesce_events"] == 1  # whole ones only
    try:
        rec.close()
    finally:
        writer.close()
    assert writer.table("token_parents").to_pylist() == [
        {"token_id": format_id("run1", "token", 2), "parent_token_id": format_id("run1", "token", 1), "ordinal": 0,
         "run_id": "run1"}]
    assert rec.records_written["token_parents"] == rec.records_written["coalesce_events"] == 1
    [event] = writer.table("coalesce_events").to_pylist()
    assert event["event_id"] is None and event["expected_branches"] == event["branches_arrived"] == []


def _create(root: str) -> str:
    try:
        AuditStore.create(root)
    except Exception as exc:  # reported to the test, which names it
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_runs_starting_together_on_a_new_store_all_create_it(tmp_path: Path) -> None:
    """Every process wrote the schema files under one temporary name: all but one rename found nothing; one
    could also find the new manifest and refuse the folder as 'holding other files'."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(6) as pool:
        for trial in range(10):
            root = str(tmp_path / f"store{trial}")
            assert pool.map(_create, [root] * 6) == ["ok"] * 6


def test_a_run_that_cannot_take_the_lock_leaves_the_holders_lock_file(tmp_path: Path) -> None:
    """The second writer removed the first one's lock file on its way out, so the live run looked dead."""
    store = AuditStore.create(tmp_path / "audit")
    with store.writing("r1"):
        with pytest.raises(BlockingIOError), store.writing("r1"):
            pass
        assert store.lock_path("r1").exists() and store.is_live("r1")
    assert not store.lock_path("r1").exists()
