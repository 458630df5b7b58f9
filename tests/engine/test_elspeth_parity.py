"""Our engine runs ELSPETH's own settings files unchanged and agrees with ELSPETH's recorded run.

Same input, same settings: the output rows are identical, and so are the source-row hashes and
the hashes of the rows entering the sink (RFC 8785 + SHA-256 in both systems).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import duckdb
import pytest

from elspeth_nb.engine.runner import run_pipeline

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "elspeth"


@pytest.mark.parametrize("sample", ["requireall_nested", "quorum2_nested_timeout5_lossy"])
def test_same_rows_and_hashes_as_elspeth(tmp_path: Path, sample: str) -> None:
    for name in ("settings.yaml", "input.csv"):
        shutil.copy(SAMPLES / sample / name, tmp_path / name)
    result = run_pipeline(tmp_path / "settings.yaml", audit=tmp_path / "audit")
    assert result.status == "completed"
    assert any("landscape" in w for w in result.warnings)  # ELSPETH-only keys are reported, not silently dropped

    ours = [json.loads(line) for line in (tmp_path / "output.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (SAMPLES / sample / "output.jsonl").read_text().splitlines()]
    assert ours == theirs

    # read-only and immutable: a plain connection to this WAL-mode sample creates -wal/-shm files beside it,
    # which other tests reading the sample at the same moment rightly report as "ELSPETH may still be writing"
    elspeth = sqlite3.connect(f"file:{SAMPLES / sample / 'audit.db'}?mode=ro&immutable=1", uri=True)
    try:
        their_rows = dict(elspeth.execute("SELECT row_index, source_data_hash FROM rows").fetchall())
        their_sink_inputs = sorted(h for (h,) in elspeth.execute(
            "SELECT s.input_hash FROM node_states s JOIN nodes n ON n.node_id = s.node_id AND n.run_id = s.run_id "
            "WHERE n.node_type = 'sink'"))
        their_reasons = {h for (h,) in elspeth.execute("SELECT DISTINCT reason_hash FROM routing_events")}
        their_successes = set(elspeth.execute(
            "SELECT DISTINCT n.plugin_name, s.success_reason_json FROM node_states s JOIN nodes n USING (node_id) "
            "WHERE s.success_reason_json IS NOT NULL"))
    finally:
        elspeth.close()
    with duckdb.connect(str(tmp_path / "audit" / "audit.duckdb"), read_only=True) as con:
        our_rows = dict(con.execute("SELECT row_index, source_data_hash FROM rows").fetchall())
        our_sink_inputs = sorted(h for (h,) in con.execute(
            "SELECT s.input_hash FROM node_states s JOIN nodes n ON n.node_id = s.node_id AND n.run_id = s.run_id "
            "WHERE n.node_type = 'sink'").fetchall())
        our_reasons = {h for (h,) in con.execute("SELECT DISTINCT reason_hash FROM routing_events").fetchall()}
        our_successes = set(con.execute(
            "SELECT DISTINCT n.plugin_name, s.success_reason_json FROM node_states s JOIN nodes n "
            "USING (run_id, node_id) WHERE s.success_reason_json IS NOT NULL").fetchall())
    assert our_rows == their_rows and len(our_rows) == 100
    assert our_sink_inputs == their_sink_inputs
    assert our_reasons == their_reasons != set()  # the gate's reason: its condition and the route label taken
    assert our_successes == their_successes != set()  # each transform's success reason, word for word


def test_a_lost_branch_has_the_same_reason_in_our_run_and_in_elspeths(tmp_path: Path) -> None:
    """The lossy sample's keyword filter discards branch c's errors: both trails call that loss ``quarantined``."""
    from elspeth_nb.analysis import open_audit
    from elspeth_nb.audit.importers.elspeth import import_into_store

    sample = SAMPLES / "quorum2_nested_timeout5_lossy"
    for name in ("settings.yaml", "input.csv"):
        shutil.copy(sample / name, tmp_path / name)
    import_into_store(sample / "audit.db", tmp_path / "audit", payloads=sample / "payloads")
    ours = run_pipeline(tmp_path / "settings.yaml", audit=tmp_path / "audit").run_id
    with open_audit(tmp_path / "audit") as audit:
        theirs = audit.runs().filter(audit.runs()["run_id"] != ours)["run_id"][0]
        lost = {run: sorted(audit.policy_outcomes(run).lost_branches.rows()) for run in (theirs, ours)}
    assert lost[ours] == lost[theirs] != []
    assert {reason for _, _, reason, _, _ in lost[ours]} == {"quarantined"}
