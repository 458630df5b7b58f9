"""Finished runs read from ``audit.duckdb``, the store's native copy, instead of their Parquet segments.

DuckDB's own storage answers whole-run aggregates several times faster than Parquet. A run is read
there only while that copy equals the Parquet truth: the file opens read-only (so no writer holds
it and none can start), the run is finished, has no pending marker, its latest revision there is its
latest revision on disk, and its segment files are still the ones copied (same names, sizes and
modification times: a segment rewritten by hand is noticed). Anything else reads Parquet, as before.

The file is held only while queries run and for ``idle_s`` after the last one, so a pipeline's
end-of-run update, which needs the file to itself and retries, is kept out for at most that long
after a query (issue 5: readers never lock writers out).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import duckdb

from elspeth_nb.audit.schema import TABLES, RunStatus
from elspeth_nb.audit.store import COPIED_SEGMENTS, AuditStore, register_reader

#: Seconds the file stays open after the last query (a burst of notebook calls shares one connection).
IDLE_S = 1.0


class NativeCopy:
    """A read-only connection to a store's audit.duckdb, opened on demand and closed when idle."""

    def __init__(self, store: AuditStore, idle_s: float = IDLE_S) -> None:
        self.store = store
        self.path = store.duckdb_path
        self.idle_s = idle_s
        self._lock = threading.RLock()
        self._con: duckdb.DuckDBPyConnection | None = None
        #: run id -> latest revision held by the open file (it cannot change while the file is open)
        self._revisions: dict[str, int] = {}
        #: run id -> the segment files its copy was made from, as the open file lists them
        self._copied: dict[str, set[tuple[str, str, int, int]]] = {}
        #: run id -> whether its segment files on disk are still those (checked once per opening)
        self._unchanged: dict[str, bool] = {}
        self._last_used = 0.0
        self._timer: threading.Timer | None = None
        self._closed = False
        register_reader(self)

    @contextmanager
    def reading(self, runs: Mapping[str, tuple[int | None, str]]
                ) -> Iterator[tuple[duckdb.DuckDBPyConnection | None, list[str]]]:
        """The open file and those of ``runs`` (run id -> latest (revision, status) on disk) it holds as on disk.

        The connection is None when the file cannot be read or holds none of them. The file stays
        held until the block ends, so what was checked stays true while it is read.
        """
        with self._lock:
            waiting = self.store.sync_waiting()
            if waiting:  # a writer waits for the file: let go, the segments answer
                self._release()
            con = None if waiting else self._open()
            try:
                held = self._held(runs) if con is not None else []
                yield (con if held else None), held
            finally:
                self._last_used = time.monotonic()
                self._schedule_close()

    def _open(self) -> duckdb.DuckDBPyConnection | None:
        if self._con is not None:
            return self._con
        if self._closed or not self.path.exists():
            return None
        try:
            con = duckdb.connect(str(self.path), read_only=True)
        except duckdb.Error:  # held by a writer, or damaged: the Parquet truth answers instead
            return None
        try:
            con.execute("SET TimeZone = 'UTC'")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            if not _same_columns(con):
                con.close()
                return None
            self._revisions = dict(con.execute(
                "SELECT run_id, max(revision) FROM runs WHERE revision IS NOT NULL GROUP BY run_id").fetchall())
            self._copied, self._unchanged = {}, {}
            for run_id, *segment in con.execute(
                    f"SELECT run_id, table_name, file, size, mtime_ns FROM {COPIED_SEGMENTS}").fetchall():  # noqa: S608
                self._copied.setdefault(run_id, set()).add(tuple(segment))
        except duckdb.Error:
            con.close()
            return None
        self._con = con
        return con

    def _held(self, runs: Mapping[str, tuple[int | None, str]]) -> list[str]:
        pending = set(self.store.pending_runs())
        return [run_id for run_id, (revision, status) in runs.items()
                if revision is not None and status != RunStatus.RUNNING and run_id not in pending
                and self._revisions.get(run_id) == revision and self._segments_unchanged(run_id)]

    def _segments_unchanged(self, run_id: str) -> bool:
        """True when the run's segment files are exactly those its copy was made from (a file rewritten is not)."""
        if run_id not in self._unchanged:
            self._unchanged[run_id] = self._copied.get(run_id) == self.store.segment_files(run_id)
        return self._unchanged[run_id]

    def _schedule_close(self) -> None:
        if self._con is not None and self._timer is None:
            self._timer = threading.Timer(self.idle_s, self._close_if_idle)
            self._timer.daemon = True
            self._timer.start()

    def _close_if_idle(self) -> None:
        with self._lock:
            self._timer = None
            idle = time.monotonic() - self._last_used
            if idle >= self.idle_s:
                self._release()
            else:
                self._timer = threading.Timer(self.idle_s - idle, self._close_if_idle)
                self._timer.daemon = True
                self._timer.start()

    def _release(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
            self._revisions, self._copied, self._unchanged = {}, {}, {}

    @property
    def is_open(self) -> bool:
        """True while the file is held (during queries and up to ``idle_s`` after)."""
        return self._con is not None

    def release(self) -> None:
        """Let go of the file now (a sync in this process is about to write it); it is opened again when needed."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.release()


def _same_columns(con: duckdb.DuckDBPyConnection) -> bool:
    """True when every audit table is in the file with exactly our schema's columns, in order."""
    found: dict[str, list[str]] = {}
    for table, column in con.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'main' "
            "ORDER BY table_name, ordinal_position").fetchall():
        found.setdefault(table, []).append(column)
    return all(found.get(name) == list(table.columns) for name, table in TABLES.items())
