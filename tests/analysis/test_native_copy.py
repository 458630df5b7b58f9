"""Finished runs answered from audit.duckdb: the same answers as from Parquet, and only while that copy is exact.

A store's helpers read a finished, synced run from audit.duckdb (faster for whole-run questions)
and everything else from the Parquet segments; these tests pin down both halves of that promise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from elspeth_nb.analysis import Audit, open_audit
from elspeth_nb.audit.schema import RUNS
from elspeth_nb.audit.store import AuditStore
from elspeth_nb.audit.writer import ParquetSegmentWriter
from elspeth_nb.engine.clock import FakeClock
from elspeth_nb.engine.runner import run_pipeline
from tests.analysis import raw
from tests.analysis.conftest import CASES, HASHES_ONLY, JITTER, Matrix
from tests.cases import fork_pipeline, write_csv

#: Every helper that may answer from audit.duckdb, reduced to DataFrames.
HELPERS: dict[str, Callable[[Audit, str], list[pl.DataFrame]]] = {
    "runs": lambda a, run: [a.runs()],
    "run_summary": lambda a, run: [pl.DataFrame([dict((s := a.run_summary(run)).header)]), s.nodes, s.outcomes,
                                   s.coalesce],
    "outcomes": lambda a, run: [a.outcomes(run, by=by) for by in ("outcome", "node", "sink", "branch")],
    "coalesce_events": lambda a, run: [a.coalesce_events(run), a.coalesce_events(run, include_late=True),
                                       a.coalesce_events(run, coalesce="merge3")],
    "merge_timings": lambda a, run: [a.merge_timings(run)],
    "merge_timing_summary": lambda a, run: [a.merge_timing_summary(run, by=by)
                                            for by in (("coalesce", "branch"), ("coalesce",), ("policy", "trigger"))],
    "policy_outcomes": lambda a, run: [a.policy_outcomes(run).to_polars()],
    "diff_runs": lambda a, run: [(d := a.diff_runs(run, "latest")).nodes, d.outcomes, d.decisions, d.timings],
}


def parquet_only(path: Path) -> Audit:
    audit = open_audit(path)
    assert audit._db.native is not None
    audit._db.native.close()
    audit._db.native = None
    return audit


@pytest.mark.parametrize("case", [*CASES, JITTER, HASHES_ONLY])
def test_audit_duckdb_gives_the_parquet_answers(matrix: Matrix, case: str) -> None:
    run = matrix.runs[case]
    with open_audit(matrix.store) as native, parquet_only(matrix.store) as parquet:
        for name, helper in HELPERS.items():
            before = native._db.native_answers
            for got, expected in zip(helper(native, run), helper(parquet, run), strict=True):
                assert_frame_equal(got, expected, check_exact=False, rel_tol=1e-12)
            assert native._db.native_answers > before, f"{name} did not read audit.duckdb"
        assert parquet._db.native_answers == 0


def _store(tmp_path: Path) -> tuple[AuditStore, str, int]:
    """A synced run with a lost branch: (store, run id, its number of coalesce decisions)."""
    pipeline = fork_pipeline(write_csv(tmp_path / "input.csv"), policy="quorum", quorum_count=2, lose_c_for="toys")
    result = run_pipeline(pipeline, clock=FakeClock())
    store = AuditStore.open(tmp_path / "audit")
    assert result.status == "completed" and not store.pending_runs()
    decisions = [e for e in raw.rows(store.root, "coalesce_events", result.run_id) if e["event_type"] != "late_arrival"]
    return store, result.run_id, len(decisions)


def _empty_the_copy(store: AuditStore, run: str) -> None:
    """Make audit.duckdb disagree with the segments: its coalesce events of ``run`` are gone."""
    with duckdb.connect(str(store.duckdb_path)) as con:
        con.execute("DELETE FROM coalesce_events WHERE run_id = $run", {"run": run})


def test_verify_compares_the_copy_the_helpers_read_with_the_segments(tmp_path: Path) -> None:
    """A copy edited by hand changed what the helpers showed while verify, reading the segments, said OK."""
    store, run, _ = _store(tmp_path)
    with open_audit(store.root) as audit:
        assert audit.verify(run).ok  # a fresh copy: no false finding
    with duckdb.connect(str(store.duckdb_path)) as con:
        con.execute("UPDATE node_states SET status = 'failed' WHERE run_id = $run AND state_id IN "
                    "(SELECT state_id FROM node_states WHERE run_id = $run AND status = 'completed' LIMIT 3)",
                    {"run": run})
        con.execute("UPDATE runs SET error_message = 'forged' WHERE run_id = $run", {"run": run})
    with open_audit(store.root) as audit:
        assert audit.run_summary(run).header["status"] == "completed"  # the helpers still read the copy
        verified = audit.verify(run)
        found = verified.mismatches.filter(pl.col("check") == "duckdb_copy")
        assert not verified.ok and verified.merkle == "verified"  # the segments themselves are intact
        assert sorted(found["table"]) == ["node_states", "runs"]
        assert all("`elspeth-nb rebuild` recreates it" in detail for detail in found["detail"])
    assert store.rebuild_duckdb().ok
    with open_audit(store.root) as audit:
        assert audit.verify(run).ok


def test_the_copy_is_read_only_while_it_holds_the_run_as_on_disk(tmp_path: Path) -> None:
    store, run, decisions = _store(tmp_path)
    _empty_the_copy(store, run)  # what each answer comes from is now visible in it
    with open_audit(store.root) as audit:
        assert audit.coalesce_events(run).height == 0  # synced, finished, same revision: the copy answers
        store.mark_pending(run)
        assert audit.coalesce_events(run).height == decisions  # pending: the segments answer
        (store.pending_dir() / run).unlink()
        assert audit.coalesce_events(run).height == 0

        latest = max(raw.rows(store.root, "runs", run), key=lambda r: r["revision"])
        newer = {k: v for k, v in latest.items() if k != "run_id"} | {"revision": latest["revision"] + 1}
        writer = ParquetSegmentWriter(store.parquet_root, fsync=False)
        writer.write_segment(RUNS, run, pa.Table.from_pylist([newer], schema=RUNS.file_schema))
        writer.close()
        assert audit.coalesce_events(run).height == decisions  # a revision the copy lacks: the segments answer
        assert audit.runs()["merged"][0] + audit.runs()["coalesce_failed"][0] == decisions


def test_a_segment_rewritten_by_hand_sends_reads_to_the_segments(tmp_path: Path) -> None:
    store, run, decisions = _store(tmp_path)
    _empty_the_copy(store, run)
    with open_audit(store.root) as audit:
        assert audit.coalesce_events(run).height == 0  # the copy answers while the files are the ones copied
    [segment] = (store.parquet_root / "coalesce_events" / f"run_id={run}").glob("part-*.parquet")
    table = pq.read_table(segment)
    first_decision = table.column("event_type").to_pylist().index("merged")
    kept = [i for i in range(table.num_rows) if i != first_decision]
    pq.write_table(table.take(kept), segment)  # one decision less; same revision, no pending marker
    with open_audit(store.root) as audit:
        assert audit.coalesce_events(run).height == decisions - 1
        assert audit.sql("SELECT count(*) FROM coalesce_events WHERE run_id = $run AND event_type <> 'late_arrival'",
                         {"run": run}).rows() == [(decisions - 1,)]
        assert audit._db.native_answers == 0
    store.sync_duckdb([run])  # copied again: the copy is trusted again
    with open_audit(store.root) as audit:
        assert audit.coalesce_events(run).height == decisions - 1
        assert audit._db.native_answers > 0


def test_runs_copied_before_copies_were_listed_are_listed_at_the_next_sync(tmp_path: Path) -> None:
    store, run, decisions = _store(tmp_path)
    with duckdb.connect(str(store.duckdb_path)) as con:  # an audit.duckdb written before the list existed
        con.execute("DROP TABLE enb_copied_segments")
    with open_audit(store.root) as audit:
        assert audit.coalesce_events(run).height == decisions and audit._db.native_answers == 0
    store.sync_duckdb([])  # any later sync (another run's) lists it: same revision, not pending
    with open_audit(store.root) as audit:
        assert audit.coalesce_events(run).height == decisions and audit._db.native_answers > 0


def test_a_sync_after_audit_duckdb_was_deleted_copies_every_run_again(tmp_path: Path) -> None:
    store, run, decisions = _store(tmp_path)
    store.duckdb_path.unlink()
    result = store.sync_duckdb([])
    assert result.ok and result.synced == [run]
    with open_audit(store.duckdb_path) as audit:
        assert audit.coalesce_events(run).height == decisions


def test_a_sync_into_a_damaged_audit_duckdb_fails_and_says_rebuild(tmp_path: Path) -> None:
    store, run, _ = _store(tmp_path)
    store.duckdb_path.write_bytes(b"not a database at all" * 1000)
    result = store.sync_duckdb([run])
    assert not result.ok and result.failed and result.pending == [run]
    assert "cannot be opened or written" in result.message and "elspeth-nb rebuild" in result.message
    assert store.pending_runs() == [run]
    assert store.rebuild_duckdb().synced == [run] and store.sync_duckdb([]).ok


HOLD_FOR_WRITING = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
sys.stdin.readline()
con.close()
"""


def _eventually(condition: Callable[[], bool], within_s: float = 10.0) -> bool:
    """Whether ``condition`` becomes true within ``within_s`` (timers may fire late on a loaded machine)."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_writer_holding_the_copy_sends_reads_to_the_segments(tmp_path: Path) -> None:
    store, run, decisions = _store(tmp_path)
    _empty_the_copy(store, run)
    with subprocess.Popen([sys.executable, "-c", HOLD_FOR_WRITING, str(store.duckdb_path)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        try:
            with open_audit(store.root) as audit:
                assert audit.coalesce_events(run).height == decisions
                assert audit._db.native_answers == 0
        finally:
            holder.communicate("\n", timeout=30)


SYNC = """
import sys
from elspeth_nb.audit.store import AuditStore
result = AuditStore.open(sys.argv[1]).sync_duckdb([sys.argv[2]])
print("synced" if result.ok else result.message, flush=True)
"""


def test_an_open_audit_lets_go_of_the_copy_so_syncs_get_through(tmp_path: Path) -> None:
    store, run, decisions = _store(tmp_path)
    with open_audit(store.root) as audit:
        audit._db.native.idle_s = 0.5
        assert audit.policy_outcomes(run).results["count"].sum() == decisions
        assert audit._db.native_answers == 2  # whether a decision went ahead without a branch, then the outcomes
        assert _eventually(lambda: not audit._db.native.is_open)

        audit.policy_outcomes(run)  # held again: another process's sync waits for the release, then writes
        assert audit._db.native.is_open
        other = subprocess.run([sys.executable, "-c", SYNC, str(store.root), run], capture_output=True, text=True,
                               timeout=60, check=True)
        assert other.stdout.strip() == "synced", other.stdout + other.stderr

        audit.policy_outcomes(run)  # in this process the sync asks the audit to let go at once
        assert audit._db.native.is_open
        assert store.sync_duckdb([run], attempts=1).ok
        answers = audit._db.native_answers
        assert audit.policy_outcomes(run).results["count"].sum() == decisions
        assert audit._db.native_answers == answers + 2


def test_a_run_in_the_same_process_syncs_while_an_audit_reads_its_store(tmp_path: Path) -> None:
    store, _, _ = _store(tmp_path)
    pipeline: dict[str, Any] = fork_pipeline(tmp_path / "input.csv")
    with open_audit(store.root) as audit:
        audit.runs()
        assert audit._db.native.is_open
        second = run_pipeline(pipeline, clock=FakeClock())
        assert second.status == "completed" and not store.pending_runs()
        audit.refresh()
        assert audit.runs()["run_id"].to_list()[0] == second.run_id


def test_a_waiting_sync_makes_readers_let_go_at_their_next_query(tmp_path: Path) -> None:
    store, run, decisions = _store(tmp_path)
    _empty_the_copy(store, run)
    with open_audit(store.root) as audit:
        assert audit.coalesce_events(run).height == 0
        assert audit._db.native.is_open
        store.sync_waiting_path().touch()  # what a sync in another process leaves while the file is held
        assert audit.coalesce_events(run).height == decisions
        assert not audit._db.native.is_open
        old = time.time() - 3600  # a sync that died while waiting: its marker no longer counts
        os.utime(store.sync_waiting_path(), (old, old))
        assert audit.coalesce_events(run).height == 0


EXIT_HOLDING = """
import sys
import elspeth_nb as enb
audit = enb.open_audit(sys.argv[1])
timings = audit.merge_timings()
svg = enb.charts.to_svg(enb.charts.wait_time_ecdf(timings))
audit.merge_timings()  # again after the chart, which can take over the 1 s hold on a busy machine
print(audit._db.native_answers > 0, audit._db.native.is_open, svg.startswith("<svg"), flush=True)
"""


def test_a_script_that_exits_while_the_copy_is_held_exits_cleanly(tmp_path: Path) -> None:
    """The idle connection used to be torn down with the interpreter and abort it (SIGABRT) after an SVG chart."""
    store, _, _ = _store(tmp_path)
    done = subprocess.run([sys.executable, "-c", EXIT_HOLDING, str(store.root)], check=False, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True", "True"]  # answered from the copy, still held at exit
