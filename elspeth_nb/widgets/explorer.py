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


class AuditExplorer:
    """A run picker and four tabs over an ``Audit``; tabs render on first view and are cached per run.

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
        runs = audit.runs()
        self.run_picker = w.Dropdown(options=_run_options(runs), description="Run",
                                     value=audit.run_summary(run_id).run_id, layout=w.Layout(width="640px"))
        self.lineage_by = w.Dropdown(options=[("row index", "row_index"), ("row id", "row_id"),
                                              ("token id", "token_id")], value="row_index", description="Find by")
        self.lineage_query = w.Text(placeholder="0", description="Value", continuous_update=False)
        self.lineage_button = w.Button(description="Explain", button_style="primary")
        self.lineage_output = w.HTML(_sections.note("Enter a row index, row id or token id, then press Explain."))
        lineage = w.VBox([w.HBox([self.lineage_by, self.lineage_query, self.lineage_button]), self.lineage_output])
        self.panes = tuple(w.HTML() for _ in _BUILDERS)
        self.tabs = w.Tab(children=[*self.panes, lineage], titles=TABS)
        self.widget = w.VBox([self.run_picker, self.tabs])
        self.run_picker.observe(self._on_run, names="value")
        self.tabs.observe(self._on_tab, names="selected_index")
        self.lineage_button.on_click(lambda _: self._search_form())
        self.lineage_query.observe(lambda _: self._search_form(), names="value")
        self._show(self.tabs.selected_index or 0)

    @property
    def run_id(self) -> str:
        """The run shown now."""
        return str(self.run_picker.value)

    def search(self, value: str | int, *, by: str = "row_index") -> str:
        """Show (and return) the lineage HTML of the row found by ``row_index``, ``row_id`` or ``token_id``."""
        html = _sections.lineage_html(self.audit, self.run_id, by, value)
        self.lineage_output.value = html
        return html

    def to_html(self) -> str:
        """A static snapshot of the shown run: summary, coalesce tables and SVG charts (no kernel needed)."""
        run = self.run_id
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

    def _search_form(self) -> None:
        self.search(self.lineage_query.value, by=self.lineage_by.value)

    @property
    def _tab(self) -> int:
        return int(self.tabs.selected_index or 0)

    def _pane(self, run: str, index: int) -> str:
        key = (run, index)
        if key not in self._cache:
            self._cache[key] = _sections.guarded(lambda: _BUILDERS[index](self.audit, run))
        return self._cache[key]

    def _show(self, index: int) -> None:
        if index < len(self.panes):
            self.panes[index].value = self._pane(self.run_id, index)

    def _on_run(self, _change: dict[str, Any]) -> None:
        for pane in self.panes:
            pane.value = ""
        self.lineage_output.value = _sections.note("Enter a row index, row id or token id, then press Explain.")
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
