"""A run killed at any moment (SIGKILL) leaves a store that opens, whose completed runs still verify,
in which no partial Parquet file is visible and the interrupted run is flagged; audit.duckdb is
rebuilt from the Parquet with one call. A reader in another process sees a running pipeline grow.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from elspeth_nb.audit.store import AuditStore, interrupted_runs, latest_run_rows, mark_interrupted
from elspeth_nb.audit.verification import verify_run
from elspeth_nb.engine.runner import run_pipeline
from tests.cases import fork_pipeline, write_csv

ROOT = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent("""
    import json, sys
    from elspeth_nb.engine.runner import run_pipeline
    pipeline = json.loads(sys.argv[1])
    print("started", flush=True)
    run_pipeline(pipeline, segment_rows=300, flush_interval_s=0.05, max_in_flight=64)
""")


def _slow_pipeline(folder: Path, rows: int = 400) -> dict[str, object]:
    source = folder / "in.csv"
    lines = ["id,category,amount,note"] + [f"{i},{'toys' if i % 7 == 0 else 'books'},{i},note {i}" for i in range(rows)]
    source.write_text("\n".join(lines) + "\n")
    pipeline = fork_pipeline(source, policy="best_effort", timeout_seconds=0.05, lose_c_for="toys",
                             slow={"b": 20, "c": 70})
    pipeline["engine"] = {"max_in_flight": 64}
    return pipeline


def _start(pipeline: dict[str, object]) -> subprocess.Popen[str]:
    import json

    process = subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(pipeline)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout is not None and process.stdout.readline().strip() == "started"
    return process


def _visible_segments_readable(store: AuditStore) -> int:
    files = list(store.parquet_root.glob("*/run_id=*/part-*.parquet"))
    for path in files:
        pq.read_metadata(path)  # a partial file would not have a footer
    return len(files)


def test_sigkill_at_random_points_never_damages_the_store(tmp_path: Path) -> None:
    rng = random.Random(20261125)
    pipeline = _slow_pipeline(tmp_path, rows=1200)  # a few seconds per run: every kill lands mid-run
    completed = run_pipeline(pipeline)  # a finished run that every crash must leave intact
    store = AuditStore.open(tmp_path / "audit")
    killed = []
    for _ in range(20):
        process = _start(pipeline)
        time.sleep(rng.uniform(0.05, 1.6))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        killed.append(process.returncode)
        store = AuditStore.open(tmp_path / "audit")
        assert _visible_segments_readable(store) > 0
        assert verify_run(store, completed.run_id).ok
    assert killed.count(-signal.SIGKILL) >= 18 and set(killed) <= {-signal.SIGKILL, 0}
    # a last kill once the run is visibly running, so at least one dead run is left to find whatever the
    # random kills hit (each start marks the dead runs before it interrupted, and a kill may land first)
    known = set(latest_run_rows(store))
    process = _start(pipeline)
    deadline = time.monotonic() + 60
    while not set(latest_run_rows(store)) - known and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    stale = interrupted_runs(store)
    runs = latest_run_rows(store)
    assert stale and all(runs[r]["status"] == "running" for r in stale)
    assert completed.run_id not in stale
    assert sorted(mark_interrupted(store, found_by="the test")) == sorted(stale)
    assert {latest_run_rows(store)[r]["status"] for r in stale} == {"interrupted"}
    for run_id in stale:  # found dead, never sealed: unsealed, not a seal someone removed
        assert {f.kind for f in verify_run(store, run_id).findings} <= {"no_digests"}
    assert not list(store.parquet_root.glob("*/run_id=*/.part-*.tmp"))  # leftovers of killed writers cleaned
    rebuilt = store.rebuild_duckdb()
    assert completed.run_id in rebuilt.synced
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:
        statuses = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
    assert statuses[completed.run_id] == "completed"
    assert {statuses[r] for r in stale} == {"interrupted"}


def test_a_reader_in_another_process_sees_a_running_pipeline_grow(tmp_path: Path) -> None:
    pipeline = _slow_pipeline(tmp_path, rows=600)
    stop = tmp_path / "stop-reading"
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import pathlib, sys, time, duckdb
        glob, stop = sys.argv[1], pathlib.Path(sys.argv[2])
        con = duckdb.connect()
        print("reading", flush=True)
        while not stop.exists():
            try:
                print(con.execute("SELECT count(*) FROM read_parquet(?)", [glob]).fetchone()[0], flush=True)
            except duckdb.IOException:  # no segment yet
                print(0, flush=True)
            time.sleep(0.02)
    """), str(tmp_path / "audit" / "parquet" / "node_states" / "run_id=*" / "part-*.parquet"), str(stop)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
    process = _start(pipeline)
    try:
        _, errors = process.communicate(timeout=120)
    finally:
        stop.touch()
        out, reader_errors = reader.communicate(timeout=60)
    assert process.returncode == 0, errors
    assert reader.returncode == 0, reader_errors
    counts = [int(line) for line in out.split()]
    growing = sorted(set(counts))
    assert counts == sorted(counts)  # segments only ever appear, never vanish or shrink
    assert len(growing) >= 3 and 0 < growing[1] < growing[-1]  # seen part-way, more than once


def test_the_end_of_run_duckdb_update_survives_a_reader_holding_the_file(tmp_path: Path) -> None:
    pipeline = fork_pipeline(write_csv(tmp_path / "in.csv"))
    first = run_pipeline(pipeline)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, sys
        con = duckdb.connect({str(tmp_path / 'audit' / 'audit.duckdb')!r}, read_only=True)
        print("ready", flush=True)
        sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        second = run_pipeline(pipeline)
        assert second.status == "completed"
        assert "held by another process" in second.duckdb and "pending" in second.duckdb
    finally:
        holder.communicate("\n", timeout=30)
    store = AuditStore.open(tmp_path / "audit")
    assert store.pending_runs() == [second.run_id]
    assert store.sync_duckdb([]).ok
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:
        assert {r for (r,) in con.execute("SELECT run_id FROM runs").fetchall()} == {first.run_id, second.run_id}


def test_background_duckdb_update_finishes_on_its_own(tmp_path: Path) -> None:
    result = run_pipeline(fork_pipeline(write_csv(tmp_path / "in.csv")), sync_duckdb="background")
    assert "background" in result.duckdb
    store = AuditStore.open(tmp_path / "audit")
    deadline = time.monotonic() + 60
    while store.pending_runs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.pending_runs() == []
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:
        assert con.execute("SELECT run_id FROM runs").fetchall() == [(result.run_id,)]


def test_a_run_that_leaves_duckdb_for_later_is_pending_until_the_next_sync(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(ValueError, match="sync_duckdb: expected True, False or 'background', got 'soon'"):
        run_pipeline(fork_pipeline(write_csv(tmp_path / "in.csv")), sync_duckdb="soon")
    assert not (tmp_path / "audit").exists()  # refused before anything was written
    result = run_pipeline(fork_pipeline(write_csv(tmp_path / "in.csv")), sync_duckdb=False)
    store = AuditStore.open(tmp_path / "audit")
    assert store.pending_runs() == [result.run_id] and "pending" in result.duckdb and result.duckdb_s == 0
    assert "audit.duckdb: not updated" in repr(result)
    assert store.sync_duckdb([]).synced == [result.run_id] and store.pending_runs() == []
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:
        assert con.execute("SELECT run_id FROM runs").fetchall() == [(result.run_id,)]
