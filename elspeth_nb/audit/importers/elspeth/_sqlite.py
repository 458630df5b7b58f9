"""Open an ELSPETH Landscape SQLite file read-only, check it, and read its tables into Arrow.

Nothing here writes: the file is opened through a ``file:...?mode=ro`` URI, and with
``immutable=1`` when no write-ahead log or rollback journal sits beside it, so SQLite does not even
create the ``-shm``/``-wal`` side files a WAL-mode database (ELSPETH's default) would otherwise get.
Tables are read with the ADBC SQLite driver (Arrow-native, releases the GIL, two tables at a time);
the stdlib ``sqlite3`` module is the fallback when a column defeats ADBC's type inference.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa

from elspeth_nb.audit.importers.elspeth._arrow import convert_timestamps
from elspeth_nb.audit.schema import PARTITION_COLUMN, TABLES
from elspeth_nb.errors import AuditStoreError, RunNotFoundError, SchemaVersionError

#: ``PRAGMA user_version`` values of the Landscape layouts this importer understands.
KNOWN_USER_VERSIONS = frozenset({2})
SQLITE_MAGIC = b"SQLite format 3\x00"
#: Our own columns appended to Landscape tables; everything else is read from ELSPETH.
OUR_COLUMNS: dict[str, tuple[str, ...]] = {
    "runs": ("revision", "schema_version", "producer", "pipeline_path", "payload_mode", "counts_json",
             "error_message", "merkle_root", "import_problems_json"),
    "nodes": ("node_name",),
    "token_parents": (PARTITION_COLUMN,),
    "routing_events": (PARTITION_COLUMN,),
    "calls": (PARTITION_COLUMN,),
    "artifacts": ("row_count",),
    "validation_errors": ("row_id", "source_location"),
}
LANDSCAPE_TABLES = ("runs", "nodes", "edges", "rows", "tokens", "token_parents", "token_outcomes", "node_states",
                    "routing_events", "operations", "calls", "artifacts", "validation_errors", "transform_errors")
#: Largest tables first, so the two reader threads finish together.
_READ_ORDER = ("node_states", "token_outcomes", "tokens", "token_parents", "routing_events", "rows", "calls",
               "transform_errors", "validation_errors", "edges", "nodes", "operations", "artifacts", "runs")
_BATCH_ROWS = "65536"


def landscape_columns(table: str) -> list[tuple[str, pa.DataType]]:
    """ELSPETH's columns of ``table`` with the Arrow type we read them as (timestamps as text)."""
    ours = OUR_COLUMNS.get(table, ())
    return [(f.name, _raw_type(f.type)) for f in TABLES[table].schema if f.name not in ours]


def _raw_type(type_: pa.DataType) -> pa.DataType:
    if pa.types.is_integer(type_):
        return pa.int64()
    if pa.types.is_floating(type_):
        return pa.float64()
    return pa.string()


def sqlite_uri(db_path: Path) -> str:
    """A read-only URI; ``immutable=1`` unless a journal or WAL shows someone may be writing."""
    busy = any(Path(f"{db_path}{suffix}").exists() for suffix in ("-wal", "-journal"))
    return f"file:{quote(str(db_path.resolve()))}?mode=ro" + ("" if busy else "&immutable=1")


def open_checked(db_path: Path) -> tuple[sqlite3.Connection, list[str]]:
    """Open ``db_path`` read-only and check it is an ELSPETH Landscape; returns (connection, problems)."""
    _check_file(db_path)
    try:
        con = sqlite3.connect(sqlite_uri(db_path), uri=True, check_same_thread=False)
        problems = _check_schema(con, db_path)
    except sqlite3.DatabaseError as exc:
        raise AuditStoreError(f"{db_path} cannot be read as an SQLite database ({exc}); {_why_unreadable(db_path, exc)}"
                              ) from exc
    if Path(f"{db_path}-wal").exists():
        problems.append(f"{db_path.name} has a write-ahead log beside it: ELSPETH may still be writing this run")
    return con, problems


def _why_unreadable(db_path: Path, exc: sqlite3.DatabaseError) -> str:
    """The likely cause of an SQLite error when opening ``db_path``, as advice."""
    if "locked" in str(exc) or "busy" in str(exc):
        return "another process holds a write lock on it (ELSPETH still writing?): try again once it is done"
    if Path(f"{db_path}-wal").exists() and not os.access(db_path.parent, os.W_OK):
        return (f"it has a write-ahead log, which SQLite can read only by creating {db_path.name}-shm beside it, "
                f"and {db_path.parent} is not writable: copy the database and its -wal file somewhere writable")
    return "is it corrupt?"


def _check_file(db_path: Path) -> None:
    if not db_path.exists():
        raise AuditStoreError(f"ELSPETH audit database {db_path} does not exist")
    if not db_path.is_file():
        raise AuditStoreError(f"{db_path} is not a file; expected an ELSPETH Landscape SQLite file (audit.db)")
    with db_path.open("rb") as fh:
        head = fh.read(len(SQLITE_MAGIC))
    if head != SQLITE_MAGIC:
        raise AuditStoreError(
            f"{db_path} is not an SQLite database (it does not start with the SQLite header); "
            "expected an ELSPETH Landscape file such as state/audit.db"
        )


def _check_schema(con: sqlite3.Connection, db_path: Path) -> list[str]:
    """Expected tables and columns first (a foreign file), then ``PRAGMA user_version``."""
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing_tables = [t for t in LANDSCAPE_TABLES if t not in tables]
    if len(missing_tables) == len(LANDSCAPE_TABLES):
        raise AuditStoreError(
            f"{db_path} is an SQLite file but not an ELSPETH Landscape: none of its tables "
            f"({', '.join(sorted(tables)) or 'no tables'}) is one of {', '.join(LANDSCAPE_TABLES)}"
        )
    if missing_tables:
        raise AuditStoreError(
            f"{db_path} is not a complete ELSPETH Landscape: missing tables {', '.join(missing_tables)}")
    missing = []
    for table in LANDSCAPE_TABLES:
        have = {r[1] for r in con.execute(f"PRAGMA table_info({_q(table)})")}
        missing += [f"{table}.{c}" for c, _ in landscape_columns(table) if c not in have]
    version = con.execute("PRAGMA user_version").fetchone()[0]
    if missing:
        raise SchemaVersionError(
            f"{db_path} has ELSPETH's tables but not the columns this importer reads (user_version {version}): "
            f"missing {', '.join(missing)}"
        )
    if version in KNOWN_USER_VERSIONS:
        return []
    if version == 0:
        return [f"{db_path.name} has PRAGMA user_version 0 (written before ELSPETH's schema epoch); "
                "every expected column is present, so it was imported"]
    if version < min(KNOWN_USER_VERSIONS):
        return [f"{db_path.name} has PRAGMA user_version {version}, older than the version(s) this importer knows "
                f"({', '.join(map(str, sorted(KNOWN_USER_VERSIONS)))}); every expected column is present, "
                "so it was imported"]
    raise SchemaVersionError(
        f"{db_path} is an ELSPETH Landscape with PRAGMA user_version {version}; this importer knows "
        f"version(s) {', '.join(map(str, sorted(KNOWN_USER_VERSIONS)))}. Upgrade elspeth-nb to import it."
    )


def select_runs(con: sqlite3.Connection, run_ids: Sequence[str] | None) -> list[str]:
    """The runs to import (all, oldest first, or the requested ones); unknown ids raise RunNotFoundError."""
    available = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY started_at, run_id")]
    if run_ids is None:
        return available
    wanted = [run_ids] if isinstance(run_ids, str) else list(dict.fromkeys(run_ids))  # one id, not its letters
    for run_id in wanted:
        if run_id not in available:
            raise RunNotFoundError("ELSPETH run", run_id, available)
    return wanted


def left_out(con: sqlite3.Connection, run_ids: list[str], *, all_runs: bool) -> list[str]:
    """A problem per other table holding rows of the runs read (batches, checkpoints, ...): none is imported."""
    names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                       "'sqlite\\_%' ESCAPE '\\' ORDER BY name")]
    found = []
    for name in names:
        if name in LANDSCAPE_TABLES or name == "alembic_version":
            continue
        columns = {r[1] for r in con.execute(f"PRAGMA table_info({_q(name)})")}
        query = f"SELECT count(*) FROM {_q(name)}"  # noqa: S608 - a table name from the file, quoted
        params: tuple[str, ...] = ()
        if "run_id" in columns and not all_runs:
            query += f" WHERE run_id IN ({', '.join('?' * len(run_ids))})"
            params = tuple(run_ids)
        count = con.execute(query, params).fetchone()[0]
        if count:
            found.append(f"table {name} ({count:,} row(s)) was left out: elspeth-nb has no table for it")
    return found


def read_tables(db_path: Path, run_ids: list[str], *, all_runs: bool) -> tuple[dict[str, pa.Table], list[str]]:
    """Every Landscape table we import (``run_ids`` only unless ``all_runs``) as Arrow, timestamps parsed."""
    where = None if all_runs else _run_filters(run_ids)
    uri = sqlite_uri(db_path)

    def one(table: str) -> tuple[str, pa.Table]:
        return table, _read_one(uri, table, where[table] if where else "")

    problems: list[str] = []
    try:
        guard = None if "immutable=1" in uri else sqlite3.connect(uri, uri=True)
        try:
            before = _data_version(guard)
            with ThreadPoolExecutor(max_workers=2) as pool:
                raw = dict(pool.map(one, _READ_ORDER))
            if _data_version(guard) != before:  # a writer committed between two tables' reads: re-read at once
                raw = _read_in_one_transaction(uri, where)
                problems.append(f"{db_path.name} changed while it was read (ELSPETH is still writing it); it was "
                                "read again in one transaction, so the tables agree as of that moment")
        finally:
            if guard is not None:
                guard.close()
    except sqlite3.DatabaseError as exc:
        raise AuditStoreError(f"{db_path} could not be read ({exc}); the file may be corrupt or truncated") from exc
    for name in LANDSCAPE_TABLES:
        raw[name], found = convert_timestamps(name, raw[name])
        problems += found
    return raw, problems


def _data_version(con: sqlite3.Connection | None) -> int | None:
    """SQLite's count of commits by other connections, as seen by ``con`` (None for an immutable file)."""
    return None if con is None else int(con.execute("PRAGMA data_version").fetchone()[0])


def _read_in_one_transaction(uri: str, where: dict[str, str] | None) -> dict[str, pa.Table]:
    """Every table read on one connection inside one read transaction: one snapshot (slower: no parallel reads)."""
    con = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        con.execute("BEGIN")
        tables = {table: _select(con, _table_sql(table, where[table] if where else ""), pa.schema(
            landscape_columns(table))) for table in _READ_ORDER}
        con.execute("COMMIT")
        return tables
    finally:
        con.close()


def _run_filters(run_ids: list[str]) -> dict[str, str]:
    """WHERE clauses that keep the given runs; tables without run_id go through their parents."""
    ids = ", ".join(_literal(r) for r in run_ids)
    states = f"SELECT state_id FROM node_states WHERE run_id IN ({ids})"  # noqa: S608
    where = {t: f"WHERE run_id IN ({ids})" for t in LANDSCAPE_TABLES}
    where["token_parents"] = f"WHERE token_id IN (SELECT token_id FROM tokens WHERE run_id IN ({ids}))"  # noqa: S608
    where["routing_events"] = f"WHERE state_id IN ({states})"
    where["calls"] = (f"WHERE state_id IN ({states}) OR operation_id IN "  # noqa: S608
                      f"(SELECT operation_id FROM operations WHERE run_id IN ({ids}))")
    return where


def _table_sql(table: str, where: str) -> str:
    """SELECT of ``table``'s columns as we read them, rows filtered by ``where``."""
    casts = ", ".join(f"CAST({_q(c)} AS {_sql_type(t)}) AS {_q(c)}" for c, t in landscape_columns(table))
    return f"SELECT {casts} FROM {_q(table)} {where}"  # noqa: S608 - identifiers quoted, ids from the DB


def _read_one(uri: str, table: str, where: str) -> pa.Table:
    """One table through ADBC; through sqlite3 if ADBC is missing or its type inference fails."""
    sql = _table_sql(table, where)
    schema = pa.schema(landscape_columns(table))
    try:
        return _conform(_read_adbc(uri, sql), schema)
    except Exception:  # ADBC missing, or a column typed from its first batch meets another type
        return _read_sqlite3(uri, sql, schema)


def _read_sqlite3(uri: str, sql: str, schema: pa.Schema) -> pa.Table:
    """The same query through the stdlib driver (slower: one Python tuple per row)."""
    con = sqlite3.connect(uri, uri=True)
    try:
        return _select(con, sql, schema)
    finally:
        con.close()


def _select(con: sqlite3.Connection, sql: str, schema: pa.Schema) -> pa.Table:
    rows = con.execute(sql).fetchall()
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in schema]
    return pa.table([pa.array(c, f.type) for c, f in zip(cols, schema, strict=True)], schema=schema)


def _read_adbc(uri: str, sql: str) -> pa.Table:
    import adbc_driver_sqlite
    import adbc_driver_sqlite.dbapi as adbc

    with adbc.connect(uri) as con, con.cursor() as cur:
        cur.adbc_statement.set_options(**{adbc_driver_sqlite.StatementOptions.BATCH_ROWS.value: _BATCH_ROWS})
        cur.execute(sql)
        return cur.fetch_arrow_table()


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """ADBC types an all-NULL column as int64: cast every column to the type we asked for."""
    if table.schema.equals(schema):
        return table
    return pa.table([table.column(i).cast(f.type) for i, f in enumerate(schema)], schema=schema)


def _sql_type(type_: pa.DataType) -> str:
    if pa.types.is_integer(type_):
        return "INTEGER"
    if pa.types.is_floating(type_):
        return "REAL"
    return "TEXT"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
