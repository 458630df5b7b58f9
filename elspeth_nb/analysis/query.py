"""Read-only SQL over every audit table."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl

from elspeth_nb._arguments import require
from elspeth_nb.audit.store import quote_ident
from elspeth_nb.errors import Error

if TYPE_CHECKING:
    from elspeth_nb.analysis.audit import Audit

_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:\(.*?\)\s*)?(?:ANALY[SZ]E\s+)?", re.IGNORECASE | re.DOTALL)
_TRAILING = re.compile(r"[\s;]+$")
ALLOWED = ("a single SELECT / WITH / FROM / VALUES / PIVOT / UNPIVOT / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN "
           "statement")
#: DuckDB's name prefix for the enum types a PIVOT without an ``IN`` list creates before its SELECT.
_PIVOT_ENUM = "__pivot_enum_"


class ReadOnlyError(Error, PermissionError):
    """A statement that could change something was passed to ``Audit.sql``."""


def _without_comments(query: str) -> str:
    """``query`` with each comment replaced by a space (DuckDB's tokenizer tells comments from quoted text)."""
    try:
        tokens = duckdb.tokenize(query)
    except (duckdb.Error, RuntimeError):
        return query  # the parser reports what is wrong with it
    if not any(kind == duckdb.token_type.comment for _, kind in tokens):
        return query
    text = query.encode()  # the tokenizer's positions count UTF-8 bytes, not characters
    kept, cut = [], 0
    for i, (start, kind) in enumerate(tokens):
        if kind == duckdb.token_type.comment:
            end = tokens[i + 1][0] if i + 1 < len(tokens) else len(text)
            kept.append(text[cut:start] + b" ")
            cut = end
    return (b"".join(kept) + text[cut:]).decode()


def _check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """The statement to run for ``query`` once proven to be one read; ReadOnlyError for anything else."""
    query = _without_comments(query)
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise ValueError(f"cannot parse the query: {exc}") from exc
    if len(statements) != 1:
        raise ReadOnlyError(f"the audit is read-only: Audit.sql runs {ALLOWED}; got {len(statements)} statements")
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:
        explained = _EXPLAIN.sub("", query, count=1)
        if explained == query:
            raise ReadOnlyError(f"the audit is read-only: Audit.sql runs {ALLOWED}; cannot tell which statement "
                                "this EXPLAIN explains")
        _check_read_only(con, explained)
        return query
    if kind == duckdb.StatementType.MULTI:
        explain = _EXPLAIN.match(query)  # EXPLAIN [ANALYZE] of a PIVOT is MULTI too: explain the wrapped query
        if explain is not None and explain.end() > 0:
            return explain.group(0) + _as_subquery(con, query[explain.end():])
        return _as_subquery(con, query)
    if kind != duckdb.StatementType.SELECT:
        raise ReadOnlyError(f"the audit is read-only: Audit.sql runs {ALLOWED}, not {kind.name}")
    return query


def _check_params(con: duckdb.DuckDBPyConnection, statement: str,
                  params: Mapping[str, Any] | Sequence[Any] | None) -> None:
    """ValueError naming the parameters the query uses and ``params`` does not give, or gives in excess."""
    wanted: set[str] = set()
    for parsed in con.extract_statements(statement):
        wanted |= set(parsed.named_parameters)
    if isinstance(params, Mapping):
        given = {str(k) for k in params}
    elif params is None:
        given = set()
    else:
        require(params, Sequence, "params", "a mapping of $name values or a sequence of ? values")
        given = {str(i) for i in range(1, len(params) + 1)}
    if wanted == given:
        return
    def names(found: set[str]) -> str:
        return ", ".join(f"?{n}" if n.isdigit() else f"${n}" for n in sorted(found, key=lambda n: (len(n), n)))

    problems = []
    if wanted - given:
        problems.append(f"the query uses {names(wanted - given)} and params= gives no value for it")
    if given - wanted:
        problems.append(f"params= gives {names(given - wanted)}, which the query does not use")
    raise ValueError("; ".join(problems))


def _as_subquery(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """``SELECT * FROM (query)`` if ``query`` parses as a subquery (a PIVOT without ``IN``, which DuckDB reports
    as MULTI: enum types, then a SELECT); a write wrapped in a PIVOT does not parse there and is refused."""
    wrapped = f"SELECT * FROM (\n{_TRAILING.sub('', query)}\n)"  # noqa: S608 - parsed, never run unless a query
    try:
        parsed = con.extract_statements(wrapped)
    except duckdb.Error:
        parsed = []
    if len(parsed) != 1:
        raise ReadOnlyError(f"the audit is read-only: Audit.sql runs {ALLOWED}; this MULTI statement is not a "
                            f"query (a write, or a PIVOT inside one)")
    return wrapped


def _pivot_types(con: duckdb.DuckDBPyConnection) -> set[str]:
    found = con.execute("SELECT type_name FROM duckdb_types() WHERE starts_with(type_name, $prefix)",
                        {"prefix": _PIVOT_ENUM}).fetchall()
    return {r[0] for r in found}


def _drop_pivot_types(con: duckdb.DuckDBPyConnection, before: set[str]) -> None:
    """Drop the enum types a PIVOT left behind, so a read leaves the catalog as it found it."""
    for name in sorted(_pivot_types(con) - before):
        con.execute(f"DROP TYPE IF EXISTS {quote_ident(name)}")


def sql(self: Audit, query: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> pl.DataFrame:
    """Run one read-only query over the audit tables; values go in ``params`` (``$name`` or ``?``).

    Every audit table is a view of the same name (``runs`` holds the latest revision of each run,
    ``run_revisions`` all of them). Anything but a single read statement is refused; PIVOT,
    UNPIVOT, DESCRIBE, SHOW and SUMMARIZE are reads.

    >>> audit.sql("SELECT count(*) AS n FROM runs WHERE run_id = $run", {"run": "no-such-run"})["n"].to_list()
    [0]
    """
    require(query, str, "query", "one SQL statement (str)")
    con = self._db.con
    statement = _check_read_only(con, query)
    _check_params(con, statement, params)
    before = _pivot_types(con) if statement != query else None
    try:
        return self._db.frame(statement, params)
    except duckdb.PermissionException as exc:  # read_csv('/etc/passwd') and the like: outside the audit
        raise ReadOnlyError(f"the audit reads only its own tables: {str(exc).splitlines()[0]}") from exc
    finally:
        if before is not None:
            _drop_pivot_types(con, before)
