"""Random pipelines (forks, nested coalesces, every policy and strategy, loss, latency, timeouts, transform
errors) always leave a sound trail: ``check`` finds no violation. A fast subset of the fuzz bench."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elspeth_nb.analysis.audit import audit_from_tables
from elspeth_nb.audit.schema import TABLES
from elspeth_nb.audit.writer import MemoryWriter
from elspeth_nb.engine.clock import FakeClock
from elspeth_nb.engine.runner import run_pipeline
from tests.fuzz.generator import random_pipeline


class HypothesisDraw:
    """Generator choices drawn by hypothesis, so a failing pipeline shrinks to a small one."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def integer(self, low: int, high: int) -> int:
        return int(self.data.draw(st.integers(low, high)))

    def choice(self, options: Any) -> Any:
        return self.data.draw(st.sampled_from(list(options)))


def run_and_check(pipeline: dict[str, Any]) -> list[dict[str, Any]]:
    """Run on a fake clock into memory, return the invariant violations (empty when sound)."""
    writer = MemoryWriter()
    result = run_pipeline(pipeline, clock=FakeClock(), writer=writer)
    audit = audit_from_tables({name: writer.table(name) for name in TABLES})
    try:
        return audit.check(result.run_id).violations.to_dicts()
    finally:
        audit.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_pipelines_leave_a_sound_trail(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as folder:
        pipeline = random_pipeline(HypothesisDraw(data), Path(folder))
        assert run_and_check(pipeline) == [], pipeline
