"""Which segment files of a store can hold a key, and their records: Parquet footers, read once per file.

A point lookup through a view opens every segment of the table (DuckDB spends a fraction of a
millisecond per file even when the row-group statistics rule it out), so a lookup of one source
row in a run of 77 segments per table costs tens of milliseconds per table. Segments are
immutable (written under a temporary name, then renamed), so their footers are read once, and
each lookup lists the run's partition folder again: segments of a run in progress are seen as
they land. Our ids grow in write order within each worker's files, so the min/max of an id
column usually leaves one or two files, and one row group in each; pyarrow then reads just those
groups (the key column first), without a query.
"""

from __future__ import annotations

import itertools
import os
from bisect import bisect_left, bisect_right
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from elspeth_nb.audit.schema import PARTITION_COLUMN, Table
from elspeth_nb.audit.writer import partition_dir


@dataclass(frozen=True)
class Segment:
    """One segment file: where it is, its top-level columns and its footer."""

    path: str
    name: str
    columns: frozenset[str]
    metadata: pq.FileMetaData = field(repr=False, compare=False)
    #: column -> per row group (min, max, null_count, has_min_max); filled on first use
    _stats: dict[str, list[tuple[Any, Any, int | None, bool]]] = field(default_factory=dict, repr=False,
                                                                       compare=False)
    #: column -> (min, max, null count) of the whole file, or () when some row group has no statistics
    _bounds: dict[str, tuple[Any, ...]] = field(default_factory=dict, repr=False, compare=False)

    def ranges(self, column: str) -> list[tuple[Any, Any, int | None, bool]]:
        found = self._stats.get(column)
        if found is None:
            found = []
            meta = self.metadata
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                entry: tuple[Any, Any, int | None, bool] = (None, None, None, False)
                for c in range(group.num_columns):
                    chunk = group.column(c)
                    if chunk.path_in_schema == column:
                        stats = chunk.statistics
                        if stats is not None:
                            nulls = stats.null_count if stats.has_null_count else None
                            entry = ((stats.min, stats.max, nulls, True) if stats.has_min_max
                                     else (None, None, nulls, False))
                        break
                found.append(entry)
            self._stats[column] = found
        return found

    def may_hold(self, column: str, values: Sequence[Any], nulls: bool) -> bool:
        """False only when the statistics prove no row has ``column`` in ``values`` (or NULL, if ``nulls``).

        Decided on the whole file's range first (one comparison instead of one per row group).
        """
        if column not in self.columns:
            return nulls  # the column reads as NULL in this segment
        bounds = self._bounds.get(column)
        if bounds is None:
            ranges = self.ranges(column)
            complete = all(has for _, _, _, has in ranges) and all(n is not None for _, _, n, _ in ranges)
            try:
                bounds = ((min(r[0] for r in ranges), max(r[1] for r in ranges), sum(r[2] for r in ranges))
                          if ranges and complete else ())
            except TypeError:  # statistics of a type we do not compare
                bounds = ()
            self._bounds[column] = bounds
        if not bounds or (nulls and bounds[2] > 0):
            return bool(self.groups_holding(column, values, nulls))
        try:
            i = bisect_left(values, bounds[0])
            return i < len(values) and values[i] <= bounds[1] and bool(self.groups_holding(column, values, nulls))
        except TypeError:
            return True

    def groups_holding(self, column: str, values: Sequence[Any], nulls: bool) -> list[int]:
        """Row groups whose statistics allow a row with ``column`` in (sorted) ``values``, or NULL if ``nulls``."""
        if column not in self.columns:  # the column reads as NULL in this segment
            return list(range(self.metadata.num_row_groups)) if nulls else []
        found = []
        for group, (low, high, null_count, has_min_max) in enumerate(self.ranges(column)):
            if (nulls and (null_count is None or null_count > 0)) or not has_min_max:
                found.append(group)
                continue
            try:
                i = bisect_left(values, low)
                if i < len(values) and values[i] <= high:
                    found.append(group)
            except TypeError:  # statistics of a type we do not compare (e.g. a changed column type)
                found.append(group)
        return found

    def read_at(self, rows: Sequence[int], column: str, values: Sequence[Any]) -> pa.Table | None:
        """The segment's rows at positions ``rows`` whose ``column`` is in (sorted) ``values``; None if none."""
        if column not in self.columns or not values:
            return None
        starts = list(itertools.accumulate((self.metadata.row_group(g).num_rows
                                            for g in range(self.metadata.num_row_groups)), initial=0))
        by_group: dict[int, list[int]] = {}
        for row in sorted(set(rows)):
            group = bisect_right(starts, row) - 1
            if 0 <= group < self.metadata.num_row_groups:
                by_group.setdefault(group, []).append(row - starts[group])
        if not by_group:
            return None
        handle = pq.ParquetFile(self.path, metadata=self.metadata)
        wanted = pa.array(values, handle.schema_arrow.field(column).type)
        parts = []
        for group, offsets in by_group.items():
            taken = handle.read_row_group(group).take(pa.array(offsets, pa.int64()))
            parts.append(taken.filter(pc.is_in(taken.column(column), value_set=wanted)))
        found = pa.concat_tables(parts)
        return found if found.num_rows else None

    def read(self, column: str, values: Sequence[Any], nulls: bool) -> pa.Table | None:
        """The segment's rows with ``column`` in (sorted) ``values`` (or NULL, if ``nulls``), None if there are none.

        Only the row groups the statistics allow are read, the key column first; the other columns
        only of groups where a key matched.
        """
        groups = self.groups_holding(column, values, nulls)
        if not groups:
            return None
        handle = pq.ParquetFile(self.path, metadata=self.metadata)
        if column not in self.columns:
            return handle.read_row_groups(groups)
        wanted = pa.array(values, handle.schema_arrow.field(column).type) if values else None
        parts = []
        for group in groups:
            keys = handle.read_row_group(group, columns=[column]).column(0)
            matched = pc.is_in(keys, value_set=wanted) if wanted is not None else pa.repeat(False, len(keys))
            if nulls:
                matched = pc.or_(pc.fill_null(matched, False), pc.is_null(keys))
            if pc.any(matched).as_py():
                parts.append(handle.read_row_group(group).filter(matched))
        return pa.concat_tables(parts) if parts else None


class SegmentIndex:
    """Footers of the segments of one store, cached by path, size and modification time."""

    def __init__(self, parquet_root: Path) -> None:
        self.parquet_root = parquet_root
        self._cache: dict[str, tuple[tuple[int, int], Segment]] = {}

    def segments(self, table: str, run_id: str) -> list[Segment] | None:
        """The run's segments of ``table`` in file-name order; None when a footer cannot be read."""
        directory = partition_dir(self.parquet_root, table, run_id)
        try:
            entries = sorted((e for e in os.scandir(directory)
                              if e.name.startswith("part-") and e.name.endswith(".parquet")), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for entry in entries:
            try:
                info = entry.stat()
            except FileNotFoundError:
                continue
            key = (info.st_mtime_ns, info.st_size)
            cached = self._cache.get(entry.path)
            if cached is None or cached[0] != key:
                try:
                    metadata = pq.read_metadata(entry.path)
                except (OSError, pa.ArrowException):
                    return None  # let DuckDB read it and say what is wrong
                names = frozenset(metadata.schema.column(i).path.split(".")[0] for i in range(metadata.num_columns))
                cached = (key, Segment(entry.path, entry.name, names, metadata))
                self._cache[entry.path] = cached
            found.append(cached[1])
        return found

    def read(self, table: Table, run_id: str, column: str, values: Collection[Any], *, nulls: bool = False,
             names: Collection[str] | None = None) -> pa.Table | None:
        """The run's records of ``table`` with ``column`` in ``values`` (or NULL, if ``nulls``), in ``table``'s
        schema (a column a segment lacks reads as NULL); None when a footer cannot be read.

        A point lookup without SQL: pyarrow reads only the row groups the footers allow, on the
        caller's thread (it releases the GIL), several times faster than a query per segment.
        """
        segments = self.select(table.name, run_id, column, values, nulls=nulls, names=names)
        if segments is None:
            return None
        try:
            ordered = sorted({v for v in values if v is not None})
        except TypeError:
            return None
        parts = [found for s in segments if (found := s.read(column, ordered, nulls)) is not None]
        return conform(parts, table.schema, run_id)

    def read_rows(self, table: Table, run_id: str, rows: Mapping[str, Sequence[int]], column: str,
                  values: Collection[Any]) -> pa.Table | None:
        """The records at ``rows`` (segment file name -> row numbers) whose ``column`` is in ``values``, in
        ``table``'s schema; only the row groups holding those rows are read. None when a footer cannot be read."""
        segments = self.segments(table.name, run_id)
        if segments is None:
            return None
        wanted = sorted({v for v in values if v is not None})
        parts = []
        for segment in segments:
            if segment.name in rows and (found := segment.read_at(rows[segment.name], column, wanted)) is not None:
                parts.append(found)
        return conform(parts, table.schema, run_id)

    def select(self, table: str, run_id: str, column: str | None = None, values: Collection[Any] = (), *,
               nulls: bool = False, names: Collection[str] | None = None) -> list[Segment] | None:
        """Segments that may hold a row with ``column`` in ``values`` (all of them without ``column``).

        ``names`` keeps only segments of those file names; None when a footer cannot be read.
        """
        segments = self.segments(table, run_id)
        if segments is None:
            return None
        if names is not None:
            segments = [s for s in segments if s.name in names]
        if column is None:
            return segments
        try:
            ordered = sorted({v for v in values if v is not None})
        except TypeError:  # values of mixed types: no pruning
            return segments
        if not ordered and not nulls:
            return []
        return [s for s in segments if s.may_hold(column, ordered, nulls)]


def conform(parts: Sequence[pa.Table], schema: pa.Schema, run_id: str) -> pa.Table:
    """Record batches read from segments as one table of ``schema``: missing columns NULL, the run id filled in."""
    rows = sum(p.num_rows for p in parts)
    columns = []
    for f in schema:
        if f.name == PARTITION_COLUMN:
            columns.append(pa.chunked_array([pa.repeat(pa.scalar(run_id, f.type), rows)], f.type))
        else:
            chunks = [p.column(f.name).cast(f.type) if f.name in p.column_names else pa.nulls(p.num_rows, f.type)
                      for p in parts]
            columns.append(pa.chunked_array([c for chunk in chunks for c in
                                             (chunk.chunks if isinstance(chunk, pa.ChunkedArray) else [chunk])],
                                            f.type))
    return pa.Table.from_arrays(columns, schema=schema)
