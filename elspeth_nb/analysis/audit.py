"""``open_audit`` and the :class:`Audit` facade: every audit question is one method call.

The class body is a table of contents; each helper lives in the module of its topic
(``runs``, ``lineage``, ``coalesce``, ``integrity``, ``verify``, ``diff``, ``query``) and takes the
``Audit`` as its first argument.

>>> audit = open_audit(store_path)
>>> audit.kind
'store'
>>> audit.runs().height
1
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import polars as pl

from elspeth_nb._arguments import path_argument
from elspeth_nb.analysis import coalesce as _coalesce
from elspeth_nb.analysis import diff as _diff
from elspeth_nb.analysis import integrity as _integrity
from elspeth_nb.analysis import lineage as _lineage
from elspeth_nb.analysis import query as _query
from elspeth_nb.analysis import runs as _runs
from elspeth_nb.analysis import verify as _verify
from elspeth_nb.analysis._connection import Database
from elspeth_nb.analysis.results import html_block, html_table, text_table
from elspeth_nb.errors import AuditClosedError

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa


class Audit:
    """An opened audit trail (store folder, audit.duckdb or ELSPETH Landscape), read-only.

    Every helper accepts ``run_id="latest"`` (the run that started last), a run id, or a unique
    prefix of one, and returns a polars DataFrame or a small result object with ``.to_polars()``.

    >>> with open_audit(store_path) as trail:
    ...     (trail.kind, trail.problems, trail.runs().height)
    ('store', [], 1)
    >>> trail.closed
    True
    >>> audit.con.execute("SELECT count(*) FROM runs").fetchone()
    (1,)
    """

    def __init__(self, db: Database) -> None:
        self._database = db

    @property
    def _db(self) -> Database:
        """The open database every helper reads; AuditClosedError once :meth:`close` was called."""
        if self._database.closed:
            raise AuditClosedError(f"this Audit of {self.path} is closed; open_audit({str(self.path)!r}) again "
                                   f"to read it")
        return self._database

    # -- where the data comes from ------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The store folder or database file this audit reads."""
        return self._database.path

    @property
    def kind(self) -> str:
        """``store`` (Parquet folder), ``duckdb`` (audit.duckdb) or ``elspeth`` (Landscape SQLite)."""
        return self._database.kind

    @property
    def payloads(self) -> Path | None:
        """ELSPETH's payload folder this audit reads stored rows from (None: none given, or not a Landscape)."""
        return self._database.payloads

    @property
    def closed(self) -> bool:
        """True after :meth:`close`: every helper then raises AuditClosedError."""
        return self._database.closed

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection; every audit table is a view of the same name (use it, not a cursor of it)."""
        return self._db.con

    @property
    def problems(self) -> list[str]:
        """Segments of the store that cannot be read, ``<file>: <why>``; left out of every table, their runs refused
        by the helpers (``verify`` reports them). Empty for a sound store."""
        return [f"{path}: {reason}" for path, reason in self._db.unreadable.items()]

    @property
    def import_problems(self) -> list[str]:
        """What the ELSPETH importer worked around or left out (purged payloads, unreadable configs, ...).

        Kept with each imported run (``runs.import_problems_json``), so a store still shows them long
        after the import; empty for our own runs.
        """
        kept = self._db.con.execute("SELECT import_problems_json FROM runs WHERE import_problems_json IS NOT NULL "
                                    "ORDER BY run_id").fetchall()
        found = [*self._database.import_problems, *(p for (text,) in kept for p in json.loads(text))]
        return list(dict.fromkeys(found))

    def refresh(self) -> None:
        """Re-create the views and re-read run liveness: picks up new runs, tables and columns.

        >>> audit.refresh(); audit.runs().height
        1
        """
        self._db.refresh()

    def close(self) -> None:
        """Release the connections; closing twice is harmless."""
        self._database.close()

    def __enter__(self) -> Audit:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- runs -------------------------------------------------------------------------------------------
    runs = _runs.runs
    run_summary = _runs.run_summary
    outcomes = _runs.outcomes

    # -- lineage ----------------------------------------------------------------------------------------
    lineage = _lineage.lineage

    # -- coalesce analytics --------------------------------------------------------------------------------
    coalesce_events = _coalesce.coalesce_events
    merge_timings = _coalesce.merge_timings
    merge_timing_summary = _coalesce.merge_timing_summary
    policy_outcomes = _coalesce.policy_outcomes

    # -- integrity --------------------------------------------------------------------------------------
    check = _integrity.check
    verify = _verify.verify

    # -- comparison and free SQL ------------------------------------------------------------------------
    diff_runs = _diff.diff_runs
    sql = _query.sql

    # -- display ----------------------------------------------------------------------------------------
    def _listing(self) -> tuple[str, pl.DataFrame]:
        runs = self.runs().select("run_id", "status", "started_at", "rows", "tokens", "merged", "coalesce_failed",
                                  "late_arrivals")
        return f"Audit ({self.kind}) {self.path}: {runs.height} run(s)", runs

    def _closed_title(self) -> str:
        return f"Audit ({self.kind}) {self.path}: closed"

    @property
    def orphaned_runs(self) -> dict[str, list[str]]:
        """Runs with records in the store but no ``runs`` row (its partition removed): run id -> those tables.

        Every helper ignores such a run, so it is listed here and by ``repr(audit)``; empty for a sound store.
        """
        return self._db.store.orphaned_runs() if self._db.store is not None else {}

    def _notes(self) -> list[tuple[str, list[str]]]:
        """(heading, lines) for what the reader should know about this trail: unreadable segments, import findings."""
        notes = []
        if self.problems:
            notes.append((f"{len(self.problems)} segment(s) cannot be read and are left out:", self.problems))
        if orphans := self.orphaned_runs:
            notes.append((f"{len(orphans)} run(s) have records but no runs row (removed or tampered with):",
                          [f"{run_id}: {', '.join(tables)}" for run_id, tables in orphans.items()]))
        if imported := self.import_problems:
            notes.append((f"{len(imported)} finding(s) of the ELSPETH import:", imported))
        return notes

    def __repr__(self) -> str:
        if self.closed:
            return self._closed_title()
        title, runs = self._listing()
        lines = [title, text_table(runs, indent="  ")] if runs.height else [title]
        for heading, found in self._notes():
            lines += [heading, *(f"  {line}" for line in found)]
        return "\n".join(lines)

    def to_html(self) -> str:
        if self.closed:
            return html_block(self._closed_title())
        title, runs = self._listing()
        notes = [html_table(pl.DataFrame({"problem": found}), heading) for heading, found in self._notes()]
        return html_block(title, html_table(runs), *notes)

    def _repr_html_(self) -> str:
        return self.to_html()


def open_audit(path: str | os.PathLike[str], *, payloads: str | os.PathLike[str] | None = None,
               mark_interrupted: bool = False) -> Audit:
    """Open an audit store folder, an ``audit.duckdb`` file or an ELSPETH Landscape SQLite file, read-only.

    ``payloads`` is ELSPETH's payload folder (only for a Landscape file). ``mark_interrupted=True``
    records, in the store, an ``interrupted`` revision for runs whose writing process is gone
    (``elspeth-nb check`` does this); without it nothing is ever written. An ``audit.duckdb`` opened
    directly stays held until :meth:`Audit.close`, which keeps pipelines from updating it: open the
    store folder instead when runs are still being written to it.

    >>> open_audit(store_path).kind
    'store'
    >>> open_audit(store_path / "audit.duckdb").kind
    'duckdb'
    """
    return Audit(Database.open(path_argument(path, "path"), payloads=payloads,
                               mark_interrupted_runs=mark_interrupted))


def audit_from_tables(tables: Mapping[str, pa.Table]) -> Audit:
    """An :class:`Audit` over in-memory tables of our schema, e.g. an in-memory run's, for tests and fuzzing.

    >>> from elspeth_nb.audit.writer import MemoryWriter
    >>> audit_from_tables({name: MemoryWriter().table(name) for name in ("runs", "tokens")}).runs().height
    0
    """
    return Audit(Database.from_tables(tables))
