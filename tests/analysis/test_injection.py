"""A user id that looks like SQL is only ever a value: every helper answers "not found", nothing else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from elspeth_nb.analysis import Audit
from elspeth_nb.errors import NotFoundError, RunNotFoundError
from tests.analysis.conftest import JITTER, Matrix

EVIL = "x' OR '1'='1"
EVIL_QUOTED = 'x" OR "1"="1'

RUN_HELPERS: dict[str, Callable[[Audit, str], Any]] = {
    "run_summary": lambda a, v: a.run_summary(v),
    "outcomes": lambda a, v: a.outcomes(v),
    "lineage": lambda a, v: a.lineage(v, row_index=0),
    "coalesce_events": lambda a, v: a.coalesce_events(v),
    "merge_timings": lambda a, v: a.merge_timings(v),
    "merge_timing_summary": lambda a, v: a.merge_timing_summary(v),
    "policy_outcomes": lambda a, v: a.policy_outcomes(v),
    "check": lambda a, v: a.check(v),
    "verify": lambda a, v: a.verify(v),
    "diff_runs(a)": lambda a, v: a.diff_runs(v, "latest"),
    "diff_runs(b)": lambda a, v: a.diff_runs("latest", v),
}


@pytest.mark.parametrize("value", [EVIL, EVIL_QUOTED, "latest'--", "%", "_"])
@pytest.mark.parametrize("helper", list(RUN_HELPERS))
def test_sql_looking_run_ids_are_plain_values(any_audit: Audit, helper: str, value: str) -> None:
    with pytest.raises(RunNotFoundError) as caught:
        RUN_HELPERS[helper](any_audit, value)
    assert f"`{value}` not found" in str(caught.value)


def test_sql_looking_row_token_and_coalesce_names_are_plain_values(any_audit: Audit, matrix: Matrix) -> None:
    run = matrix.runs[JITTER]
    before = any_audit.runs()
    for call in (lambda: any_audit.lineage(run, row_id=EVIL), lambda: any_audit.lineage(run, token_id=EVIL),
                 lambda: any_audit.coalesce_events(run, coalesce=EVIL), lambda: any_audit.merge_timings(run, EVIL)):
        with pytest.raises(NotFoundError, match="not found"):
            call()
    assert any_audit.sql("SELECT count(*) AS n FROM runs WHERE run_id = $run", {"run": EVIL})["n"][0] == 0
    assert any_audit.sql("SELECT count(*) AS n FROM runs WHERE run_id = ?", [EVIL])["n"][0] == 0
    assert any_audit.runs().equals(before)


@pytest.mark.parametrize("by", [EVIL, "coalesce; DROP VIEW runs", ("coalesce", EVIL)])
def test_sql_looking_groupings_are_refused(any_audit: Audit, by: Any) -> None:
    with pytest.raises(ValueError, match="must be"):
        any_audit.merge_timing_summary(by=by)
    with pytest.raises(ValueError, match="must be"):
        any_audit.outcomes(by=EVIL)
