"""Read-only SQL over every audit table."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl

from elspeth_nb.errors import Error

if TYPE_CHECKING:
    from elspeth_nb.analysis.audit import Audit

_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:\(.*?\)\s*)?(?:ANALY[SZ]E\s+)?", re.IGNORECASE | re.DOTALL)
ALLOWED = "a single SELECT / WITH / FROM / VALUES / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN statement"


class ReadOnlyError(Error, PermissionError):
    """A statement that could change something was passed to ``Audit.sql``."""


def _check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise ValueError(f"cannot parse the query: {exc}") from exc
    if len(statements) != 1:
        raise ReadOnlyError(f"the audit is read-only: Audit.sql runs {ALLOWED}; got {len(statements)} statements")
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:
        inner = _EXPLAIN.sub("", query, count=1)
        _check_read_only(con, inner)
        return
    if kind != duckdb.StatementType.SELECT:
        raise ReadOnlyError(f"the audit is read-only: Audit.sql runs {ALLOWED}, not {kind.name}")


def sql(self: Audit, query: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> pl.DataFrame:
    """Run one read-only query over the audit tables; values go in ``params`` (``$name`` or ``?``).

    Every audit table is a view of the same name (``runs`` holds the latest revision of each run,
    ``run_revisions`` all of them). Anything but a single read statement is refused.

    >>> audit.sql("SELECT count(*) AS n FROM runs WHERE run_id = $run", {"run": "no-such-run"})["n"].to_list()
    [0]
    """
    con = self._db.con
    _check_read_only(con, query)
    try:
        return self._db.frame(query, params)
    except duckdb.PermissionException as exc:  # read_csv('/etc/passwd') and the like: outside the audit
        raise ReadOnlyError(f"the audit reads only its own tables: {str(exc).splitlines()[0]}") from exc
