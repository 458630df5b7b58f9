"""AuditExplorer headless: ipywidgets works without a frontend, so every interaction is a plain call."""

from __future__ import annotations

from typing import Any

import pytest

from elspeth_nb.widgets import AuditExplorer
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
