"""What each payload mode keeps of rows that go wrong: hashes no row text, boundaries no row inside the pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from elspeth_nb.analysis import open_audit
from elspeth_nb.engine.clock import FakeClock
from elspeth_nb.engine.runner import run_pipeline

PLUGIN = "def explode(row):\n    if row['id'] == 2:\n        raise ValueError('no')\n    return {**row, 'seen': 1}\n"


def _pipeline(tmp_path: Path) -> dict[str, object]:
    (tmp_path / "in.csv").write_text("id,note\n1,a\nx,bad\n2,b\n")
    (tmp_path / "plugin.py").write_text(PLUGIN)
    return {
        "source": {"plugin": "csv", "on_success": "raw", "options": {
            "path": str(tmp_path / "in.csv"), "on_validation_failure": "bad",
            "schema": {"mode": "fixed", "fields": ["id: int", "note: str"]}}},
        "transforms": [
            {"name": "first", "plugin": "passthrough", "input": "raw", "on_success": "mid"},
            {"name": "user_fn", "plugin": "python", "input": "mid", "on_success": "out", "on_error": "bad",
             "options": {"function": f"{tmp_path / 'plugin.py'}:explode"}}],
        "sinks": {"out": {"plugin": "jsonl", "options": {"path": str(tmp_path / "out.jsonl")}},
                  "bad": {"plugin": "jsonl", "options": {"path": str(tmp_path / "bad.jsonl")}}},
        "audit": {"path": str(tmp_path / "audit")},
    }


@pytest.mark.parametrize(("mode", "quarantined_text", "error_text"), [
    ("all", True, True), ("boundaries", True, False), ("hashes", False, False)])
def test_error_rows_keep_text_only_where_the_mode_keeps_rows(tmp_path: Path, mode: str, quarantined_text: bool,
                                                            error_text: bool) -> None:
    result = run_pipeline(_pipeline(tmp_path), payloads=mode, clock=FakeClock())
    with open_audit(tmp_path / "audit") as audit:
        [(quarantined,)] = audit.sql("SELECT row_data_json FROM validation_errors WHERE run_id = $run",
                                     {"run": result.run_id}).rows()
        [(errored,)] = audit.sql("SELECT row_data_json FROM transform_errors WHERE run_id = $run",
                                 {"run": result.run_id}).rows()
    assert (quarantined is not None, errored is not None) == (quarantined_text, error_text)
    if quarantined_text:
        assert '"bad"' in quarantined
