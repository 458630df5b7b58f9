"""A sharded run writes the same sink bytes and the same trail content as a single-process run."""

from __future__ import annotations

import csv
import hashlib
import random
import re
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from elspeth_nb.analysis import open_audit
from elspeth_nb.audit.schema import TABLES
from elspeth_nb.audit.store import AuditStore
from elspeth_nb.engine.plugins.sinks import JsonlSink
from elspeth_nb.engine.runner import RunFailedError, run_pipeline
from tests.cases import fork_pipeline


def _input(path: Path, rows: int) -> Path:
    rng = random.Random(7)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "category", "amount", "note"])
        for i in range(rows):
            writer.writerow([i, rng.choice(["books", "toys", "garden"]), rng.randint(1, 999),
                             "a note " * rng.randint(1, 3)])
        writer.writerow([rows, "books", "not a number", "quarantined"])
    return path


def _run(tmp_path: Path, workers: int, sink_plugin: str = "jsonl") -> tuple[Any, Path]:
    folder = tmp_path / f"w{workers}"
    folder.mkdir()
    pipeline = fork_pipeline(_input(folder / "in.csv", 1500), policy="best_effort", timeout_seconds=1.0,
                             lose_c_for="toys")
    if sink_plugin != "jsonl":
        pipeline["sinks"]["output"] = {"plugin": sink_plugin, "options": {"path": str(folder / "output.jsonl")}}
    return run_pipeline(pipeline, workers=workers), folder


@pytest.mark.parametrize("sink_plugin", ["jsonl", "json"])
def test_two_workers_write_what_one_writes(tmp_path: Path, sink_plugin: str) -> None:
    one, folder_one = _run(tmp_path, 1, sink_plugin)
    two, folder_two = _run(tmp_path, 2, sink_plugin)
    assert two.workers == 2 and one.workers == 1
    assert (folder_two / "output.jsonl").read_bytes() == (folder_one / "output.jsonl").read_bytes()
    assert not list(folder_two.glob("output.jsonl.part*"))
    assert (two.rows, two.quarantined, dict(two.outcomes), two.coalesce) == \
        (one.rows, one.quarantined, dict(one.outcomes), one.coalesce)
    per_run = ("edges", "nodes", "runs", "operations", "payloads")  # workers may each store a shared payload
    assert {t: n for t, n in two.counts.items() if t not in per_run} == \
        {t: n for t, n in one.counts.items() if t not in per_run}
    with duckdb.connect(str(folder_two / "audit" / "audit.duckdb"), read_only=True) as con:
        for table in ("tokens", "node_states", "token_outcomes", "rows"):
            key = TABLES[table].key[0]
            total, distinct = con.execute(f"SELECT count(*), count(DISTINCT {key}) FROM {table}").fetchone()
            assert total == distinct > 0
        assert con.execute("SELECT count(DISTINCT row_index), min(row_index), max(row_index) FROM rows").fetchone() \
            == (1501, 0, 1500)
        assert con.execute("SELECT count(*) FROM payloads").fetchone() == (one.counts["payloads"],)
        [(artifact_hash,)] = con.execute("SELECT content_hash FROM artifacts").fetchall()
    assert artifact_hash == hashlib.sha256((folder_two / "output.jsonl").read_bytes()).hexdigest()


def test_parquet_and_duckdb_hold_the_same_rows(tmp_path: Path) -> None:
    result, folder = _run(tmp_path, 2)
    store = AuditStore.open(folder / "audit")
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:
        for table in TABLES.values():
            files = sorted((store.parquet_root / table.name / f"run_id={result.run_id}").glob("part-*.parquet"))
            parquet_rows = [r for f in files for r in pq.read_table(f).to_pylist()]
            for row in parquet_rows:
                row["run_id"] = result.run_id
            if table.name == "runs":
                parquet_rows = [max(parquet_rows, key=lambda r: r["revision"])]
            if table.name == "payloads":
                parquet_rows = list({r["payload_hash"]: r for r in parquet_rows}.values())
            cursor = con.execute(f"SELECT {', '.join(table.columns)} FROM {table.name} WHERE run_id = ?",
                                 [result.run_id])
            names = [d[0] for d in cursor.description]
            duck_rows = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
            def key(row: dict[str, Any], columns: tuple[str, ...] = table.key) -> tuple[str, ...]:
                return tuple(str(row[c]) for c in columns)

            assert sorted(duck_rows, key=key) == sorted(parquet_rows, key=key), table.name


@pytest.mark.parametrize("sink_plugin", ["csv", "parquet"])
def test_a_sink_whose_first_row_fixes_its_columns_runs_in_one_process(tmp_path: Path, sink_plugin: str) -> None:
    """Parts would each take their header or schema from their own first row, so one writer writes the file."""
    result, _ = _run(tmp_path, 2, sink_plugin)
    assert result.workers == 1 and result.status == "completed"


def test_a_sink_failing_in_a_worker_fails_the_run_and_keeps_the_trail(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's records are all stored, the run is failed naming the sink, and no artifact claims its file."""
    def broken(sink: JsonlSink) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(JsonlSink, "flush", broken)
    with pytest.raises(RunFailedError) as failed:
        _run(tmp_path, 2)
    result, folder = failed.value.result, tmp_path / "w2"
    assert result.workers == 2 and result.status == "failed"
    assert re.fullmatch(r"worker \d: SinkFailedError: sink 'output' \(\S+/output\.jsonl\.part\d\): close failed: "
                        r"OSError: \[Errno 28\] No space left on device", result.error or "")
    assert not list(folder.glob("output.jsonl*"))
    with open_audit(folder / "audit") as audit:
        assert audit.check(result.run_id).ok
        [(status, rows, artifacts)] = audit.sql(
            "SELECT status, (SELECT count(*) FROM rows WHERE run_id = $run), (SELECT count(*) FROM artifacts "
            "WHERE run_id = $run) FROM runs WHERE run_id = $run", {"run": result.run_id}).rows()
    assert (status, rows, artifacts) == ("failed", 1501, 0)
