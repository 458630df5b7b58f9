"""A sharded run writes the same sink bytes and the same trail content as a single-process run."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import signal
import subprocess
import sys
import time
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

ROOT = Path(__file__).resolve().parents[2]


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
    assert re.fullmatch(r"worker \d: SinkFailedError: sink 'output' \(\S+/output\.jsonl \(worker \d's part\)\): "
                        r"close failed: OSError: \[Errno 28\] No space left on device", result.error or "")
    assert (folder / "output.jsonl").read_bytes() == b""  # nothing reached it, as in one process
    assert not list(folder.glob(".output.jsonl.*"))
    with open_audit(folder / "audit") as audit:
        assert audit.check(result.run_id).ok
        [(status, rows, artifacts)] = audit.sql(
            "SELECT status, (SELECT count(*) FROM rows WHERE run_id = $run), (SELECT count(*) FROM artifacts "
            "WHERE run_id = $run) FROM runs WHERE run_id = $run", {"run": result.run_id}).rows()
    assert (status, rows, artifacts) == ("failed", 1501, 0)


# -- a sharded run that stops early: the parent stops every worker, and the trail accounts for every token ----
CHECK = """
import multiprocessing, os, signal, time

def check(row):
    shard = multiprocessing.current_process().name
    if shard == "elspeth-nb-shard-0" and row["id"] == {trigger}:
        {action}
    if {slow}:
        time.sleep({pause})
    return row
"""


def _stopping(folder: Path, *, trigger: int = -1, action: str = "pass", slow: str = 'shard.endswith("-1")',
              pause: float = 0.0, rows: int = 3000) -> dict[str, Any]:
    """fork_pipeline with a python ``check`` at the head of branch b that can kill, exit or slow a worker."""
    folder.mkdir(exist_ok=True)
    (folder / "check.py").write_text(CHECK.format(trigger=trigger, action=action, slow=slow, pause=pause))
    pipeline = fork_pipeline(_input(folder / "in.csv", rows), policy="require_all")
    b_first = next(t for t in pipeline["transforms"] if t["input"] == "b")
    b_first["input"] = "b_checked"
    pipeline["transforms"].append({"name": "b_check", "plugin": "python", "input": "b", "on_success": "b_checked",
                                   "options": {"function": f"{folder / 'check.py'}:check"}})
    return pipeline


def _trail(folder: Path, run_id: str) -> dict[str, Any]:
    with open_audit(folder / "audit") as audit:
        return {
            "check": audit.check(run_id), "verify": audit.verify(run_id),
            "header": audit.sql("SELECT status, counts_json, (SELECT count(*) FROM rows WHERE run_id = $run) AS rows, "
                                "(SELECT count(*) FROM artifacts WHERE run_id = $run) AS artifacts FROM runs "
                                "WHERE run_id = $run", {"run": run_id}).row(0, named=True),
            "stopped_tokens": audit.sql(
                "SELECT count(*) AS n FROM token_outcomes WHERE run_id = $run AND "
                "context_json LIKE '%stopped because another worker%'", {"run": run_id})["n"][0],
            "unfinished_tokens": audit.sql(
                "SELECT count(*) AS n FROM tokens t WHERE run_id = $run AND NOT EXISTS (SELECT 1 FROM token_outcomes o "
                "WHERE o.run_id = t.run_id AND o.token_id = t.token_id AND o.is_terminal = 1)",
                {"run": run_id})["n"][0],
        }


def test_a_worker_that_dies_leaves_an_interrupted_run_whose_root_covers_what_it_wrote(tmp_path: Path) -> None:
    folder = tmp_path / "killed"
    pipeline = _stopping(folder, trigger=1200, action="os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(RunFailedError) as failed:  # not a KeyboardInterrupt: nobody interrupted the run
        run_pipeline(pipeline, workers=2, segment_rows=2_000)
    result = failed.value.result
    assert result.status == "interrupted" and result.artifacts == ()
    assert re.match(r"worker 0: the worker was killed by SIGKILL before reporting: the records it had not yet "
                    r"written are lost", result.error or ""), result.error
    trail = _trail(folder, result.run_id)
    assert trail["check"].ok, trail["check"]  # interrupted: checked as far as its trail goes
    verified = trail["verify"]
    assert verified.mismatches.height == 0, verified.mismatches  # the dead worker's segments are in the root
    header = trail["header"]
    assert header["status"] == "interrupted" and header["artifacts"] == 0
    counts = json.loads(header["counts_json"])
    assert counts["rows"] == header["rows"]  # what worker 0 flushed counts too
    with open_audit(folder / "audit") as audit:
        adopted = audit.sql("SELECT count(*) AS n, sum(record_count) AS records FROM segment_digests "
                            "WHERE run_id = $run AND part_file LIKE 'part-w0-%'", {"run": result.run_id}).row(0)
        params = {"run": result.run_id}
        stored_outcomes = dict(audit.sql("SELECT outcome, count(*) FROM token_outcomes WHERE run_id = $run "
                                         "GROUP BY outcome", params).rows())
        stored_decisions = dict(audit.sql("SELECT event_type, count(*) FROM coalesce_events WHERE run_id = $run "
                                          "GROUP BY event_type", params).rows())
    assert counts["outcomes"] == stored_outcomes  # worker 0's flushed outcomes are counted, not only worker 1's
    [decided] = counts["coalesce"].values()
    assert {k: v for k, v in decided.items() if v} == {
        "late_arrivals" if k == "late_arrival" else k: v for k, v in stored_decisions.items()}
    assert adopted[0] > 0 and adopted[1] > 0  # the dead worker's segments, digested by the parent
    assert not list(folder.glob(".output.jsonl.*"))  # parts joined into output.jsonl, not left behind


def test_a_worker_that_fails_stops_the_others_between_rows(tmp_path: Path) -> None:
    folder = tmp_path / "failed"
    pipeline = _stopping(folder, trigger=300, action="raise SystemExit(3)", pause=0.002)  # worker 1: >= 3 s
    with pytest.raises(RunFailedError) as failed:
        run_pipeline(pipeline, workers=2)
    result = failed.value.result
    assert result.status == "failed" and result.error == "worker 0: SystemExit: 3"  # the cause, not the stop
    trail = _trail(folder, result.run_id)
    assert trail["check"].ok, trail["check"]
    assert trail["header"]["rows"] < 301 + 1501 - 500  # worker 1 stopped well before the end of its range
    # it stopped before its next row, with its earlier rows done: no token was in flight, every one has its outcome
    assert trail["stopped_tokens"] == 0 and trail["unfinished_tokens"] == 0
    assert trail["header"]["artifacts"] == 1  # output closed cleanly in both workers: what they wrote is there
    lines = (folder / "output.jsonl").read_bytes().count(b"\n")
    with open_audit(folder / "audit") as audit:
        assert audit.sql("SELECT row_count FROM artifacts WHERE run_id = $run", {"run": result.run_id}).item() == lines


def test_part_files_never_clash_with_another_sinks_file(tmp_path: Path) -> None:
    """A sink named like another's old part name (<path>.part0) used to be overwritten while joining."""
    folder = tmp_path / "clash"
    folder.mkdir()
    pipeline = fork_pipeline(_input(folder / "in.csv", 2000))
    pipeline["gates"][0]["condition"] = "row['amount'] > 300"
    pipeline["gates"][0]["routes"]["false"] = "small"
    pipeline["sinks"]["small"] = {"plugin": "jsonl", "options": {"path": str(folder / "output.jsonl.part0")}}
    result = run_pipeline(pipeline, workers=2)
    assert result.status == "completed" and result.workers == 2
    with open_audit(folder / "audit") as audit:
        assert audit.verify(result.run_id).ok
        counts = dict(audit.sql("SELECT path_or_uri, row_count FROM artifacts WHERE run_id = $run",
                                {"run": result.run_id}).rows())
    for name in ("output.jsonl", "output.jsonl.part0"):
        assert counts[(folder / name).resolve().as_uri()] == (folder / name).read_bytes().count(b"\n") > 0


INTERRUPT = """
import sys
from elspeth_nb.engine.runner import run_pipeline
import json
pipeline = json.loads(open(sys.argv[1]).read())
print("starting", flush=True)
try:
    run_pipeline(pipeline, workers=2)
except KeyboardInterrupt as exc:
    print("interrupted:", exc, flush=True)
"""


def test_an_interrupt_of_the_parent_stops_the_workers_and_keeps_their_trail(tmp_path: Path) -> None:
    """A notebook's stop button signals the kernel (the parent) only; the workers stop between rows."""
    folder = tmp_path / "stopped"
    pipeline = _stopping(folder, slow="True", pause=0.002)  # both workers: >= 3 s each
    (folder / "pipeline.json").write_text(json.dumps(pipeline))
    child = subprocess.Popen([sys.executable, "-c", INTERRUPT, str(folder / "pipeline.json")], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "starting"
    time.sleep(2.0)  # both workers are well inside their ranges
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=120)
    assert out.startswith("interrupted: run "), out
    with open_audit(folder / "audit") as audit:
        [run_id] = audit.runs()["run_id"].to_list()
    trail = _trail(folder, run_id)
    header = trail["header"]
    assert header["status"] == "interrupted" and trail["check"].ok, trail["check"]
    assert 0 < header["rows"] < 3001 and json.loads(header["counts_json"])["rows"] == header["rows"]
    assert trail["unfinished_tokens"] == 0  # stopped between rows: every token it created has its outcome
    assert header["artifacts"] == 1 and trail["verify"].mismatches.height == 0, trail["verify"].mismatches
    assert not list(folder.glob(".output.jsonl.*"))
