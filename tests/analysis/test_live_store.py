"""Reading a store while a run writes it: counts grow, a dead writer's run reads as interrupted."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from elspeth_nb.analysis import open_audit
from elspeth_nb.analysis.integrity import INVARIANTS
from elspeth_nb.audit.recorder import Recorder
from elspeth_nb.audit.schema import CANONICAL_VERSION
from elspeth_nb.audit.store import AuditStore
from elspeth_nb.audit.writer import ParquetSegmentWriter
from elspeth_nb.engine.clock import FakeClock
from elspeth_nb.engine.runner import RunResult, run_pipeline
from tests.analysis import raw
from tests.cases import fork_pipeline, write_csv

RUN = "feedc0ffee0011223344556677889900"


def _start(rec: Recorder) -> None:
    rec.runs(0.0, None, "cfg", "{}", None, CANONICAL_VERSION, None, None, "running", revision=0,
             producer="elspeth-nb test", payload_mode="hashes")
    rec.nodes("src", "csv", "source", "1", "deterministic", "h", "{}", None, 0, 0.0, None, None, None, None, "source")


def _row(rec: Recorder, i: int) -> None:
    rec.rows(i, "src", i, f"hash{i}", None, float(i))
    rec.tokens(i, i, None, None, None, None, None, float(i))
    rec.node_states(i, i, "src", 0, 0, "completed", f"hash{i}", f"hash{i}", None, None, 0.0, None, None, float(i),
                    float(i))


def test_segments_show_up_as_they_land_and_a_dead_writer_reads_interrupted(tmp_path: Path) -> None:
    store = AuditStore.create(tmp_path / "audit")
    writer = ParquetSegmentWriter(store.parquet_root, fsync=False)
    with store.writing(RUN):
        rec = Recorder(RUN, writer, time_offset=FakeClock.EPOCH, background=False)
        _start(rec)
        rec.flush()
        audit = open_audit(store.root)
        seen = [audit.runs().select("status", "rows", "tokens").row(0)]
        for i in range(3):
            _row(rec, i)
            rec.flush()
            audit.refresh()
            seen.append(audit.runs().select("status", "rows", "tokens").row(0))
        assert seen == [("running", 0, 0), ("running", 1, 1), ("running", 2, 2), ("running", 3, 3)]
        _row(rec, 3)
        rec.flush()
        assert audit.run_summary("latest").header["rows"] == 4  # a new segment is read without refresh()
        check = audit.check(RUN)
        assert check.status == "running"
        assert check.ok  # tokens in flight are no violation while the run is live
    # the writer is gone without a final revision
    assert audit.runs()["status"].to_list() == ["interrupted"]
    assert raw.latest_run(store.root, RUN)["status"] == "running"  # reading wrote nothing
    stopped = audit.check(RUN)  # the 4 tokens in flight when it stopped are where its trail ends, not violations
    assert stopped.status == "interrupted" and stopped.partial and stopped.ok
    skipped = stopped.to_polars().filter(stopped.to_polars()["invariant"] == "token_has_outcome")["detail"]
    assert skipped.to_list() == [
        "not a violation: skipped because the run was interrupted, so its trail ends where it stopped; "
        + INVARIANTS["token_has_outcome"].note]
    marked = open_audit(store.root, mark_interrupted=True)
    latest = raw.latest_run(store.root, RUN)
    assert (latest["status"], latest["revision"]) == ("interrupted", 1)
    assert "open_audit(mark_interrupted=True)" in latest["error_message"]
    assert marked.runs()["status"].to_list() == ["interrupted"]


def test_verify_of_an_unfinished_run_is_no_clean_pass(tmp_path: Path) -> None:
    store = AuditStore.create(tmp_path / "audit")
    with store.writing(RUN):
        rec = Recorder(RUN, ParquetSegmentWriter(store.parquet_root, fsync=False), time_offset=FakeClock.EPOCH,
                       background=False)
        _start(rec)
        _row(rec, 0)
        rec.flush()
        audit = open_audit(store.root)
        running = audit.verify(RUN)
        assert running.merkle == "not sealed: run still being written"
        assert running.mismatches.height == 0 and not running.sealed and not running.ok
        assert repr(running) == (f"Verify run {RUN}: INCOMPLETE, not sealed: run still being written; 0 mismatch(es) "
                                 f"in what could be checked so far (0 payloads, 0 source_rows, 0 artifacts, 0 lines)")
        assert "OK" not in running._repr_html_()
    interrupted = audit.verify(RUN)
    assert (interrupted.merkle, interrupted.ok) == ("not sealed: run interrupted", False)
    assert "INCOMPLETE, not sealed: run interrupted" in repr(interrupted)


def test_a_real_run_is_visible_while_it_runs(tmp_path: Path) -> None:
    rows = [{"id": i, "category": "books", "amount": i, "note": f"n{i}"} for i in range(16)]
    pipeline = fork_pipeline(write_csv(tmp_path / "input.csv", rows), slow={"b": 60})  # about 1 s of calls
    AuditStore.create(tmp_path / "audit")
    audit = open_audit(tmp_path / "audit")
    results: list[RunResult] = []
    worker = threading.Thread(target=lambda: results.append(
        run_pipeline(pipeline, audit=tmp_path / "audit", max_in_flight=1, flush_interval_s=0.3)))
    worker.start()
    seen = []
    held_while_running: list[int | None] = []
    deadline = time.monotonic() + 30
    while worker.is_alive() and time.monotonic() < deadline:
        audit.refresh()
        runs = audit.runs()
        if runs.height:
            seen.append(runs.select("status", "rows").row(0))
            if seen[-1][0] == "running" and not held_while_running:  # joins held now are recorded nowhere yet
                held_while_running = audit.run_summary().coalesce.get_column("held_when_run_stopped").to_list()
        time.sleep(0.05)
    worker.join()
    [result] = results
    audit.refresh()
    assert audit.runs().select("status", "rows").row(0) == ("completed", 16)
    growing = [rows for status, rows in seen if status == "running"]
    assert any(0 < n < 16 for n in growing), seen
    assert held_while_running == [None]  # unknown while running, never a false 0
    assert growing == sorted(growing)
    assert audit.check(result.run_id).ok


def test_a_live_run_is_not_marked_interrupted(tmp_path: Path) -> None:
    store = AuditStore.create(tmp_path / "audit")
    with store.writing(RUN):
        _record_start(store, RUN)
        open_audit(store.root, mark_interrupted=True)
        assert raw.latest_run(store.root, RUN)["status"] == "running"
        assert open_audit(store.root).runs()["status"].to_list() == ["running"]


def _record_start(store: AuditStore, run_id: str) -> None:
    """The run's first ``runs`` and ``nodes`` segments, as a writer holding its lock leaves them."""
    rec = Recorder(run_id, ParquetSegmentWriter(store.parquet_root, fsync=False), background=False)
    _start(rec)
    rec.flush()


def _unfinished_segment(store: AuditStore, table: str, run_id: str, part: int) -> Path:
    """A segment file still under its temporary name, as a writer killed mid-write leaves it."""
    path = store.parquet_root / table / f"run_id={run_id}" / f".part-{part:06d}.parquet.tmp"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1 half a footer")
    return path


def test_unfinished_segments_of_dead_writers_are_removed_and_those_of_live_ones_kept(tmp_path: Path) -> None:
    store = AuditStore.create(tmp_path / "audit")
    dead_early, dead_late, live = "dead0" * 6 + "00", "dead1" * 6 + "11", RUN
    early = _unfinished_segment(store, "runs", dead_early, 0)  # killed before any runs row was visible
    store.lock_path(dead_early).parent.mkdir(parents=True, exist_ok=True)
    store.lock_path(dead_early).write_text("4242\n")  # the lock file a dead process leaves, no longer held
    with store.writing(dead_late):
        _record_start(store, dead_late)
    late = _unfinished_segment(store, "tokens", dead_late, 1)
    with store.writing(live):
        _record_start(store, live)
        in_flight = _unfinished_segment(store, "rows", live, 1)
        audit = open_audit(store.root, mark_interrupted=True)
        assert in_flight.exists()  # a live writer's file is about to be renamed into place
        assert not early.exists() and not early.parent.exists()
        assert not late.exists() and not late.parent.exists()
        assert (store.parquet_root / "runs" / f"run_id={dead_late}").is_dir()  # visible segments stay
        statuses = dict(audit.runs().select("run_id", "status").iter_rows())
    assert statuses == {dead_late: "interrupted", live: "running"}
