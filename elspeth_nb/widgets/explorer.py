"""``AuditExplorer``: pick a run, then browse its summary, outcomes, coalesce analytics and lineage.

Live in a kernel (ipywidgets); a static HTML snapshot (summary, coalesce tables, SVG charts) otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

import polars as pl

from elspeth_nb.widgets import _sections

TABS = ("Summary", "Outcomes", "Coalesce analytics", "Lineage search")
_BUILDERS: tuple[Callable[[Any, str], str], ...] = (
    _sections.summary_html, _sections.outcomes_html, _sections.coalesce_html)
_SEARCH_HINT = "Enter a row index, row id or token id, then press Explain."
_NO_RUNS = "No runs in this audit yet: run a pipeline with this audit path, then press Refresh."
#: A run with this status is still being written: its pages are rendered afresh each time they are shown.
_LIVE = "running"


class AuditExplorer:
    """A run picker, a Refresh button and four tabs over an ``Audit``; tabs render on first view.

    Pages of finished runs are cached until ``refresh()`` (or the button), which also reloads the
    run list; pages of a running run are never cached.

    >>> explorer = AuditExplorer(audit)
    >>> explorer.tabs.selected_index = 2  # Coalesce analytics
    >>> "Merge timing" in explorer.panes[2].value
    True
    >>> "Lineage of row 0" in explorer.search(0, by="row_index")
    True
    """

    def __init__(self, audit: Any, *, run_id: str = "latest") -> None:
        import ipywidgets as w

        self.audit = audit
        self._cache: dict[tuple[str, int], str] = {}
        self._statuses: dict[str, str] = {}
        self._quiet = False
        runs = self._list_runs()
        first = self._first_run(runs, run_id)
        self.run_picker = w.Dropdown(options=_run_options(runs), description="Run",
                                     value=first, layout=w.Layout(width="640px"))
        self.refresh_button = w.Button(description="Refresh", icon="refresh",
                                       tooltip="Reload the run list and render the pages again")
        self.lineage_by = w.Dropdown(options=[("row index", "row_index"), ("row id", "row_id"),
                                              ("token id", "token_id")], value="row_index", description="Find by")
        self.lineage_query = w.Text(placeholder="0", description="Value", continuous_update=False)
        self.lineage_button = w.Button(description="Explain", button_style="primary")
        self.lineage_output = w.HTML(self._search_hint())
        lineage = w.VBox([w.HBox([self.lineage_by, self.lineage_query, self.lineage_button]), self.lineage_output])
        self.panes = tuple(w.HTML() for _ in _BUILDERS)
        self.tabs = w.Tab(children=[*self.panes, lineage], titles=TABS)
        self.widget = w.VBox([w.HBox([self.run_picker, self.refresh_button]), self.tabs])
        self.run_picker.observe(self._on_run, names="value")
        self.tabs.observe(self._on_tab, names="selected_index")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.lineage_button.on_click(lambda _: self._search_form())
        self.lineage_query.observe(lambda _: self._search_form(), names="value")
        self._show(self._tab)

    @property
    def run_id(self) -> str | None:
        """The run shown now; None while the audit has no runs."""
        value = self.run_picker.value
        return None if value is None else str(value)

    def refresh(self) -> None:
        """Reload the run list (runs started since show up), drop every cached page and render the shown tab.

        The shown run stays selected; with no run shown yet, the newest run is.
        """
        reload = getattr(self.audit, "refresh", None)
        if callable(reload):
            reload()  # an Audit re-reads its views: tables and runs that appeared since it was opened
        runs = self._list_runs()
        self._cache.clear()
        options = _run_options(runs)
        ids = [value for _, value in options]
        keep = self.run_id if self.run_id in ids else (ids[0] if ids else None)
        self._quiet = True
        try:
            self.run_picker.options = options
            self.run_picker.value = keep
        finally:
            self._quiet = False
        self._clear_panes()
        self._show(self._tab)

    def search(self, value: str | int, *, by: str = "row_index") -> str:
        """Show (and return) the lineage HTML of the row found by ``row_index``, ``row_id`` or ``token_id``."""
        run = self.run_id
        html = _sections.note(_NO_RUNS) if run is None else _sections.lineage_html(self.audit, run, by, value)
        self.lineage_output.value = html
        return html

    def to_html(self) -> str:
        """A static snapshot of the shown run: summary, coalesce tables and SVG charts (no kernel needed)."""
        run = self.run_id
        if run is None:
            return "<p><b>Audit explorer</b></p>" + self._pane(run, 0)
        head = (f"<p><b>Audit explorer</b>, run <code>{escape(run)}</code> of {len(self.run_picker.options)} "
                "(static snapshot; in a live kernel this is an interactive explorer).</p>")
        return head + self._pane(run, 0) + self._pane(run, 2)

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        return f"AuditExplorer(run={self.run_id!r}, runs={len(self.run_picker.options)}, tab={TABS[self._tab]!r})"

    def _ipython_display_(self) -> None:
        """The live widget when a kernel can render it, with the static snapshot as the HTML fallback."""
        from IPython.display import display

        bundle: dict[str, Any] = dict(self.widget._repr_mimebundle_() or {}) if _kernel_is_live() else {}
        bundle.update({"text/plain": repr(self), "text/html": self.to_html()})
        display(bundle, raw=True)  # type: ignore[no-untyped-call]

    def _first_run(self, runs: pl.DataFrame, run_id: str) -> str | None:
        """The run to show first, without reading it: a run whose segments are damaged still opens the explorer
        (its pages say what is wrong, and the other runs stay a pick away)."""
        ids = [str(r) for r in runs.get_column("run_id")] if runs.height else []
        if run_id == "latest":
            return ids[0] if ids else None  # runs() lists the newest first
        if run_id in ids:
            return run_id
        return str(self.audit.run_summary(run_id).run_id)  # any other form of id, or a clear "not found"

    def _list_runs(self) -> pl.DataFrame:
        """The audit's runs, remembering each one's status (which decides whether its pages are cached)."""
        runs: pl.DataFrame = self.audit.runs()
        self._statuses = {str(r["run_id"]): str(r.get("status")) for r in runs.iter_rows(named=True)}
        return runs

    def _search_form(self) -> None:
        self.search(self.lineage_query.value, by=self.lineage_by.value)

    def _search_hint(self) -> str:
        return _sections.note(_NO_RUNS if self.run_id is None else _SEARCH_HINT)

    @property
    def _tab(self) -> int:
        return int(self.tabs.selected_index or 0)

    def _pane(self, run: str | None, index: int) -> str:
        """The page of ``run`` for tab ``index``: cached unless the run is still being written."""
        if run is None:
            return _sections.section(TABS[index], _sections.note(_NO_RUNS))
        key = (run, index)
        if key in self._cache:
            return self._cache[key]
        html = _sections.guarded(lambda: _BUILDERS[index](self.audit, run))
        if self._statuses.get(run) != _LIVE:
            self._cache[key] = html
        return html

    def _show(self, index: int) -> None:
        if index < len(self.panes):
            self.panes[index].value = self._pane(self.run_id, index)

    def _clear_panes(self) -> None:
        for pane in self.panes:
            pane.value = ""
        self.lineage_output.value = self._search_hint()

    def _on_run(self, _change: dict[str, Any]) -> None:
        if self._quiet:
            return
        self._clear_panes()
        self._show(self._tab)

    def _on_tab(self, change: dict[str, Any]) -> None:
        self._show(int(change["new"] or 0))


def _run_options(runs: pl.DataFrame) -> list[tuple[str, str]]:
    """Dropdown labels ``<run id> · <started> · <status> · <rows> rows`` for each run."""
    options = []
    for row in runs.iter_rows(named=True):
        started = row.get("started_at")
        parts = [str(row["run_id"]), started.strftime("%Y-%m-%d %H:%M:%S") if started else None,
                 row.get("status"), f"{row['rows']} rows" if row.get("rows") is not None else None]
        options.append((" · ".join(str(p) for p in parts if p), str(row["run_id"])))
    return options


def _kernel_is_live() -> bool:
    """True inside a running IPython kernel (a frontend may render widgets), False in a terminal or script."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
