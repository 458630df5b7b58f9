"""The audit store folder: layout, liveness locks, and the DuckDB copy of the Parquet truth.

Layout::

    <store>/elspeth-nb-store.json                     format marker + schema version
    <store>/parquet/<table>/run_id=<id>/part-<n>.parquet   immutable segments (source of truth)
    <store>/parquet/<table>/run_id=__schema__/part-000000.parquet   empty file carrying the schema
    <store>/audit.duckdb                              the same tables, updated at the end of each run
    <store>/.locks/<run_id>.lock                      held (flock) by the process writing that run
    <store>/.locks/.import.lock                       held (flock) by the import staging and swapping runs
    <store>/.duckdb-pending/<run_id>                  runs whose DuckDB update has not happened yet
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from elspeth_nb.audit.integrity import SegmentDigest
from elspeth_nb.audit.schema import PARTITION_COLUMN, SCHEMA_VERSION, TABLES, Table
from elspeth_nb.audit.writer import partition_dir
from elspeth_nb.errors import AuditStoreError, SchemaVersionError

MANIFEST_NAME = "elspeth-nb-store.json"
STORE_FORMAT = "elspeth-nb-audit-store"
SCHEMA_PARTITION = "__schema__"
DUCKDB_NAME = "audit.duckdb"
#: The table of audit.duckdb that lists, per run, the segment files its rows were copied from (name, size,
#: mtime): a reader trusts the copy of a run only while the files on disk are still exactly those.
COPIED_SEGMENTS = "enb_copied_segments"


class DuckdbReader(Protocol):
    """Something in this process that may hold an audit.duckdb open read-only and can let go of it."""

    path: Path

    def release(self) -> None: ...


#: This process's readers of audit.duckdb files; a sync asks those of its file to let go first (DuckDB refuses
#: a read-write connection to a file this process holds read-only, and waiting would never end it).
_READERS: weakref.WeakSet[DuckdbReader] = weakref.WeakSet()


def register_reader(reader: DuckdbReader) -> None:
    """Ask ``reader`` to release its file whenever this process is about to write that file, and at exit."""
    _READERS.add(reader)


@atexit.register
def _release_all_readers() -> None:
    """Close every reader's connection before the interpreter tears down: one left to an idle timer thread
    aborted the process at exit (SIGABRT) once another native library (vl-convert, for SVG charts) was loaded."""
    for reader in list(_READERS):
        with suppress(Exception):
            reader.release()


def _release_readers(path: Path) -> None:
    for reader in list(_READERS):
        if reader.path == path:
            reader.release()


def duckdb_type(type_: pa.DataType) -> str:
    """The DuckDB column type for one of our Arrow column types."""
    if pa.types.is_string(type_):
        return "VARCHAR"
    if pa.types.is_int32(type_):
        return "INTEGER"
    if pa.types.is_int64(type_):
        return "BIGINT"
    if pa.types.is_float64(type_):
        return "DOUBLE"
    if pa.types.is_timestamp(type_):
        return "TIMESTAMPTZ"
    if pa.types.is_binary(type_):
        return "BLOB"
    if pa.types.is_list(type_):
        return duckdb_type(type_.value_type) + "[]"
    raise TypeError(f"no DuckDB type for {type_}")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def column_list(table: Table) -> str:
    return ", ".join(quote_ident(c) for c in table.columns)


@dataclass
class SyncResult:
    """What an attempt to bring audit.duckdb up to date did."""

    synced: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0
    failed: bool = False  # audit.duckdb could not be opened or written (damaged): only a rebuild helps

    @property
    def ok(self) -> bool:
        return not self.pending and not self.failed


def unreadable_footers(paths: Iterable[Path]) -> dict[Path, str]:
    """The segments among ``paths`` whose footer cannot be read, with what reading it said."""
    found = {}
    for path in paths:
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowException) as exc:
            found[path] = str(exc).splitlines()[0]
    return found


def unreadable_data(con: duckdb.DuckDBPyConnection, paths: Iterable[Path]) -> dict[Path, str]:
    """The segments among ``paths`` that DuckDB cannot read to the end (a damaged data page), with its error."""
    found = {}
    for path in paths:
        try:
            reader = con.sql("SELECT * FROM read_parquet($path)", params={"path": str(path)}).to_arrow_reader()
            for _ in reader or ():
                pass
        except (duckdb.Error, OSError, pa.ArrowException) as exc:  # raised by the query, or by a later batch
            found[path] = str(exc).splitlines()[0]
    return found


def _skipped_message(skipped: Mapping[str, str]) -> str:
    """Why runs were left out of audit.duckdb (empty when none were)."""
    if not skipped:
        return ""
    listed = "; ".join(f"run {run_id}: {why}" for run_id, why in skipped.items())
    return (f"{len(skipped)} run(s) left out of audit.duckdb and kept pending, because a segment no longer reads: "
            f"{listed}. Readers answer them from the segments that read; `elspeth-nb verify` reports the damage")


class AuditStore:
    """An audit store folder. ``AuditStore.create`` makes one; ``AuditStore.open`` checks one."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def parquet_root(self) -> Path:
        return self.root / "parquet"

    @property
    def duckdb_path(self) -> Path:
        return self.root / DUCKDB_NAME

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    # -- creation and checks --------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike[str]) -> AuditStore:
        """Create (or reuse) a store at ``root``, failing early and clearly if it is not writable."""
        store = cls(Path(root))
        if store.root.exists() and not store.root.is_dir():
            raise AuditStoreError(f"audit path {store.root} is a file, not a folder: an audit store is a folder "
                                  "(give a new or empty folder, or the store's own folder)")
        if store.root.is_dir() and not store.manifest_path.exists():
            others = sorted(p.name for p in store.root.iterdir() if not p.name.startswith("."))
            if others and not store.manifest_path.exists():  # another run may have just made the store
                # never mix a store into a folder of other files (and never claim them as a store)
                shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
                raise AuditStoreError(f"audit path {store.root} already holds other files ({shown}) and is not an "
                                      "elspeth-nb audit store; give a new or empty folder")
        try:
            store.root.mkdir(parents=True, exist_ok=True)
            probe = store.root / f".write-probe-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise AuditStoreError(
                f"audit path {store.root} is not writable ({exc.strerror or exc}); "
                "choose another folder (`audit: {path: ...}` in the settings, or --audit DIR)"
            ) from exc
        if store.manifest_path.exists():
            store.check_manifest()
        else:
            _atomic_write_text(store.manifest_path, json.dumps(
                {"format": STORE_FORMAT, "schema_version": SCHEMA_VERSION}, indent=2) + "\n")
        store.write_schema_files()
        return store

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> AuditStore:
        """Open an existing store read-only; a clear error if ``root`` is not one."""
        store = cls(Path(root))
        if not store.root.is_dir():
            raise AuditStoreError(f"{store.root} is not a directory; expected an audit store folder")
        if not store.manifest_path.exists():
            raise AuditStoreError(
                f"{store.root} is not an elspeth-nb audit store (no {MANIFEST_NAME}); "
                "pass the folder a pipeline or an import wrote (its `audit.path`, or --audit DIR)"
            )
        store.check_manifest()
        return store

    def check_manifest(self) -> dict[str, object]:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise AuditStoreError(f"{self.manifest_path} is unreadable or not JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
            raise AuditStoreError(f"{self.manifest_path} does not describe an elspeth-nb audit store")
        version = manifest.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.root} was written with audit schema version {version}; this elspeth-nb reads up to "
                f"version {SCHEMA_VERSION}. Upgrade elspeth-nb to read it."
            )
        return manifest

    def write_schema_files(self) -> None:
        """An empty segment per table, so every table is readable before any run wrote it."""
        for table in TABLES.values():
            directory = partition_dir(self.parquet_root, table.name, SCHEMA_PARTITION)
            target = directory / "part-000000.parquet"
            if target.exists() and pq.read_schema(target).names == table.file_columns:
                continue
            directory.mkdir(parents=True, exist_ok=True)
            temporary = directory / f".part-000000.parquet.{uuid.uuid4().hex[:12]}.tmp"  # runs may start together
            pq.write_table(table.file_schema.empty_table(), temporary, compression="zstd")
            os.replace(temporary, target)

    # -- what is on disk -----------------------------------------------------------------------
    def orphaned_runs(self) -> dict[str, list[str]]:
        """Run ids with records in some table but no ``runs`` segment -> those tables (a removed run partition).

        Such a run is invisible to every helper, so a store that shows none of its records is no proof it was
        never there.
        """
        known = set(self.run_ids())
        found: dict[str, list[str]] = {}
        for name in TABLES:
            directory = self.parquet_root / name
            if name == "runs" or not directory.is_dir():
                continue
            for partition in sorted(directory.iterdir()):
                run_id = partition.name.split("=", 1)[1] if partition.name.startswith(f"{PARTITION_COLUMN}=") else None
                if run_id not in (None, SCHEMA_PARTITION) and run_id not in known and \
                        any(partition.glob("part-*.parquet")):
                    found.setdefault(run_id, []).append(name)
        return found

    def run_ids(self) -> list[str]:
        """Run ids with at least one segment in the ``runs`` table, oldest partition first."""
        runs_dir = self.parquet_root / "runs"
        if not runs_dir.is_dir():
            return []
        found = []
        for p in runs_dir.iterdir():
            if p.is_dir() and p.name.startswith(f"{PARTITION_COLUMN}="):
                run_id = p.name.split("=", 1)[1]
                if run_id != SCHEMA_PARTITION:
                    found.append((p.stat().st_mtime, run_id))
        return [run_id for _, run_id in sorted(found)]

    def segment_glob(self, table: str, run_id: str | None = None) -> str:
        """Glob of a table's segments (one run, or all runs)."""
        part = f"{PARTITION_COLUMN}={run_id}" if run_id else f"{PARTITION_COLUMN}=*"
        return str(self.parquet_root / table / part / "part-*.parquet")

    def parquet_bytes(self, run_id: str | None = None) -> int:
        total = 0
        for table in TABLES:
            base = self.parquet_root / table
            dirs = [partition_dir(self.parquet_root, table, run_id)] if run_id else list(base.glob("run_id=*"))
            for d in dirs:
                if d.is_dir():
                    total += sum(f.stat().st_size for f in d.glob("part-*.parquet"))
        return total

    def read_partition(self, table: str, run_id: str, columns: list[str] | None = None) -> pa.Table:
        """Every segment of one table for one run, in part-file order (the file schema, no run_id; only
        ``columns`` if given)."""
        directory = partition_dir(self.parquet_root, table, run_id)
        files = sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []
        schema = TABLES[table].file_schema
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        return pa.concat_tables([read_segment(f, schema) for f in files]) if files else schema.empty_table()

    def segment_digests(self, run_id: str) -> list[SegmentDigest]:
        """The run's segment digests (the leaves of its Merkle root), without their fingerprints (8 bytes a record)."""
        rows = self.read_partition("segment_digests", run_id, ["table_name", "part_file", "record_count",
                                                               "file_sha256", "fingerprints_sha256"]).to_pylist()
        return [SegmentDigest(**row) for row in rows]

    # -- liveness ----------------------------------------------------------------------------------
    def lock_path(self, run_id: str) -> Path:
        return self.root / ".locks" / f"{run_id}.lock"

    @contextmanager
    def writing(self, run_id: str) -> Iterator[None]:
        """Hold the run's lock file while writing it; the OS drops it if the process dies."""
        path = self.lock_path(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:  # another process writes this run: its lock file is not ours to remove
            os.close(fd)
            raise
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)

    @contextmanager
    def importing(self) -> Iterator[None]:
        """Hold the store's import lock: one import at a time stages, recovers and swaps partitions.

        Two imports at once deleted or rolled forward each other's staging folders and raced on the same
        partitions. The second waits here until the first is done; the OS drops the lock if a process dies.
        """
        path = self.root / ".locks" / ".import.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def is_live(self, run_id: str) -> bool:
        """True while some process holds the run's lock (the run is really still running)."""
        path = self.lock_path(run_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    # -- the DuckDB copy ------------------------------------------------------------------------
    def pending_dir(self) -> Path:
        return self.root / ".duckdb-pending"

    def pending_runs(self) -> list[str]:
        d = self.pending_dir()
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def sync_waiting_path(self) -> Path:
        """Present while a sync waits for readers to let go of audit.duckdb; readers seeing it read Parquet."""
        return self.root / ".duckdb-sync-waiting"

    def sync_waiting(self, max_age_s: float = 60.0) -> bool:
        """True while a sync waits for audit.duckdb (a marker older than ``max_age_s`` is a dead sync's)."""
        try:
            return time.time() - self.sync_waiting_path().stat().st_mtime < max_age_s
        except FileNotFoundError:
            return False

    def mark_pending(self, run_id: str) -> None:
        self.pending_dir().mkdir(parents=True, exist_ok=True)
        (self.pending_dir() / run_id).touch()

    def sync_duckdb(self, run_ids: Iterable[str], *, attempts: int = 7, wait_s: float = 0.1) -> SyncResult:
        """Copy the runs' Parquet rows into audit.duckdb, replacing what it held for them.

        A reader holding the file blocks the write. Readers in this process are asked to let go; those
        of other processes see :meth:`sync_waiting` at their next query and an idle audit lets go within
        a second. We retry ``attempts`` times over about ``wait_s * 2**attempts`` seconds, then leave
        the runs marked pending (the next sync or ``elspeth-nb rebuild`` picks them up) and say so.
        """
        wanted = list(dict.fromkeys([*self.pending_runs(), *run_ids]))
        started = time.perf_counter()
        for mark in wanted:
            self.mark_pending(mark)
        try:
            con, last_error, held = self._connect_for_writing(attempts, wait_s)
        finally:
            self.sync_waiting_path().unlink(missing_ok=True)
        if con is not None:
            try:
                _configure(con, self.root / ".duckdb-tmp")
                self._ensure_tables(con)
                wanted += self._runs_missing_from(con, wanted)
                copied, skipped = self._copy_runs(con, wanted)
                self._list_copied_segments_of_older_runs(con)
            except duckdb.Error as exc:
                if not damaged_file(exc):  # out of memory, a bug: not something a rebuild would fix
                    raise
                last_error, held = exc, False  # a damaged file: say so, the segments stay the truth
            else:
                con.close()
                for run_id in copied:  # only once the file is released: no marker means readable now
                    (self.pending_dir() / run_id).unlink(missing_ok=True)
                return SyncResult(synced=copied, pending=list(skipped), seconds=time.perf_counter() - started,
                                  message=_skipped_message(skipped))
            finally:
                con.close()
        then = (f"`elspeth-nb sync --audit {self.root}` (or the next run) brings audit.duckdb up to date once it is "
                "free" if held else f"`elspeth-nb rebuild --audit {self.root}` recreates audit.duckdb from them")
        return SyncResult(
            pending=wanted,
            seconds=time.perf_counter() - started,
            message=(f"{self.duckdb_path} {'is held by another process' if held else 'cannot be opened or written'} "
                     f"({str(last_error).splitlines()[0]}); the Parquet segments are complete and {len(wanted)} "
                     f"run(s) are marked pending: {then}"),
            failed=not held,
        )

    def _runs_missing_from(self, con: duckdb.DuckDBPyConnection, wanted: Sequence[str]) -> list[str]:
        """Finished runs on disk that audit.duckdb does not hold at all (a deleted or new file), oldest first."""
        held = {r for (r,) in con.execute("SELECT DISTINCT run_id FROM runs").fetchall()}
        return [r for r in self.run_ids() if r not in held and r not in wanted and not self.is_live(r)]

    def _connect_for_writing(self, attempts: int, wait_s: float
                             ) -> tuple[duckdb.DuckDBPyConnection | None, Exception | None, bool]:
        """(connection, None, True) once audit.duckdb opens for writing, else (None, last error, whether held)."""
        last_error: Exception | None = None
        for attempt in range(attempts):
            _release_readers(self.duckdb_path)
            try:
                return duckdb.connect(str(self.duckdb_path)), None, True
            except duckdb.ConnectionException as exc:  # held read-only in this process by a reader not registered
                last_error = exc
            except duckdb.IOException as exc:  # another process holds the file
                if "lock" not in str(exc).lower():  # not held but unreadable (damaged): waiting will not help
                    return None, exc, False
                last_error = exc
            except duckdb.Error as exc:
                if damaged_file(exc):  # a corrupt block: waiting will not help either
                    return None, exc, False
                raise
            self.sync_waiting_path().touch()
            time.sleep(wait_s * (2**attempt))
        return None, last_error, True

    def update_duckdb(self, run_ids: Sequence[str], when: bool | str) -> SyncResult:
        """Bring audit.duckdb up to date for finished runs: now (True), in a detached process
        (``"background"``), or not (False: the runs stay pending for ``elspeth-nb sync``).
        ``message`` says what happened; ``seconds`` is the time of an update made now."""
        check_duckdb_update(when)
        if when == "background":
            return SyncResult(pending=list(run_ids), message=self.sync_duckdb_in_background(run_ids))
        if not when:
            for run_id in run_ids:
                self.mark_pending(run_id)
            return SyncResult(pending=list(run_ids), message=(
                f"not updated: {len(run_ids)} run(s) pending until `elspeth-nb sync --audit {self.root}`"))
        pa.default_memory_pool().release_unused()  # hand the caller's freed Arrow buffers back before DuckDB's
        result = self.sync_duckdb(run_ids)
        result.message = result.message or f"up to date ({result.seconds:.2f}s)"
        return result

    def sync_duckdb_in_background(self, run_ids: Iterable[str]) -> str:
        """Mark the runs pending and start a detached ``elspeth-nb sync`` that brings audit.duckdb up to date."""
        for run_id in run_ids:
            self.mark_pending(run_id)
        log = str(self.root / ".duckdb-sync.log")
        appending = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        pid = os.posix_spawn(  # detached: no Popen object to wait for, its own session
            sys.executable, [sys.executable, "-m", "elspeth_nb.cli", "sync", "--audit", str(self.root)], os.environ,
            setsid=True, file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                       (os.POSIX_SPAWN_OPEN, 1, log, appending, 0o644),
                                       (os.POSIX_SPAWN_DUP2, 1, 2)])
        return (f"updating in the background (process {pid}); the run is listed in "
                f"{self.pending_dir()} until audit.duckdb holds it")

    def rebuild_duckdb(self) -> SyncResult:
        """Recreate audit.duckdb from the Parquet segments of every run."""
        temporary = self.root / f".{DUCKDB_NAME}.rebuild"
        for p in (temporary, Path(str(temporary) + ".wal")):
            p.unlink(missing_ok=True)
        started = time.perf_counter()
        runs = self.run_ids()
        con = duckdb.connect(str(temporary))
        try:
            _configure(con, self.root / ".duckdb-tmp")
            self._ensure_tables(con)
            copied, skipped = self._copy_runs(con, runs)
        except BaseException:
            con.close()
            temporary.unlink(missing_ok=True)
            raise
        con.close()
        os.replace(temporary, self.duckdb_path)
        Path(str(self.duckdb_path) + ".wal").unlink(missing_ok=True)
        for run_id in skipped:
            self.mark_pending(run_id)
        for run_id in self.pending_runs():
            if run_id not in skipped:
                (self.pending_dir() / run_id).unlink(missing_ok=True)
        return SyncResult(synced=copied, pending=list(skipped), seconds=time.perf_counter() - started,
                          message=_skipped_message(skipped))

    def _copy_runs(self, con: duckdb.DuckDBPyConnection, run_ids: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """Copy each run; one with a segment that no longer reads is left out (run -> why), the others go on.

        Its segments stay the truth: readers answer it from Parquet, leaving the damaged file out, and
        ``verify`` names the file. Any other error is raised.
        """
        copied: list[str] = []
        skipped: dict[str, str] = {}
        for run_id in run_ids:
            try:
                self._copy_run(con, run_id)
            except duckdb.Error:
                damaged = self.unreadable_segments(run_id, con)
                if not damaged:
                    raise
                path, why = next(iter(damaged.items()))
                skipped[run_id] = f"{path} does not read ({why})"
                self._drop_run(con, run_id)  # the other lane may have committed its tables
                continue
            copied.append(run_id)
        return copied, skipped

    @staticmethod
    def _drop_run(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
        """Remove every row of the run from audit.duckdb: a run is there whole or not at all."""
        for table in TABLES:
            con.execute(f"DELETE FROM {quote_ident(table)} WHERE run_id = $run_id", {"run_id": run_id})  # noqa: S608
        con.execute(f"DELETE FROM {COPIED_SEGMENTS} WHERE run_id = $run_id", {"run_id": run_id})  # noqa: S608

    def unreadable_segments(self, run_id: str, con: duckdb.DuckDBPyConnection) -> dict[Path, str]:
        """Segment files of the run that do not read (footer first, then data pages), with the reader's first line."""
        paths = [path for table in TABLES for path in sorted(partition_dir(self.parquet_root, table, run_id)
                                                             .glob("part-*.parquet"))]
        return unreadable_footers(paths) or unreadable_data(con, paths)

    def _ensure_tables(self, con: duckdb.DuckDBPyConnection) -> None:
        existing = {
            (t, c) for t, c in con.execute(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'main'"
            ).fetchall()
        }
        tables = {t for t, _ in existing}
        con.execute(f"CREATE TABLE IF NOT EXISTS {COPIED_SEGMENTS} (run_id VARCHAR, table_name VARCHAR, "
                    "file VARCHAR, size BIGINT, mtime_ns BIGINT)")
        for table in TABLES.values():
            if table.name not in tables:
                cols = ", ".join(f"{quote_ident(f.name)} {duckdb_type(f.type)}" for f in table.schema)
                con.execute(f"CREATE TABLE {quote_ident(table.name)} ({cols})")
                continue
            for f in table.schema:  # a newer schema only adds columns at the end
                if (table.name, f.name) not in existing:
                    con.execute(
                        f"ALTER TABLE {quote_ident(table.name)} ADD COLUMN {quote_ident(f.name)} {duckdb_type(f.type)}"
                    )

    def segment_files(self, run_id: str) -> set[tuple[str, str, int, int]]:
        """(table, file name, size, mtime_ns) of each segment of the run: what its audit.duckdb copy is checked by."""
        found = set()
        for table in TABLES:
            with suppress(FileNotFoundError), os.scandir(partition_dir(self.parquet_root, table, run_id)) as entries:
                for entry in entries:
                    if entry.name.startswith("part-") and entry.name.endswith(".parquet"):
                        info = entry.stat()
                        found.add((table, entry.name, info.st_size, info.st_mtime_ns))
        return found

    def _list_copied_segments_of_older_runs(self, con: duckdb.DuckDBPyConnection) -> None:
        """List the segment files of runs copied before copies were listed, so readers keep using their copy.

        Such a run is listed only when it is trusted as before: not pending and the same latest revision in
        the file as on disk. Anything else stays unlisted, and is read from its segments until a rebuild.
        """
        unlisted = [r for (r,) in con.execute(
            f"SELECT DISTINCT run_id FROM runs WHERE run_id NOT IN (SELECT run_id FROM {COPIED_SEGMENTS})"  # noqa: S608
        ).fetchall()]
        if not unlisted:
            return
        on_disk = latest_run_rows(self, unlisted)
        copied = dict(con.execute("SELECT run_id, max(revision) FROM runs GROUP BY run_id").fetchall())
        pending = set(self.pending_runs())
        rows = [(run_id, *f) for run_id in unlisted if run_id not in pending and run_id in on_disk
                and copied.get(run_id) == on_disk[run_id]["revision"] for f in sorted(self.segment_files(run_id))]
        if rows:
            con.executemany(f"INSERT INTO {COPIED_SEGMENTS} VALUES ($1, $2, $3, $4, $5)", rows)  # noqa: S608

    def _copy_run(self, con: duckdb.DuckDBPyConnection, run_id: str) -> None:
        """Replace the run's rows in every table, two tables at a time (each on its own cursor).

        The segment files are listed first: one changed while it is copied no longer matches the list,
        so readers fall back to the segments rather than trust the copy.
        """
        files = sorted(self.segment_files(run_id))
        tables = sorted(TABLES.values(), key=lambda t: -self._segment_bytes(t.name, run_id))
        lanes: list[list[Table]] = [[], []]
        weights = [0, 0]
        for table in tables:  # largest first, onto the lighter lane
            lane = weights.index(min(weights))
            lanes[lane].append(table)
            weights[lane] += self._segment_bytes(table.name, run_id)
        errors: list[BaseException] = []

        def copy(lane: list[Table]) -> None:
            cursor = con.cursor()
            try:
                cursor.execute("BEGIN TRANSACTION")
                for table in lane:
                    self._copy_table(cursor, table, run_id)
                cursor.execute("COMMIT")
            except BaseException as exc:
                errors.append(exc)  # first: a failed commit has already ended the transaction
                with suppress(duckdb.Error):
                    cursor.execute("ROLLBACK")
            finally:
                cursor.close()

        threads = [threading.Thread(target=copy, args=(lane,)) for lane in lanes if lane]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        con.execute(f"DELETE FROM {COPIED_SEGMENTS} WHERE run_id = $run_id", {"run_id": run_id})  # noqa: S608
        if files:
            con.executemany(f"INSERT INTO {COPIED_SEGMENTS} VALUES ($1, $2, $3, $4, $5)",  # noqa: S608
                            [(run_id, *f) for f in files])

    def _copy_table(self, cursor: duckdb.DuckDBPyConnection, table: Table, run_id: str) -> None:
        """Replace one table's rows of the run, one segment file at a time (memory stays bounded)."""
        name = quote_ident(table.name)
        cursor.execute(f"DELETE FROM {name} WHERE run_id = $run_id", {"run_id": run_id})  # noqa: S608 - schema identifier
        source = partition_dir(self.parquet_root, table.name, run_id)
        files = sorted(source.glob("part-*.parquet")) if source.is_dir() else []
        if table.name == "runs":  # the latest revision comes from all segments at once
            files = [source / "part-*.parquet"] if files else []
        for path in files:
            cursor.execute(
                f"INSERT INTO {name} ({column_list(table)}) {_run_select(table)}",
                {"glob": str(path), "run_id": run_id},
            )
        if table.name == "payloads":
            cursor.execute(DEDUPLICATE_PAYLOADS, {"run_id": run_id})

    def _segment_bytes(self, table: str, run_id: str) -> int:
        source = partition_dir(self.parquet_root, table, run_id)
        return sum(f.stat().st_size for f in source.glob("part-*.parquet")) if source.is_dir() else 0


#: Keep one row per content hash of a run: workers and a recorder's bounded window can store a payload twice.
#: Grouping on a 64-bit hash of the hash keeps memory small; only the few candidates are compared in full.
DEDUPLICATE_PAYLOADS = """
    WITH repeated AS (SELECT hash(payload_hash) AS h FROM payloads WHERE run_id = $run_id
                      GROUP BY h HAVING count(*) > 1),
         candidates AS (SELECT rowid AS rid, payload_hash FROM payloads
                        WHERE run_id = $run_id AND hash(payload_hash) IN (SELECT h FROM repeated)),
         extra AS (SELECT rid FROM (SELECT rid, row_number() OVER (PARTITION BY payload_hash ORDER BY rid) AS n
                                    FROM candidates) WHERE n > 1)
    DELETE FROM payloads WHERE rowid IN (SELECT rid FROM extra)
"""


def damaged_file(exc: duckdb.Error) -> bool:
    """Whether ``exc`` says a file DuckDB reads is damaged, not the query wrong (a bad checksum: its base class)."""
    return type(exc) is duckdb.Error or isinstance(exc, duckdb.IOException | duckdb.InternalException)


def _run_select(table: Table) -> str:
    """SELECT of one run's segments (parameters $glob and $run_id) in table column order."""
    cols = ", ".join("$run_id::VARCHAR AS run_id" if c == PARTITION_COLUMN else quote_ident(c) for c in table.columns)
    source = "read_parquet($glob, union_by_name = true)"
    if table.name == "runs":  # keep the latest revision only
        return f"SELECT {cols} FROM (SELECT * FROM {source} ORDER BY revision DESC LIMIT 1)"  # noqa: S608
    return f"SELECT {cols} FROM {source}"  # noqa: S608


def _configure(con: duckdb.DuckDBPyConnection, spill: Path) -> None:
    con.execute("SET threads = 1")  # parallelism comes from copying two tables at once
    con.execute("SET memory_limit = '512MB'")
    con.execute("SET temp_directory = $dir", {"dir": str(spill)})  # large runs spill rather than fail
    con.execute("SET preserve_insertion_order = true")


def read_segment(path: Path, schema: pa.Schema | None = None) -> pa.Table:
    """One segment file, or an AuditStoreError that names it when it cannot be read (damaged, truncated)."""
    try:
        return pq.read_table(path, schema=schema, columns=schema.names if schema is not None else None)
    except (OSError, pa.ArrowException) as exc:
        raise AuditStoreError(f"segment {path} of the audit store cannot be read: {exc}") from exc


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def latest_run_rows(store: AuditStore, run_ids: Iterable[str] | None = None) -> dict[str, dict[str, object]]:
    """The latest ``runs`` revision of every run on disk (or of ``run_ids``), as Python dicts keyed by run id."""
    latest: dict[str, dict[str, object]] = {}
    for run_id in store.run_ids() if run_ids is None else run_ids:
        directory = partition_dir(store.parquet_root, "runs", run_id)
        files = sorted(directory.glob("part-*.parquet"))
        if not files:
            continue
        rows = pa.concat_tables([read_segment(f) for f in files]).to_pylist()
        best = max(rows, key=lambda r: int(r["revision"] or 0))
        latest[run_id] = best
    return latest


#: What ``update_duckdb`` (and ``sync_duckdb=`` of run_pipeline and import_into_store) accepts.
DUCKDB_UPDATES = (True, False, "background")


def check_duckdb_update(when: object) -> None:
    """Refuse a ``sync_duckdb`` value other than True, False or ``"background"`` before any work starts."""
    if not any(when is choice or (isinstance(choice, str) and when == choice) for choice in DUCKDB_UPDATES):
        raise ValueError(f"sync_duckdb: expected True, False or 'background', got {when!r}")


def _dead_runs(store: AuditStore) -> dict[str, dict[str, object]]:
    """Latest revisions of the runs that say running while no process holds their lock.

    A writer releases its lock only after its final revision is on disk, so a run found not live
    is read again: one that finished between the first read and the lock check is not dead.
    """
    candidates = [run_id for run_id, row in latest_run_rows(store).items()
                  if row["status"] == "running" and not store.is_live(run_id)]
    if not candidates:
        return {}
    latest = latest_run_rows(store)
    return {run_id: latest[run_id] for run_id in candidates if latest[run_id]["status"] == "running"}


def interrupted_runs(store: AuditStore) -> list[str]:
    """Runs whose latest revision says running but whose writer process is gone."""
    return list(_dead_runs(store))


def mark_interrupted(store: AuditStore, found_by: str) -> list[str]:
    """Append an ``interrupted`` revision for every run whose writer died and delete the segment files
    dead writers never finished; returns the interrupted run ids."""
    from elspeth_nb.audit.schema import RUNS, RunStatus
    from elspeth_nb.audit.writer import ParquetSegmentWriter

    stale = _dead_runs(store)
    writer = ParquetSegmentWriter(store.parquet_root)
    for run_id, latest in stale.items():
        row = dict(latest)
        row.update(status=RunStatus.INTERRUPTED, revision=int(row["revision"] or 0) + 1,  # type: ignore[call-overload]
                   error_message=f"the writing process ended before the run finished (found by {found_by})")
        row.pop(PARTITION_COLUMN, None)
        writer.write_segment(RUNS, run_id, pa.Table.from_pylist([row], schema=RUNS.file_schema))
    writer.close()
    _remove_unfinished_segments(store)
    return list(stale)


def _remove_unfinished_segments(store: AuditStore) -> None:
    """Delete the never-visible segment files dead writers left behind, and partitions left empty by that.

    This includes a writer killed before its run's first ``runs`` revision became visible: such a run is
    not in the runs table at all, so only its lock (not held) tells it apart from a run being written.
    """
    for leftover in store.parquet_root.glob(f"*/{PARTITION_COLUMN}=*/.part-*.tmp"):
        run_id = leftover.parent.name.split("=", 1)[1]
        if run_id == SCHEMA_PARTITION or store.is_live(run_id):
            continue
        leftover.unlink(missing_ok=True)
        with suppress(OSError):  # not empty: the dead writer's visible segments stay
            leftover.parent.rmdir()
