"""A hand-made stand-in for ``Audit``: the display layer must work from these frames alone (no SQL)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import polars as pl

from elspeth_nb.errors import NotFoundError, RunNotFoundError

RUNS = ("run-new", "run-old")


def timings(run_id: str = "run-new") -> pl.DataFrame:
    """Two decisions of coalesce ``decision`` (one waited on a late branch) and one of ``vote``."""
    return pl.DataFrame({
        "event_id": ["e1", "e1", "e2", "e2", "e3", "e3"],
        "coalesce": ["decision", "decision", "decision", "decision", "vote", "vote"],
        "row_id": [f"{run_id}-r1", f"{run_id}-r1", f"{run_id}-r2", f"{run_id}-r2", "r1", "r1"],
        "policy": ["best_effort"] * 4 + ["quorum"] * 2,
        "trigger": ["all_arrived", "all_arrived", "timeout", "timeout", "quorum_met", "quorum_met"],
        "branch": ["sanctions", "fraud", "sanctions", "fraud", "a", "b"],
        "status": ["arrived", "arrived", "late", "arrived", "arrived", "lost"],
        "token_id": ["t1", "t2", "t3", "t4", "t5", None],
        "arrival_rank": [1, 2, None, 1, 1, None],
        "arrival_offset_ms": [0.0, 12.0, None, 0.0, 0.0, None],
        "wait_duration_ms": [12.0, 12.0, 150.0, 150.0, 3.0, 3.0],
        "late_by_ms": [None, None, 40.0, None, None, None],
        "lost_reason": [None, None, None, None, None, "discarded"],
    })


@dataclass(frozen=True)
class Result:
    title: str
    frame: pl.DataFrame
    run_id: str = ""

    def to_polars(self) -> pl.DataFrame:
        return self.frame

    def to_html(self) -> str:
        return f"<h4>{self.title}</h4>" + self.frame._repr_html_()

    def _repr_html_(self) -> str:
        return self.to_html()


class FakeAudit:
    """Only the Audit methods the widgets and report use; ``calls`` records them.

    ``listed`` is the run list, newest first, as (run id, status); tests add runs to it, and bump
    ``snapshot`` to stand for a run whose trail grew (the summary title shows it).
    """

    def __init__(self, listed: Sequence[tuple[str, str]] = tuple(zip(RUNS, ("completed", "failed"), strict=True))
                 ) -> None:
        self.listed = list(listed)
        self.calls: list[str] = []
        self.snapshot = 0
        self.refreshed = 0

    def _run(self, run_id: str) -> str:
        self.calls.append(run_id)
        ids = [run for run, _ in self.listed]
        if not ids:
            raise RunNotFoundError("Run", run_id, [], hint="there are no runs yet")
        run = ids[0] if run_id == "latest" else run_id
        if run not in ids:
            raise RunNotFoundError("Run", run_id, ids)
        return run

    def refresh(self) -> None:
        self.refreshed += 1

    def runs(self) -> pl.DataFrame:
        n = len(self.listed)
        return pl.DataFrame({"run_id": [run for run, _ in self.listed], "status": [status for _, status in self.listed],
                             "started_at": [datetime(2025, 1, n - i) for i in range(n)],
                             "rows": [n - i for i in range(n)]},
                            schema={"run_id": pl.String, "status": pl.String, "started_at": pl.Datetime,
                                    "rows": pl.Int64})

    def run_summary(self, run_id: str = "latest") -> Result:
        run = self._run(run_id)
        return Result(f"Run {run} (snapshot {self.snapshot})", pl.DataFrame({"node_name": ["screen", "decision"]}),
                      run)

    def outcomes(self, run_id: str = "latest", by: str = "outcome") -> pl.DataFrame:
        self._run(run_id)
        frame = pl.DataFrame({"outcome": ["forked", "coalesced", "completed"], "is_failure": [False] * 3,
                              "count": [2, 4, 2]})
        return frame if by == "outcome" else frame.select(pl.lit("x").alias(by), pl.all())

    def merge_timings(self, run_id: str = "latest", coalesce: str | None = None) -> pl.DataFrame:
        run = self._run(run_id)
        return timings(run) if run == "run-new" else timings(run).head(0)

    def merge_timing_summary(self, run_id: str = "latest", by: Any = ("coalesce", "branch")) -> pl.DataFrame:
        self._run(run_id)
        frame = pl.DataFrame({"coalesce": ["decision", "vote"], "policy": ["best_effort", "quorum"],
                              "branch": ["sanctions", "a"], "decisions": [2, 1], "wait_p50_ms": [81.0, 3.0]})
        return frame.select(*by, "decisions", "wait_p50_ms")

    def policy_outcomes(self, run_id: str = "latest") -> Result:
        run = self._run(run_id)
        tidy = pl.DataFrame({"coalesce": ["decision", "decision", "vote", "vote", "vote"],
                             "kind": ["trigger", "late_arrival", "trigger", "lost_branch", "lost_after_decision"],
                             "key": ["timeout", "sanctions", "quorum_met", "b", "c"],
                             "reason": [None, "after_merge", None, "discarded", "quarantined"],
                             "count": [1, 1, 1, 1, 2]})
        return Result("Policy outcomes", tidy, run)

    def lineage(self, run_id: str = "latest", *, row_id: str | None = None, row_index: int | None = None,
                token_id: str | None = None) -> Result:
        run = self._run(run_id)
        if row_index is not None and row_index > 1:
            raise NotFoundError("Row index", row_index, [0, 1])
        key = row_id or token_id or f"{run}-r{row_index}"
        return Result(f"Lineage of {key}", pl.DataFrame({"token_id": ["t1", "t2"], "row_id": [key, key]}), run)
