"""Ctrl-C during a run: taken between rows, every token in flight ends with an outcome saying so."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from elspeth_nb.analysis import open_audit
from elspeth_nb.engine.runner import run_pipeline
from tests.cases import fork_pipeline, write_csv

INTERRUPT = "import os, signal\n\ndef explode(row):\n    if row['id'] == {at}:\n{sends}    return row\n"
SEND = "        os.kill(os.getpid(), signal.SIGINT)\n"


def _interrupted_run(tmp_path: Path, interrupts: int, at: int = 2) -> dict[str, Any]:
    """Branch a's plugin presses Ctrl-C ``interrupts`` times at row ``at``, while branch c waits 50 ms on a call."""
    settings = fork_pipeline(write_csv(tmp_path / "in.csv"), slow={"c": 50})
    [a_pass] = [t for t in settings["transforms"] if t["name"] == "a_pass"]
    a_pass.update(plugin="python", options={"function": "plugin.py:explode"})
    (tmp_path / "plugin.py").write_text(INTERRUPT.format(sends=SEND * interrupts, at=at))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(settings))
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="interrupted; its trail is complete up to that point"):
        run_pipeline(tmp_path / "pipeline.yaml")
    assert signal.getsignal(signal.SIGINT) is handler  # the run's own handler is gone
    with open_audit(tmp_path / "audit") as audit:
        [run_id] = audit.runs().get_column("run_id")
        params = {"run": run_id}
        run = audit.sql("SELECT run_id, status, error_message FROM runs WHERE run_id = $run", params).row(0, named=True)
        return {
            "run": run,
            "ok": audit.check(run["run_id"]).ok,
            "rows": audit.sql("SELECT count(*) FROM rows WHERE run_id = $run", params).item(),
            "unfinished": audit.sql(
                "SELECT count(*) FROM tokens t WHERE run_id = $run AND NOT EXISTS (SELECT 1 FROM token_outcomes o "
                "WHERE o.run_id = t.run_id AND o.token_id = t.token_id AND o.is_terminal = 1)", params).item(),
            "ended": audit.sql("SELECT t.branch_name, o.outcome, o.context_json FROM token_outcomes o "
                               "JOIN tokens t USING (run_id, token_id) WHERE run_id = $run "
                               "AND o.context_json LIKE '%run_interrupted%' ORDER BY t.row_id, t.branch_name",
                               params).rows(),
            "held_states": audit.sql(
                "SELECT s.status, s.error_json FROM node_states s JOIN nodes n USING (run_id, node_id) "
                "WHERE s.run_id = $run AND n.node_type = 'coalesce'", params).rows(),
            "held": audit.run_summary(run["run_id"]).coalesce.select("coalesce", "held_when_run_stopped").rows(),
            "artifacts": audit.sql("SELECT row_count FROM artifacts WHERE run_id = $run", params).rows(),
        }


def test_a_ctrl_c_stops_before_the_next_row_and_ends_every_token_in_flight(tmp_path: Path) -> None:
    found = _interrupted_run(tmp_path, interrupts=1)
    assert found["run"]["status"] == "interrupted"
    assert found["run"]["error_message"] == "interrupted by the user (KeyboardInterrupt)"
    assert found["rows"] == 2 and found["unfinished"] == 0 and found["ok"]
    # rows 1 and 2 were in flight: a and b held at the coalesce, c waiting on its call
    assert [(b, o) for b, o, _ in found["ended"]] == [("a", "failed"), ("b", "failed"), ("c", "failed")] * 2
    contexts = [json.loads(c) for _, _, c in found["ended"]]
    assert all(c["run_interrupted"] == {"error": "interrupted by the user (KeyboardInterrupt)"} for c in contexts)
    assert [c["held_at_coalesce"]["branches_arrived"] for c in contexts if "held_at_coalesce" in c] == [["a", "b"]] * 4
    assert [(s, json.loads(e)["failure_reason"]) for s, e in found["held_states"]] == [
        ("failed", "run_interrupted")] * 4
    assert found["held"] == [("merge3", 2)]


def test_a_second_ctrl_c_interrupts_at_once_and_the_open_joins_are_unknown(tmp_path: Path) -> None:
    """Where the second one lands is unknown, so nothing more is recorded: the tokens in flight stay open."""
    found = _interrupted_run(tmp_path, interrupts=2)
    assert found["run"]["status"] == "interrupted" and found["ok"]
    assert found["rows"] == 2 and found["unfinished"] > 0 and found["ended"] == [] and found["held_states"] == []
    assert found["held"] == []  # no decision, and what the joins held is unknown: no coalesce to list


def test_a_ctrl_c_during_the_last_row_still_stops_the_run(tmp_path: Path) -> None:
    """No row is left to admit then: the request was read nowhere and the run reported itself completed."""
    found = _interrupted_run(tmp_path, interrupts=1, at=4)
    assert found["run"]["status"] == "interrupted" and found["rows"] == 4 and found["unfinished"] == 0


def test_a_second_ctrl_c_while_tokens_in_flight_are_ended_still_closes_the_sinks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It stops the ending of tokens, not the closing of the run: its sink file was left without an artifact."""
    import os

    from elspeth_nb.engine.tokens import EngineContext

    abandon = EngineContext.abandon

    def interrupted_again(self: EngineContext, error: str, reason: str = "run_failed") -> int:
        os.kill(os.getpid(), signal.SIGINT)  # the run's own handler is gone by now: a KeyboardInterrupt here
        return abandon(self, error, reason)

    monkeypatch.setattr(EngineContext, "abandon", interrupted_again)
    found = _interrupted_run(tmp_path, interrupts=1)
    written = (tmp_path / "output.jsonl").read_text().count("\n")
    assert found["run"]["status"] == "interrupted" and found["artifacts"] == [(written,)]
