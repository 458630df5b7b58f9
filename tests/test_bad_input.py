"""Bad input gets a clear error (before anything runs) or a recorded quarantine; nothing is lost.

Each case names what was wrong and where; for data problems the run goes on and the trail says
what happened to the row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pytest

from elspeth_nb.engine.runner import RunFailedError, run_pipeline
from elspeth_nb.errors import AuditStoreError, ConfigError, InputError
from tests.cases import fork_pipeline, write_csv


def _simple(tmp_path: Path, csv_text: str, **source_options: Any) -> dict[str, Any]:
    (tmp_path / "in.csv").write_bytes(csv_text.encode("utf-8") if isinstance(csv_text, str) else csv_text)
    return {
        "source": {"plugin": "csv", "on_success": "out",
                   "options": {"path": str(tmp_path / "in.csv"), "on_validation_failure": "bad",
                               "schema": {"mode": "fixed", "fields": ["id: int", "amount: float", "note: str"]},
                               **source_options}},
        "sinks": {"out": {"plugin": "jsonl", "options": {"path": str(tmp_path / "out.jsonl")}},
                  "bad": {"plugin": "jsonl", "options": {"path": str(tmp_path / "bad.jsonl")}}},
        "audit": {"path": str(tmp_path / "audit")},
    }


def _table(tmp_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(tmp_path / "audit" / "audit.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("source:\n  plugin: csv\n  options: [unclosed\n")
    with pytest.raises(ConfigError) as caught:
        run_pipeline(path)
    assert "p.yaml:" in str(caught.value)
    assert not (tmp_path / "audit").exists()


def test_invalid_config_lists_every_problem_before_running(tmp_path: Path) -> None:
    pipeline = fork_pipeline(write_csv(tmp_path / "in.csv"), policy="quorum")  # quorum without quorum_count
    pipeline["coalesce"][0]["merge"] = "zip"
    with pytest.raises(ConfigError) as caught:
        run_pipeline(pipeline)
    text = str(caught.value)
    assert "coalesce[0].quorum_count" in text and "coalesce[0].merge" in text
    assert not (tmp_path / "audit").exists()


def test_missing_input_file_fails_before_the_run(tmp_path: Path) -> None:
    pipeline = fork_pipeline(tmp_path / "nope.csv")
    with pytest.raises(InputError, match=r"source\.options\.path: input file .*nope\.csv does not exist"):
        run_pipeline(pipeline)
    assert not (tmp_path / "audit").exists()


def test_unwritable_audit_path_fails_clearly_and_writes_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    pipeline = fork_pipeline(write_csv(tmp_path / "in.csv"))
    with pytest.raises(AuditStoreError, match="not writable"):
        run_pipeline(pipeline, audit=blocker / "audit")
    assert not (tmp_path / "output.jsonl").exists()


def test_unwritable_sink_path_fails_before_the_run(tmp_path: Path) -> None:
    pipeline = fork_pipeline(write_csv(tmp_path / "in.csv"))
    (tmp_path / "output.jsonl").mkdir()  # the sink path is a directory
    with pytest.raises(InputError, match=r"sinks\.output.*output\.jsonl"):
        run_pipeline(pipeline)


def test_malformed_lines_and_nan_are_quarantined_and_the_run_goes_on(tmp_path: Path) -> None:
    csv_text = ("id,amount,note\n"
                "1,1.5,fine\n"
                "2,2.5\n"                 # too few fields
                "3,abc,not a number\n"    # type mismatch
                "4,nan,NaN value\n"       # parses, but NaN cannot be hashed
                "5,inf,Infinity\n"
                "6,6.5,also fine\n")
    result = run_pipeline(_simple(tmp_path, csv_text))
    assert result.status == "completed" and result.rows == 6 and result.quarantined == 4
    good = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert good == [1, 6]
    errors = _table(tmp_path, "SELECT source_location, violation_type, destination FROM validation_errors "
                              "ORDER BY source_location")
    assert errors == [("in.csv:3", "malformed_row", "bad"), ("in.csv:4", "type_mismatch", "bad"),
                      ("in.csv:5", "non_finite", "bad"), ("in.csv:6", "non_finite", "bad")]
    outcomes = dict(_table(tmp_path, "SELECT outcome, count(*) FROM token_outcomes GROUP BY 1"))
    assert outcomes == {"completed": 2, "quarantined": 4}
    assert len((tmp_path / "bad.jsonl").read_text().splitlines()) == 4  # quarantined rows kept, not lost


def test_invalid_utf8_quarantines_only_that_line(tmp_path: Path) -> None:
    data = b"id,amount,note\n1,1.0,ok\n2,2.0,caf\xe9\n3,3.0,ok\n"
    result = run_pipeline(_simple(tmp_path, data))  # type: ignore[arg-type]
    assert result.quarantined == 1
    [(location, violation, row_json)] = _table(
        tmp_path, "SELECT source_location, violation_type, row_data_json FROM validation_errors")
    assert (location, violation) == ("in.csv:3", "encoding") and "caf\\\\xe9" in row_json


def test_a_transform_that_raises_is_recorded_and_routed_by_on_error(tmp_path: Path) -> None:
    (tmp_path / "plugin.py").write_text(
        "def explode(row):\n    if row['id'] == 2:\n        raise ZeroDivisionError('boom')\n    return row\n")
    pipeline = _simple(tmp_path, "id,amount,note\n1,1.0,a\n2,2.0,b\n3,3.0,c\n")
    pipeline["source"]["on_success"] = "raw"
    pipeline["transforms"] = [{"name": "explode", "plugin": "python", "input": "raw", "on_success": "out",
                               "on_error": "bad", "options": {"function": str(tmp_path / "plugin.py") + ":explode"}}]
    result = run_pipeline(pipeline)
    assert result.outcomes == {"completed": 2, "routed": 1}
    [(destination, details)] = _table(tmp_path, "SELECT destination, error_details_json FROM transform_errors")
    assert destination == "bad" and json.loads(details)["type"] == "ZeroDivisionError"
    assert json.loads((tmp_path / "bad.jsonl").read_text())["id"] == 2


def test_run_failed_error_carries_the_result(tmp_path: Path) -> None:
    (tmp_path / "plugin.py").write_text("import sys\n\ndef crash(row):\n    raise SystemExit(3)\n")
    pipeline = _simple(tmp_path, "id,amount,note\n1,1.0,a\n")
    pipeline["source"]["on_success"] = "raw"
    pipeline["transforms"] = [{"name": "crash", "plugin": "python", "input": "raw", "on_success": "out",
                               "options": {"function": str(tmp_path / "plugin.py") + ":crash"}}]
    with pytest.raises(RunFailedError) as caught:
        run_pipeline(pipeline)
    assert caught.value.result.status == "failed"
    [(status, message)] = _table(tmp_path, "SELECT status, error_message FROM runs")
    assert status == "failed" and "SystemExit" in message
