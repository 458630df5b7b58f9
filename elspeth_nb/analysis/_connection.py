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
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from elspeth_nb.audit.schema import SCHEMA_VERSION, TABLES, RunStatus, Table
from elspeth_nb.audit.store import DUCKDB_NAME, MANIFEST_NAME, AuditStore, duckdb_type, mark_interrupted, quote_ident
from elspeth_nb.errors import AuditStoreError, RunNotFoundError, SchemaVersionError

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


class Database:
    """The connection, where it reads from, and the few queries every helper needs."""

    def __init__(self, path: Path, kind: str, *, payloads: Path | None = None) -> None:
        self.path = path
        self.kind = kind
        self.payloads = payloads
        self.store: AuditStore | None = None
        self.import_problems: list[str] = []
        self.con = duckdb.connect(":memory:")
        self.con.execute("SET TimeZone = 'UTC'")
        self.con.execute("SET parquet_metadata_cache = true")  # segments are immutable: their footers never change
        self.con.execute(f"CREATE SCHEMA {INTERNAL}")
        self.con.execute(f"CREATE TABLE {INTERNAL}.run_order (run_id VARCHAR, seq INTEGER)")
        self.con.execute(f"CREATE TABLE {INTERNAL}.dead_runs (run_id VARCHAR)")

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, payloads: str | os.PathLike[str] | None = None,
             mark_interrupted_runs: bool = False) -> Database:
        where = Path(path).expanduser()
        kind = detect_kind(where)
        if payloads is not None and kind != ELSPETH:
            raise ValueError(f"payloads= is the payload folder of an ELSPETH Landscape; {where} is an elspeth-nb "
                             f"{'audit store' if kind == STORE else 'audit.duckdb'}, whose payloads are inside it")
        db = cls(where.resolve(), kind, payloads=Path(payloads).resolve() if payloads is not None else None)
        try:
            if kind == STORE:
                db.store = AuditStore.open(db.path)
                if mark_interrupted_runs:
                    mark_interrupted(db.store, found_by="open_audit(mark_interrupted=True)")
            elif kind == DUCKDB:
                db._attach()
            db._load()
            db._lock()
        except BaseException:
            db.con.close()
            raise
        return db

    @classmethod
    def from_tables(cls, tables: Mapping[str, Any]) -> Database:
        """A database over in-memory Arrow tables of our schema (a MemoryWriter's, an import's)."""
        db = cls(Path("<memory>"), MEMORY)
        try:
            db._store_tables(tables)
            db._load()
            db._lock()
        except BaseException:
            db.con.close()
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
        """Re-create the views (new columns, new tables), re-read run order and writer liveness."""
        self._load()

    def _load(self) -> None:
        if self.kind == ELSPETH:
            self._import_landscape()
        for table in TABLES.values():
            source = self._source(table)
            name = RUN_REVISIONS if table.name == "runs" else table.name
            self.con.execute(f"CREATE OR REPLACE VIEW {quote_ident(name)} AS {self._projection(table, source)}")
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
        """The relation a view reads ``table`` from (identifiers and variable names only)."""
        if self.kind == STORE:
            assert self.store is not None
            variable = f"enb_glob_{table.name}"
            glob = str(self.store.parquet_root / table.name / "run_id=*" / "part-*.parquet")
            self.con.execute(f"SET VARIABLE {variable} = $glob", {"glob": glob})
            return (f"read_parquet(getvariable('{variable}'), hive_partitioning = true, union_by_name = true, "
                    f"hive_types = {{'run_id': VARCHAR}})")
        if self.kind == DUCKDB:
            return f"src.main.{quote_ident(table.name)}"
        return f"{INTERNAL}.{quote_ident('import_' + table.name)}"

    def _projection(self, table: Table, source: str) -> str:
        """SELECT of every schema column in order; NULLs for columns the source lacks."""
        try:
            present = {r[0] for r in self.con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}  # noqa: S608
        except (duckdb.IOException, duckdb.CatalogException, duckdb.BinderException):
            present = set()  # no segment of this table at all (a store older than the table)
        columns = ", ".join(
            quote_ident(f.name) if f.name in present else f"NULL::{duckdb_type(f.type)} AS {quote_ident(f.name)}"
            for f in table.schema
        )
        if not present:
            return f"SELECT {columns} WHERE false"
        return f"SELECT {columns} FROM {source}"  # noqa: S608

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
        running = [r[0] for r in self.con.execute(
            f"SELECT run_id FROM {RUN_REVISIONS} QUALIFY row_number() OVER "  # noqa: S608
            f"(PARTITION BY run_id ORDER BY revision DESC NULLS LAST) = 1 AND status = $running",
            {"running": RunStatus.RUNNING}).fetchall()]
        dead = [run_id for run_id in running if not self.store.is_live(run_id)]
        self.con.execute(f"DELETE FROM {INTERNAL}.dead_runs")  # noqa: S608
        if dead:
            self.con.executemany(f"INSERT INTO {INTERNAL}.dead_runs VALUES (?)", [(r,) for r in dead])  # noqa: S608

    # -- queries ------------------------------------------------------------------------------------
    def frame(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> pl.DataFrame:
        """Run a parameterised query and return its result as a polars DataFrame."""
        relation = self.con.sql(sql, params=params)
        frame = pl.from_arrow(relation.to_arrow_table())
        assert isinstance(frame, pl.DataFrame)
        return frame

    def rows(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        return self.con.execute(sql, params if params is not None else {}).fetchall()

    def run_ids(self) -> list[str]:
        """Every run id, newest first."""
        return [r[0] for r in self.rows(
            f"SELECT r.run_id FROM runs r LEFT JOIN {INTERNAL}.run_order o USING (run_id) "  # noqa: S608
            f"ORDER BY {NEWEST_FIRST}")]

    def resolve_run(self, run_id: str = "latest") -> str:
        """``latest``, a run id, or a unique prefix of one -> the run id; RunNotFoundError otherwise."""
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
        self.con.close()
