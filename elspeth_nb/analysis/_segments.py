"""Which segment files of a store can hold a key: Parquet footer statistics, read once per file.

A point lookup through a view opens every segment of the table (DuckDB spends a fraction of a
millisecond per file even when the row-group statistics rule it out), so a lookup of one source
row in a run of 77 segments per table costs tens of milliseconds per table. Segments are
immutable (written under a temporary name, then renamed), so their footers are read once, and
each lookup lists the run's partition folder again: segments of a run in progress are seen as
they land. Our ids grow in write order within each worker's files, so the min/max of an id
column usually leaves one or two files.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

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
        """False only when the statistics prove no row has ``column`` in ``values`` (or NULL, if ``nulls``)."""
        if column not in self.columns:
            return nulls  # the column reads as NULL in this segment
        for low, high, null_count, has_min_max in self.ranges(column):
            if nulls and (null_count is None or null_count > 0):
                return True
            if not has_min_max:
                return True
            try:
                i = bisect_left(values, low)
                if i < len(values) and values[i] <= high:
                    return True
            except TypeError:  # statistics of a type we do not compare (e.g. a changed column type)
                return True
        return False


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
