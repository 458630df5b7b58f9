"""RunResult, what run_pipeline returns: the same counts as text, HTML and a polars frame."""

from __future__ import annotations

from pathlib import Path

from elspeth_nb.analysis import open_audit
from elspeth_nb.engine.clock import FakeClock
from elspeth_nb.engine.runner import run_pipeline
from tests.cases import fork_pipeline, write_csv


def test_run_result_frames_the_outcomes_the_trail_holds(tmp_path: Path) -> None:
    settings = fork_pipeline(write_csv(tmp_path / "in.csv"), lose_c_for="toys")
    result = run_pipeline(settings, audit=tmp_path / "audit", clock=FakeClock())
    frame = result.to_polars()
    assert frame.columns == ["run_id", "outcome", "count"] and set(frame["run_id"]) == {result.run_id}
    assert dict(frame.select("outcome", "count").rows()) == dict(result.outcomes)
    with open_audit(tmp_path / "audit") as audit:
        assert dict(frame.select("outcome", "count").rows()) == dict(
            audit.outcomes(result.run_id).select("outcome", "count").rows())
    assert frame["outcome"].is_sorted() and frame["count"].sum() == sum(result.outcomes.values())
    assert all(f"{o}={n}" in repr(result) for o, n in frame.select("outcome", "count").rows())
