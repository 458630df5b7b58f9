"""One in-memory DuckDB connection with a view per audit table, whatever the audit came from.

- an audit store folder: each view reads ``parquet/<table>/run_id=*/part-*.parquet`` (hive
  partitioned, union by name), so a run still being written shows up as its segments land;
- an ``audit.duckdb`` file: attached read-only, one view per table;
- an ELSPETH Landscape SQLite file: converted by the ELSPETH importer into in-memory tables.

Views always carry every column of our schema, in schema order (a column an older store lacks
reads as NULL). ``runs`` keeps the latest revision of each run and says ``interrupted`` for a run
whose latest revision says ``running`` while no process holds its lock. Once the views exist the
connection is locked: no file outside the store can be read or written and the configuration
cannot be changed back.

A segment that cannot be read is found only when a query fails (the healthy path reads no file
more than the query does). Found while opening (or refreshing), it is left out: the views of its
table then read the list of the other segments, listed again before each query so a run in
progress is still followed, and helpers refuse its run (``verify`` reports it). Found by a later
query, it is named in an AuditStoreError.
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import polars as pl
import pyarrow as pa

from elspeth_nb.analysis._native import NativeCopy
from elspeth_nb.analysis._segments import Segment, SegmentIndex
from elspeth_nb.audit.schema import PARTITION_COLUMN, SCHEMA_VERSION, TABLES, RunStatus, Table
from elspeth_nb.audit.store import (
    DUCKDB_NAME,
    MANIFEST_NAME,
    AuditStore,
    damaged_file,
    duckdb_type,
    mark_interrupted,
    quote_ident,
    unreadable_data,
    unreadable_footers,
)
from elspeth_nb.errors import AuditStoreError, AuditStoreWarning, RunNotFoundError, SchemaVersionError

STORE, DUCKDB, ELSPETH, MEMORY = "store", "duckdb", "elspeth", "memory"
SQLITE_MAGIC = b"SQLite format 3\x00"
DUCKDB_MAGIC = b"DUCK"  # at byte offset 8 of a DuckDB database file
#: Schema of our bookkeeping tables (run order, dead writers); never one of the audit tables.
INTERNAL = "_enb"
#: Views besides the audit tables: every revision of every run.
RUN_REVISIONS = "run_revisions"
EXPECTED = (
    "expected an elspeth-nb audit store folder (with elspeth-nb-store.json), its audit.duckdb file, "
    "or an ELSPETH Landscape SQLite file (audit.db)"
)
#: Newest run first: started_at, then the order runs landed on disk, then the id.
NEWEST_FIRST = "r.started_at DESC NULLS LAST, o.seq DESC NULLS FIRST, r.run_id DESC"
#: Connections that read the records of one lineage side by side (DuckDB reads one segment on one thread).
WORKERS = 2
_T = TypeVar("_T")
#: Options of every read of segments: the run id from the partition path, columns matched by name.
PARQUET_OPTIONS = "hive_partitioning = true, union_by_name = true, hive_types = {'run_id': VARCHAR}"


@dataclass(frozen=True)
class Lookup:
    """A relation to read one table from in a point lookup: SQL (a view, or a read of chosen segments) and its
    parameters."""

    sql: str
    params: dict[str, Any] = field(default_factory=dict)


def detect_kind(path: Path) -> str:
    """``store``, ``duckdb`` or ``elspeth`` from what is on disk; a clear error otherwise."""
    if not path.exists():
        raise AuditStoreError(f"audit path {path} does not exist; {EXPECTED}")
    if path.is_dir():
        if (path / MANIFEST_NAME).exists():
            return STORE
        hint = ""
        nested = [p for p in sorted(path.iterdir()) if (p / MANIFEST_NAME).exists()] if os.access(path, os.R_OK) else []
        if nested:
            hint = f" It contains the store {nested[0]}: pass that folder."
        raise AuditStoreError(f"{path} is a folder but not an elspeth-nb audit store (no {MANIFEST_NAME}); "
                              f"{EXPECTED}.{hint}")
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise AuditStoreError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head.startswith(SQLITE_MAGIC):
        return ELSPETH
    if head[8:12] == DUCKDB_MAGIC:
        return DUCKDB
    raise AuditStoreError(f"{path} is neither a DuckDB nor an SQLite database (unrecognised file header); {EXPECTED}")


def _tables_read_by(sql: str | None) -> list[str]:
    """The audit tables a query names (every table when it names none, or is unknown)."""
    words = set(re.findall(r"[a-z_]+", (sql or "").lower()))
    named = [t for t in TABLES if t in words or (t == "runs" and RUN_REVISIONS in words)]
    return named or list(TABLES)


def _runs_read_by(params: Mapping[str, Any] | Sequence[Any] | None) -> list[str] | None:
    """The runs a query's ``$run``/``$runs`` parameters restrict it to; None when it is not restricted so."""
    if not isinstance(params, Mapping):
        return None
    listed = params.get("runs")
    runs = [params.get("run"), *(listed if isinstance(listed, list) else [])]
    return [r for r in runs if isinstance(r, str)] or None


def _files_given(params: Mapping[str, Any] | Sequence[Any] | None) -> set[str]:
    """Every text in the list parameters of a query: the segment files of a point lookup among them."""
    lists = [v for v in params.values() if isinstance(v, list)] if isinstance(params, Mapping) else []
    return {item for value in lists for item in value if isinstance(item, str)}


def _is_reading_error(exc: duckdb.Error) -> bool:
    """True when ``exc`` may come from a file that cannot be read rather than from a mistake in the query
    (a Parquet file DuckDB cannot decode also raises InvalidInputException)."""
    return damaged_file(exc) or isinstance(exc, duckdb.InvalidInputException)


class Database:
    """The connection, where it reads from, and the few queries every helper needs."""

    def __init__(self, path: Path, kind: str, *, payloads: Path | None = None) -> None:
        self.path = path
        self.kind = kind
        self.payloads = payloads
        self.store: AuditStore | None = None
        self.import_problems: list[str] = []
        self.segment_index: SegmentIndex | None = None
        self._lookups = itertools.count()
        self._scratch: duckdb.DuckDBPyConnection | None = None
        #: run id -> (payload segments keyed so far; their payloads' keys, sorted: see ``payload_rows``)
        self._payload_keys: dict[str, tuple[list[Segment], pl.DataFrame]] = {}
        self._variables: dict[str, str | list[str]] = {}
        #: segments found unreadable while opening or refreshing -> what reading them said; left out of the views
        self.unreadable: dict[Path, str] = {}
        self._warned: set[Path] = set()
        #: table -> the segment files its view reads, for the tables whose view leaves an unreadable segment out
        self._listed: dict[str, list[str]] = {}
        #: True while :meth:`parallel` jobs read the views (which must not change under them)
        self._in_parallel = False
        self._workers: queue.SimpleQueue[duckdb.DuckDBPyConnection] = queue.SimpleQueue()
        self._worker_cons: list[duckdb.DuckDBPyConnection] = []
        self._pool: ThreadPoolExecutor | None = None
        self._run_ids: tuple[object, list[str]] | None = None
        #: run id -> (latest revision, status) on disk, read with the run ids
        self._run_states: dict[str, tuple[int | None, str]] = {}
        #: a store's audit.duckdb, which answers queries about runs it holds exactly as on disk
        self.native: NativeCopy | None = None
        #: queries answered by ``native`` so far (what tests and benchmarks check the route by)
        self.native_answers = 0
        #: run id -> metadata of a finished run (payload_mode, nodes, edges), which no longer changes
        self.finished_runs: dict[str, dict[str, Any]] = {}
        #: set by :meth:`close`; the Audit facade refuses every query from then on
        self.closed = False
        self.con = duckdb.connect(":memory:")
        self._configure(self.con)
        self.con.execute(f"CREATE SCHEMA {INTERNAL}")
        self.con.execute(f"CREATE TABLE {INTERNAL}.run_order (run_id VARCHAR, seq INTEGER)")
        self.con.execute(f"CREATE TABLE {INTERNAL}.dead_runs (run_id VARCHAR)")

    @staticmethod
    def _configure(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("SET parquet_metadata_cache = true")  # segments are immutable: their footers never change

    def _start_workers(self) -> None:
        """Connections to the same database with the same settings, made before the configuration is locked."""
        for _ in range(WORKERS):
            cursor = self.con.cursor()
            self._configure(cursor)
            for name, value in self._variables.items():
                cursor.execute(f"SET VARIABLE {name} = $value", {"value": value})
            self._worker_cons.append(cursor)
            self._workers.put(cursor)

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, payloads: str | os.PathLike[str] | None = None,
             mark_interrupted_runs: bool = False) -> Database:
        where = Path(path).expanduser()
        kind = detect_kind(where)
        if payloads is not None and kind != ELSPETH:
            raise ValueError(f"payloads= is the payload folder of an ELSPETH Landscape; {where} is an elspeth-nb "
                             f"{'audit store' if kind == STORE else 'audit.duckdb'}, whose payloads are inside it")
        folder = None
        if payloads is not None:  # checked now: a wrong folder would read every lineage as hashes only
            from elspeth_nb.audit.importers.elspeth import payload_folder

            folder = payload_folder(payloads)
        db = cls(where.resolve(), kind, payloads=folder)
        try:
            if kind == STORE:
                db.store = AuditStore.open(db.path)
                db.segment_index = SegmentIndex(db.store.parquet_root)
                db.native = NativeCopy(db.store)
                if mark_interrupted_runs:
                    mark_interrupted(db.store, found_by="open_audit(mark_interrupted=True)")
            elif kind == DUCKDB:
                db._attach()
            db._load()
            db._start_workers()
            db._lock()
        except duckdb.Error as exc:  # a damaged file of the store: say which, not where DuckDB noticed
            try:
                db._raise_unreadable(exc, search=False)  # _load searched already
            finally:
                db.close()
            raise AuditStoreError(f"cannot read {db.path}: {str(exc).splitlines()[0]}") from exc
        except BaseException:
            db.close()
            raise
        return db

    @classmethod
    def from_tables(cls, tables: Mapping[str, Any]) -> Database:
        """A database over in-memory Arrow tables of our schema (a MemoryWriter's, an import's)."""
        db = cls(Path("<memory>"), MEMORY)
        try:
            db._store_tables(tables)
            db._load()
            db._start_workers()
            db._lock()
        except BaseException:
            db.close()
            raise
        return db

    def _store_tables(self, tables: Mapping[str, Any]) -> None:
        """Copy ``tables`` (Arrow, our schema incl. run_id) into internal tables the views read."""
        for name in TABLES:
            arrow = tables.get(name)
            if arrow is None:
                arrow = TABLES[name].schema.empty_table()
            self.con.register("enb_import_batch", arrow)
            try:
                target = f"{INTERNAL}.{quote_ident('import_' + name)}"
                self.con.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT * FROM enb_import_batch")  # noqa: S608
            finally:
                self.con.unregister("enb_import_batch")
        runs = tables.get("runs")
        self._imported_order = list(dict.fromkeys(runs.column("run_id").to_pylist())) if runs is not None else []

    def _attach(self) -> None:
        try:
            self.con.execute("ATTACH $path AS src (READ_ONLY)", {"path": str(self.path)})
        except duckdb.Error as exc:
            raise AuditStoreError(f"cannot open {self.path} read-only: {exc}") from exc
        found = {r[0] for r in self.con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_catalog = 'src'").fetchall()}
        if "runs" not in found:
            raise AuditStoreError(f"{self.path} is a DuckDB database without the audit tables (runs, nodes, tokens, "
                                  f"...); {EXPECTED}")
        parent = self.path.parent
        if self.path.name == DUCKDB_NAME and (parent / MANIFEST_NAME).exists():
            self.store = AuditStore(parent)  # only for the writers' locks and the order runs landed in

    def _lock(self) -> None:
        """No file access outside the store and no configuration change from here on."""
        allowed = [str(self.store.parquet_root) + os.sep] if self.kind == STORE and self.store else []
        self.con.execute("SET allowed_directories = $dirs", {"dirs": allowed})
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    # -- views --------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-create the views (new columns, new tables), re-read run order and writer liveness; segments left out
        as unreadable are tried again."""
        self._run_ids = None
        self.finished_runs.clear()
        self.unreadable.clear()
        self._listed.clear()
        try:
            self._load()
        except duckdb.Error as exc:
            self._raise_unreadable(exc, search=False)  # _load searched already
            raise

    def _load(self) -> None:
        """Create the views; segments that make that fail are left out (and warned about once), not fatal."""
        if self.kind == ELSPETH:
            self._import_landscape()
        while True:
            try:
                self._create_views()
                break
            except duckdb.Error as exc:
                if not self._leave_out_unreadable(exc):
                    raise
        self._warn_unreadable()

    def _create_view(self, table: Table) -> None:
        source = self._source(table)
        name = RUN_REVISIONS if table.name == "runs" else table.name
        self.con.execute(f"CREATE OR REPLACE VIEW {quote_ident(name)} AS {self._projection(table, source)}")

    def _create_views(self) -> None:
        for table in TABLES.values():
            self._create_view(table)
        self.con.execute(
            f"CREATE OR REPLACE VIEW runs AS SELECT * REPLACE (CASE WHEN status = 'running' AND run_id IN "  # noqa: S608
            f"(SELECT run_id FROM {INTERNAL}.dead_runs) THEN 'interrupted' ELSE status END AS status) "
            f"FROM {RUN_REVISIONS} "
            f"QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY revision DESC NULLS LAST) = 1"
        )
        self._check_version()
        self._load_run_order()
        self.update_liveness()

    def _source(self, table: Table) -> str:
        """The relation a view reads ``table`` from (identifiers and variable names only): every segment of the
        table, or the list of those that are not left out as unreadable."""
        if self.kind == STORE:
            assert self.store is not None
            variable = f"enb_glob_{table.name}"
            files: str | list[str] = str(self.store.parquet_root / table.name / "run_id=*" / "part-*.parquet")
            if any(path.parts[-3] == table.name for path in self.unreadable):
                files = self._listed[table.name] = self._readable_segments(table.name)
            self._set_variable(variable, files)
            return f"read_parquet(getvariable('{variable}'), {PARQUET_OPTIONS})"
        if self.kind == DUCKDB:
            return f"src.main.{quote_ident(table.name)}"
        return f"{INTERNAL}.{quote_ident('import_' + table.name)}"

    def _projection(self, table: Table, source: str, present: set[str] | None = None) -> str:
        """SELECT of every schema column in order; NULLs for columns the source lacks (``present``: its columns)."""
        if present is None:
            present = self._present_columns(table, source)
        columns = ", ".join(
            quote_ident(f.name) if f.name in present else f"NULL::{duckdb_type(f.type)} AS {quote_ident(f.name)}"
            for f in table.schema
        )
        if not present:
            return f"SELECT {columns} WHERE false"
        return f"SELECT {columns} FROM {source}"  # noqa: S608

    def _present_columns(self, table: Table, source: str) -> set[str]:
        if self.kind == STORE and not self._has_segments(table.name):
            return set()  # no segment of this table at all (a store older than the table)
        try:  # a segment that cannot be read is an error, never an empty table
            return {r[0] for r in self.con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}  # noqa: S608
        except (duckdb.CatalogException, duckdb.BinderException):
            return set()  # an audit.duckdb older than the table

    def _has_segments(self, table: str) -> bool:
        if table in self._listed:
            return bool(self._listed[table])
        assert self.store is not None
        return any(self.store.parquet_root.glob(f"{table}/run_id=*/part-*.parquet"))

    def _set_variable(self, name: str, value: str | list[str]) -> None:
        """Set a variable the views read, on the audit's connection and on every worker connection."""
        self._variables[name] = value
        for con in [self.con, *self._worker_cons]:
            con.execute(f"SET VARIABLE {name} = $value", {"value": value})

    # -- unreadable segments ------------------------------------------------------------------------
    def _segments(self, table: str = "*") -> list[Path]:
        """The segment files of ``table`` (of every table by default) now, but those left out as unreadable."""
        assert self.store is not None
        found = sorted(self.store.parquet_root.glob(f"{table}/run_id=*/part-*.parquet"))
        return [p for p in found if p not in self.unreadable]

    def _readable_segments(self, table: str) -> list[str]:
        return [str(p) for p in self._segments(table)]

    def _leave_out_unreadable(self, exc: duckdb.Error) -> bool:
        """Leave out the segments that made creating the views fail: those whose footer does not read, else the
        ``runs`` segments whose data does not (the only data read then). False when no segment is to blame."""
        if self.kind != STORE or not _is_reading_error(exc):
            return False
        found = unreadable_footers(self._segments()) or unreadable_data(self.con, self._segments("runs"))
        self.unreadable.update(found)
        return bool(found)

    def _warn_unreadable(self) -> None:
        """One AuditStoreWarning naming the segments newly left out as unreadable."""
        new = {path: reason for path, reason in self.unreadable.items() if path not in self._warned}
        if new:
            self._warned.update(new)
            warnings.warn(f"{self.path}: {_cannot_be_read(new)}. Left out of every table: helpers refuse the "
                          f"runs concerned and verify(run) reports the damage.", AuditStoreWarning, stacklevel=4)

    def unreadable_segments(self, run_id: str) -> dict[Path, str]:
        """The run's segments left out as unreadable, with what reading them said."""
        return {p: r for p, r in self.unreadable.items() if p.parent.name == f"{PARTITION_COLUMN}={run_id}"}

    def _follow_segments(self) -> None:
        """Point each view that leaves an unreadable segment out at its table's segments as they are now (a run in
        progress adds some). Not while parallel jobs run: they use the views."""
        if not self._listed or self._in_parallel:
            return
        for table, listed in list(self._listed.items()):
            if self._readable_segments(table) != listed:
                self._create_view(TABLES[table])

    def _find_unreadable(self, con: duckdb.DuckDBPyConnection, sql: str | None,
                         params: Mapping[str, Any] | Sequence[Any] | None) -> dict[Path, str]:
        """Segments a failed query read that cannot be read: the files it was given, else the segments of the
        tables it names, footers first, then the data of the runs it is restricted to."""
        segments = self._segments()
        given = [p for p in segments if str(p) in _files_given(params)]
        if given:
            return unreadable_data(con, given)
        tables = _tables_read_by(sql)
        read = [p for p in segments if p.parts[-3] in tables]
        found = unreadable_footers(read)
        if found:
            return found
        runs = _runs_read_by(params)
        partitions = None if runs is None else {f"{PARTITION_COLUMN}={r}" for r in runs}
        return unreadable_data(con, [p for p in read if partitions is None or p.parent.name in partitions])

    def _import_landscape(self) -> None:
        from elspeth_nb.audit.importers.elspeth import read_landscape

        imported = read_landscape(self.path, payloads=self.payloads)
        self.import_problems = list(imported.problems)
        self._store_tables(imported.tables)
        self._imported_order = list(imported.run_ids)

    def _check_version(self) -> None:
        newest = self.con.execute(f"SELECT max(schema_version) FROM {RUN_REVISIONS}").fetchone()  # noqa: S608
        if newest and newest[0] is not None and int(newest[0]) > SCHEMA_VERSION:
            raise SchemaVersionError(f"{self.path} holds runs written with audit schema version {newest[0]}; this "
                                     f"elspeth-nb reads up to version {SCHEMA_VERSION}. Upgrade elspeth-nb to read it.")

    def _load_run_order(self) -> None:
        """Tie-break for runs that started at the same instant: the order they landed in."""
        if self.store is not None:
            order = self.store.run_ids()
        elif self.kind in (ELSPETH, MEMORY):
            order = self._imported_order
        else:
            order = []
        self.con.execute(f"DELETE FROM {INTERNAL}.run_order")  # noqa: S608
        if order:
            self.con.executemany(f"INSERT INTO {INTERNAL}.run_order VALUES (?, ?)",  # noqa: S608
                                 [(run_id, seq) for seq, run_id in enumerate(order)])

    def update_liveness(self) -> None:
        """Runs whose latest revision says running but whose writer is gone read as interrupted."""
        if self.store is None:
            return
        running = [r[0] for r in self.rows(
            f"SELECT run_id FROM {RUN_REVISIONS} QUALIFY row_number() OVER "  # noqa: S608
            f"(PARTITION BY run_id ORDER BY revision DESC NULLS LAST) = 1 AND status = $running",
            {"running": RunStatus.RUNNING})]
        dead = [run_id for run_id in running if not self.store.is_live(run_id)]
        self.con.execute(f"DELETE FROM {INTERNAL}.dead_runs")  # noqa: S608
        if dead:
            self.con.executemany(f"INSERT INTO {INTERNAL}.dead_runs VALUES (?)", [(r,) for r in dead])  # noqa: S608

    # -- point lookups ------------------------------------------------------------------------------
    def lookup(self, table: str, run_id: str, column: str | None = None, values: Iterable[Any] = (), *,
               nulls: bool = False, names: Collection[str] | None = None) -> Lookup:
        """Where to read ``table`` for rows of ``run_id`` whose ``column`` is one of ``values`` (or NULL, if ``nulls``).

        For an audit store: only the segments whose footer statistics allow such a row (and, given
        ``names``, only those files), with the view's columns. Otherwise, and when a footer cannot be
        read, the view itself. The caller still filters on ``run_id`` and ``column``.
        """
        view = Lookup(quote_ident(table))
        if self.kind != STORE or self.segment_index is None:
            return view
        chosen = self.segment_index.select(table, run_id, column, list(values), nulls=nulls, names=names)
        if chosen is None:
            return view
        schema = TABLES[table]
        if not chosen:
            return Lookup(f"({self._projection(schema, '', set())})")
        present = set().union(*(s.columns for s in chosen)) | {PARTITION_COLUMN}
        param = f"enb_segments_{next(self._lookups)}"
        source = f"read_parquet(${param}, {PARQUET_OPTIONS})"
        return Lookup(f"({self._projection(schema, source, present)})", {param: [s.path for s in chosen]})

    def records(self, table: str, run_id: str, column: str, values: Collection[Any], *, nulls: bool = False,
                names: Collection[str] | None = None) -> pa.Table | None:
        """The run's records of ``table`` whose ``column`` is one of ``values`` (or NULL, if ``nulls``), in the
        view's columns, read straight from the segments that can hold them; None when only a query can
        answer (not an audit store, or a segment that pyarrow cannot read: the query says which)."""
        if self.segment_index is None:
            return None
        try:
            return self.segment_index.read(TABLES[table], run_id, column, values, nulls=nulls, names=names)
        except (OSError, pa.ArrowException):
            return None

    def records_at(self, table: str, run_id: str, rows: Mapping[str, Sequence[int]], column: str,
                   values: Collection[Any]) -> pa.Table | None:
        """The run's records of ``table`` at ``rows`` (segment name -> row numbers, e.g. from :meth:`payload_rows`)
        whose ``column`` is in ``values``; None when only a query can answer."""
        if self.segment_index is None:
            return None
        try:
            return self.segment_index.read_rows(TABLES[table], run_id, rows, column, values)
        except (OSError, pa.ArrowException):
            return None

    def record_counts(self, table: str, runs: Sequence[str]) -> dict[str, int]:
        """Records of ``table`` per run (runs without any are left out).

        In a store, the sum of the row counts in the footers of the run's segments (each holds
        records of its run only), which the segment index already caches; otherwise a count over the
        views (which names a segment that cannot be read).
        """
        if self.segment_index is not None:
            counts: dict[str, int] = {}
            for run in runs:
                segments = self.segment_index.segments(table, run)
                if segments is None:
                    break  # a footer that cannot be read: let DuckDB count and say what is wrong
                if segments:
                    counts[run] = sum(s.metadata.num_rows for s in segments)
            else:
                return counts
        return dict(self.rows(f"SELECT run_id, count(*) FROM {quote_ident(table)} "  # noqa: S608
                              f"WHERE list_contains($runs, run_id) GROUP BY run_id", {"runs": list(runs)}))

    def payload_rows(self, run_id: str, hashes: Sequence[str]) -> dict[str, list[int]] | None:
        """Where the run's payloads among ``hashes`` may be: segment file name -> row numbers in it; None if unknown.

        Payload hashes are random, so segment statistics cannot rule a segment out, and telling that a
        hash is *not* stored (a coalesce branch state's output, a hashes-only run) would read the hash
        column of every segment. The first call for a run keys every payload of the run by DuckDB's
        64-bit ``hash()`` of its hash, with its segment and row (16 bytes a payload, in memory, sorted
        by key); later calls add only the segments that landed since. The answer may name a row that
        holds none of ``hashes`` (a 64-bit collision: the reader checks the hash), never misses one.
        """
        if self.segment_index is None:
            return None
        current = self.segment_index.segments("payloads", run_id)
        if current is None:
            return None
        keyed, keys = self._payload_keys.get(run_id, ([], pl.DataFrame(schema=_PAYLOAD_KEYS)))
        known = {id(s) for s in keyed}
        new = [s for s in current if id(s) not in known]
        if new:
            added = self.frame("SELECT hash(payload_hash) AS key, ($first + file_index)::UINTEGER AS segment, "
                               "file_row_number::UINTEGER AS row FROM read_parquet($paths, file_row_number = true)",
                               {"first": len(keyed), "paths": [s.path for s in new]})
            keyed = keyed + new
            keys = pl.concat([keys, added]).sort("key")
            self._payload_keys[run_id] = (keyed, keys)
        if not hashes:
            return {}
        wanted = pl.Series([r[0] for r in self.rows("SELECT hash(unnest($hashes::VARCHAR[]))",
                                                    {"hashes": list(hashes)})], dtype=pl.UInt64)
        column = keys["key"]
        first, last = column.search_sorted(wanted, side="left"), column.search_sorted(wanted, side="right")
        alive = {id(s) for s in current}
        found: dict[str, list[int]] = {}
        for start, stop in zip(first, last, strict=True):
            for segment, row in keys.slice(start, stop - start).select("segment", "row").iter_rows():
                if id(keyed[segment]) in alive:
                    found.setdefault(keyed[segment].name, []).append(row)
        return found

    def parallel(self, jobs: Sequence[Callable[[duckdb.DuckDBPyConnection], _T]]) -> list[_T]:
        """Run ``jobs`` side by side, each on a connection of its own; their results in order."""
        self._follow_segments()
        if len(jobs) <= 1 or not self._worker_cons:
            return [job(self.con) for job in jobs]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=len(self._worker_cons), thread_name_prefix="elspeth-nb-read")

        def run(job: Callable[[duckdb.DuckDBPyConnection], _T]) -> _T:
            con = self._workers.get()
            try:
                return job(con)
            finally:
                self._workers.put(con)

        self._in_parallel = True
        try:
            return [f.result() for f in [self._pool.submit(run, job) for job in jobs]]
        finally:
            self._in_parallel = False

    @contextmanager
    def scratch(self, tables: Mapping[str, pa.Table]) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection of its own (no file access, UTC) where ``tables`` are registered under their names.

        For shaping small sets of records already read (one row's tree) with the same SQL as over the views.
        """
        if self._scratch is None:
            con = duckdb.connect(":memory:")
            con.execute("SET TimeZone = 'UTC'")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            self._scratch = con
        con = self._scratch
        for name, table in tables.items():
            con.register(name, table)
        try:
            yield con
        finally:
            for name in tables:
                con.unregister(name)

    # -- queries ------------------------------------------------------------------------------------
    def arrow(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None, *,
              con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
        """Run a parameterised query (on ``con``, by default the audit's connection) and return an Arrow table."""
        if con is None or con is self.con:
            self._follow_segments()
        try:
            return (con or self.con).sql(sql, params=params).to_arrow_table()
        except duckdb.Error as exc:
            self._raise_unreadable(exc, sql, params, con or self.con)
            raise

    def frame(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> pl.DataFrame:
        """Run a parameterised query and return its result as a polars DataFrame."""
        return _frame(self.arrow(sql, params))

    def frame_for(self, runs: Sequence[str], sql: str,
                  params: Mapping[str, Any] | Sequence[Any] | None = None) -> pl.DataFrame:
        """:meth:`frame` of a query that reads only records of ``runs`` (never ``runs`` itself or our bookkeeping).

        Answered by the store's audit.duckdb when it holds every one of ``runs`` exactly as the
        Parquet segments do (see :mod:`._native`); by the views otherwise, or if that copy fails.
        """
        found = self._on_copy(runs, lambda con: _frame(con.sql(sql, params=params).to_arrow_table()))
        return found if found is not None else self.frame(sql, params)

    def rows_for(self, runs: Sequence[str], sql: str,
                 params: Mapping[str, Any] | Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """:meth:`rows` of a query about ``runs`` only, read where :meth:`frame_for` reads."""
        found = self._on_copy(runs, lambda con: con.execute(sql, params if params is not None else {}).fetchall())
        return found if found is not None else self.rows(sql, params)

    def _on_copy(self, runs: Sequence[str], answer: Callable[[duckdb.DuckDBPyConnection], _T]) -> _T | None:
        """``answer`` on audit.duckdb if it holds every one of ``runs`` as on disk; None otherwise or if it fails."""
        if self.native is None:
            return None
        with self.native.reading(self._states_of(runs)) as (con, held):
            if con is None or len(held) != len(set(runs)):
                return None
            try:
                found = answer(con)
            except duckdb.Error:  # a damaged copy: the Parquet truth answers instead
                return None
            self.native_answers += 1
            return found

    def frame_by_run(self, runs: Sequence[str], sql: str) -> pl.DataFrame:
        """A query with a ``$runs`` list parameter, each result row about one run: the runs audit.duckdb holds
        answered there, the others by the views, results concatenated."""
        parts = []
        rest = list(runs)
        if self.native is not None and rest:
            with self.native.reading(self._states_of(rest)) as (con, held):
                if con is not None:
                    with suppress(duckdb.Error):
                        parts.append(_frame(con.sql(sql, params={"runs": held}).to_arrow_table()))
                        rest = [r for r in rest if r not in set(held)]
                        self.native_answers += 1
        if rest or not parts:
            parts.append(self.frame(sql, {"runs": rest}))
        return pl.concat(parts, how="vertical_relaxed")

    def _states_of(self, runs: Sequence[str]) -> dict[str, tuple[int | None, str]]:
        self.run_ids()  # brings the states up to date
        return {run: self._run_states.get(run, (None, "")) for run in runs}

    def rows(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        self._follow_segments()
        try:
            return self.con.execute(sql, params if params is not None else {}).fetchall()
        except duckdb.Error as exc:
            self._raise_unreadable(exc, sql, params)
            raise

    def _raise_unreadable(self, exc: duckdb.Error, sql: str | None = None,
                          params: Mapping[str, Any] | Sequence[Any] | None = None,
                          con: duckdb.DuckDBPyConnection | None = None, *, search: bool = True) -> None:
        """An AuditStoreError naming the files when ``exc`` comes from segments of the store that cannot be read.

        DuckDB names the file of a missing footer, not always that of a damaged footer ("invalid TType")
        or data page ("Out of buffer"): unless ``search`` is off, those are found by reading what the
        query read (see :meth:`_find_unreadable`), only now that it failed.
        """
        if self.kind != STORE or self.store is None or not _is_reading_error(exc):
            return  # a mistake in a query, not a damaged segment
        text = str(exc).splitlines()[0]
        if str(self.store.parquet_root) in text:
            named = {Path(p): text for p in re.findall(r"'([^']+\.parquet)'", text)}
            raise AuditStoreError(f"{self.path}: a segment of the audit store cannot be read: {text}",
                                  segments=named) from exc
        found = self._find_unreadable(con or self.con, sql, params) if search else {}
        if found:
            raise AuditStoreError(f"{self.path}: {_cannot_be_read(found)}", segments=found) from exc

    def run_ids(self) -> list[str]:
        """Every run id, newest first (read again only when a segment of ``runs`` came or went)."""
        signature = self._runs_signature()
        if self._run_ids is not None and self._run_ids[0] == signature:
            return list(self._run_ids[1])
        found = self.rows(
            f"SELECT r.run_id, r.revision, r.status FROM runs r LEFT JOIN {INTERNAL}.run_order o "  # noqa: S608
            f"USING (run_id) ORDER BY {NEWEST_FIRST}")
        ids = [r[0] for r in found]
        self._run_states = {run: (revision, status) for run, revision, status in found}
        self._run_ids = (signature, ids)
        return list(ids)

    def _runs_signature(self) -> object:
        """What the run list depends on: the segments of ``runs`` in a store; nothing else ever changes."""
        if self.kind != STORE or self.store is None:
            return None
        found = []
        try:
            partitions = list(os.scandir(self.store.parquet_root / "runs"))
        except FileNotFoundError:
            return ()
        for partition in partitions:
            try:
                found += [(f.path, f.stat().st_mtime_ns, f.stat().st_size) for f in os.scandir(partition.path)
                          if f.name.startswith("part-")]
            except (FileNotFoundError, NotADirectoryError):
                continue
        return tuple(sorted(found))

    def resolve_run(self, run_id: str = "latest", *, unreadable: bool = False) -> str:
        """``latest``, a run id, or a unique prefix of one -> the run id; RunNotFoundError otherwise.

        A run with segments left out as unreadable is refused with an AuditStoreError naming them, unless
        ``unreadable`` (a helper that reports the damage itself).
        """
        run = self._resolve(run_id)
        left_out = self.unreadable_segments(run)
        if left_out and not unreadable:
            raise AuditStoreError(f"{self.path}: run {run} cannot be read in full: {_cannot_be_read(left_out)}. "
                                  f"verify({run!r}) reports the damage; the other runs read as usual.",
                                  segments=left_out)
        return run

    def _resolve(self, run_id: str) -> str:
        if not isinstance(run_id, str):
            raise TypeError(f"run_id must be a string such as 'latest', not {type(run_id).__name__}")
        runs = self.run_ids()
        if not runs:
            raise RunNotFoundError("Run", run_id, [], hint=f"there are no runs in {self.path} yet; run a pipeline "
                                   f"with this audit path first")
        if run_id == "latest":
            return runs[0]
        if run_id in runs:
            return run_id
        matches = [r for r in runs if len(run_id) >= 4 and r.startswith(run_id)]
        if len(matches) == 1:
            return matches[0]
        hint = "pass run_id='latest' for the newest run, or one of these ids (a unique prefix of 4+ characters will do)"
        if len(matches) > 1:
            hint = f"the prefix matches {len(matches)} runs; give more characters"
        raise RunNotFoundError("Run", run_id, matches or runs, hint=f"runs in {self.path} are listed; {hint}")

    def close(self) -> None:
        """Close every connection (once; later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        if self.native is not None:
            self.native.close()
        if self._pool is not None:
            self._pool.shutdown()
        for con in [*self._worker_cons, *([self._scratch] if self._scratch is not None else [])]:
            con.close()
        self.con.close()


def _cannot_be_read(segments: Mapping[Path, str]) -> str:
    """``a segment ... cannot be read: <file>: <why>`` for one segment, every one of them for several."""
    listed = "; ".join(f"{path}: {reason.rstrip('.')}" for path, reason in segments.items())
    if len(segments) == 1:
        return f"a segment of the audit store cannot be read: {listed}"
    return f"{len(segments)} segments of the audit store cannot be read: {listed}"


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


_PAYLOAD_KEYS = {"key": pl.UInt64, "segment": pl.UInt32, "row": pl.UInt32}
