"""AuditExplorer headless: ipywidgets works without a frontend, so every interaction is a plain call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from elspeth_nb.analysis import open_audit
from elspeth_nb.audit.store import AuditStore
from elspeth_nb.engine.clock import FakeClock
from elspeth_nb.engine.runner import run_pipeline
from elspeth_nb.widgets import AuditExplorer
from tests.cases import fork_pipeline, write_csv
from tests.display.fakes import RUNS, FakeAudit


@pytest.fixture
def explorer() -> AuditExplorer:
    return AuditExplorer(FakeAudit())


def test_opens_on_the_latest_run_with_the_summary(explorer: AuditExplorer) -> None:
    assert explorer.run_id == "run-new"
    assert [value for _, value in explorer.run_picker.options] == list(RUNS)
    assert "run-new" in explorer.run_picker.label and "completed" in explorer.run_picker.label
    assert "Run run-new" in explorer.panes[0].value
    assert explorer.panes[2].value == ""  # other tabs render when first shown


def test_switching_tabs_renders_outcomes_and_coalesce_charts(explorer: AuditExplorer) -> None:
    explorer.tabs.selected_index = 1
    assert "Tokens by terminal outcome" in explorer.panes[1].value and "<svg" in explorer.panes[1].value
    explorer.tabs.selected_index = 2
    coalesce = explorer.panes[2].value
    assert coalesce.count("<svg") == 4
    for expected in ("Merge timing", "decision", "vote", "best_effort"):
        assert expected in coalesce


def test_decisions_taken_with_no_branch_in_hand_say_so_not_empty_charts(explorer: AuditExplorer,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import polars as pl

    from tests.display import fakes

    no_waits = fakes.timings().with_columns(pl.lit(None, pl.Float64).alias("wait_duration_ms"),
                                            pl.lit(None, pl.Float64).alias("arrival_offset_ms"))
    monkeypatch.setattr(FakeAudit, "merge_timings", lambda self, run_id="latest", coalesce=None: no_waits)
    explorer.tabs.selected_index = 2
    coalesce = explorer.panes[2].value
    assert "No branch arrived before any decision" in coalesce
    assert coalesce.count("<svg") == 1 and "Merge timing" in coalesce  # the policy chart and the tables stay


def test_switching_run_rerenders_the_shown_tab(explorer: AuditExplorer) -> None:
    explorer.tabs.selected_index = 2
    explorer.search(0)
    explorer.run_picker.value = "run-old"
    assert explorer.run_id == "run-old"
    assert "no coalesce decisions" in explorer.panes[2].value
    assert explorer.panes[0].value == ""
    assert "Explain" in explorer.lineage_output.value


@pytest.mark.parametrize(("by", "value", "expected"), [
    ("row_index", "1", "Lineage of run-new-r1"),
    ("row_id", "r-42", "Lineage of r-42"),
    ("token_id", " t9 ", "Lineage of t9"),
    ("row_index", "7", "Row index `7` not found"),
    ("row_index", "seven", "whole number"),
])
def test_lineage_search(explorer: AuditExplorer, by: str, value: str, expected: str) -> None:
    explorer.tabs.selected_index = 3
    html = explorer.search(value, by=by)
    assert expected in html
    assert explorer.lineage_output.value == html


def test_lineage_button_uses_the_form(explorer: AuditExplorer) -> None:
    explorer.lineage_by.value = "row_id"
    explorer.lineage_query.value = "r-7"
    explorer.lineage_button.click()
    assert "Lineage of r-7" in explorer.lineage_output.value


def test_static_snapshot_and_text_repr(explorer: AuditExplorer) -> None:
    html = explorer._repr_html_()
    assert html == explorer.to_html()
    assert "run-new" in html and "Merge timing" in html and html.count("<svg") == 4
    assert repr(explorer) == "AuditExplorer(run='run-new', runs=2, tab='Summary')"


def test_display_without_a_kernel_is_the_static_snapshot(explorer: AuditExplorer, monkeypatch: Any) -> None:
    shown: list[Any] = []
    monkeypatch.setattr("IPython.display.display", lambda obj, raw=False: shown.append(obj))
    explorer._ipython_display_()
    assert set(shown[0]) == {"text/plain", "text/html"}


def test_unknown_run_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="run-old"):
        AuditExplorer(FakeAudit(), run_id="nope")


def test_an_audit_without_runs_shows_a_no_runs_page_until_refresh() -> None:
    audit = FakeAudit(listed=())
    explorer = AuditExplorer(audit)
    assert explorer.run_id is None and explorer.run_picker.options == ()
    assert "No runs in this audit yet" in explorer.panes[0].value
    assert "No runs in this audit yet" in explorer.to_html() and "No runs" in explorer.search(0)
    assert repr(explorer) == "AuditExplorer(run=None, runs=0, tab='Summary')"
    explorer.tabs.selected_index = 2
    assert "No runs in this audit yet" in explorer.panes[2].value
    audit.listed.insert(0, ("run-1", "running"))
    explorer.refresh()
    assert audit.refreshed == 1 and explorer.run_id == "run-1" and "running" in explorer.run_picker.label
    assert "no coalesce decisions" in explorer.panes[2].value and explorer.panes[0].value == ""
    assert "Lineage of run-1-r0" in explorer.search(0)


def test_an_explicit_run_id_of_an_empty_audit_is_still_an_error() -> None:
    with pytest.raises(KeyError, match="no runs yet"):
        AuditExplorer(FakeAudit(listed=()), run_id="run-1")


def test_the_refresh_button_lists_new_runs_and_keeps_the_shown_one(explorer: AuditExplorer) -> None:
    audit = explorer.audit
    audit.listed.insert(0, ("run-newer", "running"))
    assert [value for _, value in explorer.run_picker.options] == list(RUNS)  # nothing reloads by itself
    explorer.refresh_button.click()
    assert [value for _, value in explorer.run_picker.options] == ["run-newer", *RUNS]
    assert explorer.run_id == "run-new" and "Run run-new" in explorer.panes[0].value
    assert audit.refreshed == 1


def test_pages_of_a_finished_run_are_cached_until_refresh(explorer: AuditExplorer) -> None:
    explorer.audit.snapshot = 1
    explorer.tabs.selected_index = 1
    explorer.tabs.selected_index = 0
    assert "(snapshot 0)" in explorer.panes[0].value  # a completed run does not change
    explorer.refresh()
    assert "(snapshot 1)" in explorer.panes[0].value


def test_pages_of_a_running_run_are_never_cached() -> None:
    audit = FakeAudit(listed=[("run-live", "running"), ("run-old", "completed")])
    explorer = AuditExplorer(audit)
    assert "Run run-live (snapshot 0)" in explorer.panes[0].value
    audit.snapshot = 1
    explorer.tabs.selected_index = 1
    explorer.tabs.selected_index = 0
    assert "Run run-live (snapshot 1)" in explorer.panes[0].value
    assert "Run run-live (snapshot 1)" in explorer.to_html()


def test_explorer_on_a_real_empty_store_then_its_first_run(tmp_path: Path) -> None:
    store = AuditStore.create(tmp_path / "audit")
    with open_audit(store.root) as audit:
        explorer = AuditExplorer(audit)
        assert explorer.run_id is None and "No runs in this audit yet" in explorer.panes[0].value
        result = run_pipeline(fork_pipeline(write_csv(tmp_path / "in.csv")), audit=store.root, clock=FakeClock())
        explorer.refresh()
        assert explorer.run_id == result.run_id and "completed" in explorer.run_picker.label
        assert f"Run {result.run_id}" in explorer.panes[0].value


def test_explorer_opens_when_the_newest_run_cannot_be_read_in_full(tmp_path: Path) -> None:
    """Its page says what is wrong and the older run stays a pick away; the explorer raised instead."""
    settings = fork_pipeline(write_csv(tmp_path / "in.csv"))
    older = run_pipeline(settings, clock=FakeClock()).run_id
    newest = run_pipeline(settings, clock=FakeClock(start=100.0)).run_id
    (tmp_path / "audit" / "audit.duckdb").unlink()  # read from the segments, one of which is now damaged
    [segment] = (tmp_path / "audit" / "parquet" / "tokens" / f"run_id={newest}").glob("part-*.parquet")
    segment.write_bytes(segment.read_bytes()[:100])
    with pytest.warns(UserWarning, match="cannot be read"), open_audit(tmp_path / "audit") as audit:
        explorer = AuditExplorer(audit)
        assert explorer.run_id == newest and "cannot be read" in explorer.panes[0].value
        explorer.run_picker.value = older
        assert f"Run {older}" in explorer.panes[0].value


def test_explorer_on_a_real_run(demo_audit: Any, demo_run: Any) -> None:
    import polars as pl

    explorer = AuditExplorer(demo_audit)
    assert explorer.run_id == demo_run.run_id
    explorer.tabs.selected_index = 2
    coalesce = explorer.panes[2].value
    assert coalesce.count("<svg") == 4 and "best_effort" in coalesce and "sanctions" in coalesce
    late = demo_audit.merge_timings(demo_run.run_id).filter(pl.col("status") == "late")
    token = late["token_id"][0]
    html = explorer.search(token, by="token_id")
    assert late["row_id"][0] in html and token in html
