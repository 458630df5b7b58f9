"""A gate condition that fails on a row fails that row's token, recorded at the gate; the run goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elspeth_nb.analysis import open_audit
from elspeth_nb.engine.runner import run_pipeline
from tests.cases import ROWS, fork_pipeline, write_csv

HUGE = "9" * 4000  # a product of two of these has 8,000 digits: more than str() of an int may print


@pytest.mark.parametrize(("condition", "error_type", "message"), [
    ("10 // (row['id'] - 2) > 0", "ExpressionEvaluationError", "division by zero"),
    (f"row['id'] * {HUGE} * {HUGE} if row['id'] == 2 else True", "ValueError", "Exceeds the limit"),
])
def test_a_condition_that_fails_on_one_row_fails_that_token_at_the_gate(
        tmp_path: Path, condition: str, error_type: str, message: str) -> None:
    settings = fork_pipeline(write_csv(tmp_path / "in.csv"))
    settings["gates"][0]["condition"] = condition
    result = run_pipeline(settings, audit=tmp_path / "audit")
    assert result.status == "completed"
    with open_audit(tmp_path / "audit") as audit:
        failed = audit.sql("SELECT s.error_json FROM node_states s JOIN nodes n USING (run_id, node_id) "
                           "WHERE s.run_id = $run AND n.node_name = 'fork_gate' AND s.status = 'failed'",
                           {"run": result.run_id})["error_json"].to_list()
        assert audit.check(result.run_id).ok
    [error] = [json.loads(e) for e in failed]
    assert (error["reason"], error["type"]) == ("condition_error", error_type) and message in error["exception"]
    assert dict(result.outcomes)["failed"] == 1 and sum(result.outcomes.values()) > len(ROWS)
