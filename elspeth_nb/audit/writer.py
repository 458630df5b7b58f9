"""Segment writers: where recorded Arrow batches go (Parquet files, or memory in tests).

One abstraction, ``write_segment(table, run_id, batch)`` + ``close()``, so the recorder never
knows what it writes to. The Parquet writer makes each segment an immutable file, written under
a hidden temporary name and renamed into place, so a reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from elspeth_nb.audit.integrity import fingerprints, pack_fingerprints
from elspeth_nb.audit.schema import DIGESTED_TABLES, PARTITION_COLUMN, SEGMENT_DIGESTS, TABLES, Table
from elspeth_nb.errors import AuditStoreError

_PART = re.compile(r"^part-(?P<prefix>[a-z0-9]+-)?(?P<number>\d+)\.parquet$")


class SegmentWriter(Protocol):
    """Receives one Arrow batch per flushed table segment."""

    def write_segment(self, table: Table, run_id: str, batch: pa.Table) -> None: ...

    def close(self) -> None: ...


def partition_dir(parquet_root: Path, table: str, run_id: str) -> Path:
    """``<parquet_root>/<table>/run_id=<run_id>``: one hive partition per run."""
    return parquet_root / table / f"{PARTITION_COLUMN}={run_id}"

#: Rows per Parquet row group. A point lookup (lineage) decompresses whole row groups of the segment
#: its statistics select: 2048 rows read one row's coalesce event in 6.4 ms against 12.3 ms at 8192
#: (node_states 3.9 against 6.6 ms), for 2-6% more bytes on those tables.
ROW_GROUP_ROWS = 2048
#: Tables with row groups of their own size: digest rows carry a blob of fingerprints each, so readers
#: take a few at a time.
ROW_GROUP_ROWS_OF = {"segment_digests": 8}
#: Fingerprints (8 bytes a record) held before they are written as a segment_digests file. Holding
#: them all until the end of the run grew memory by 140 MB per worker at 1M source rows.
DIGEST_FLUSH_BYTES = 8 << 20


class ParquetSegmentWriter:
    """Writes ``part-<n>.parquet`` files (zstd, one row group) into hive partitions, atomically.

    Each segment of a digested table is hashed (SHA-256 of its bytes) and fingerprinted record by
    record as it is written; :meth:`write_digests` stores those as a ``segment_digests`` segment.
    Dictionary-encoded text columns are written as such (no Arrow schema is stored, so every reader
    sees plain text, as before).
    """

    takes_dictionaries = True

    def __init__(self, parquet_root: Path, *, compression_level: int = 1, fsync: bool = True,
                 part_prefix: str = "") -> None:
        self.parquet_root = Path(parquet_root)
        self.part_prefix = part_prefix
        self.compression_level = compression_level
        self.fsync = fsync
        self._next_part: dict[tuple[str, str], int] = {}
        self._digests: dict[str, list[tuple[str, str, int, str, bytes, float, str]]] = defaultdict(list)
        self._digest_bytes: dict[str, int] = defaultdict(int)
        self.files_written = 0
        self.bytes_written = 0

    def write_segment(self, table: Table, run_id: str, batch: pa.Table) -> None:
        directory = partition_dir(self.parquet_root, table.name, run_id)
        key = (table.name, run_id)
        if key not in self._next_part:
            directory.mkdir(parents=True, exist_ok=True)
            self._next_part[key] = _next_part_number(directory, self.part_prefix)
        part = self._next_part[key]
        self._next_part[key] = part + 1
        name = f"part-{self.part_prefix}{part:06d}.parquet"
        final = directory / name
        temporary = directory / f".{name}.tmp"
        sink = pa.BufferOutputStream()
        group = ROW_GROUP_ROWS_OF.get(table.name, ROW_GROUP_ROWS)
        pq.write_table(batch, sink, compression="zstd", compression_level=self.compression_level,
                       row_group_size=group, use_dictionary=dictionary_columns(table),
                       write_statistics=statistics_columns(table), store_schema=False)
        data = sink.getvalue()
        try:
            with temporary.open("wb") as handle:
                handle.write(data)
                handle.flush()
                if self.fsync:
                    os.fsync(handle.fileno())
            os.replace(temporary, final)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise AuditStoreError(f"cannot write audit segment {final}: {exc.strerror or exc}") from exc
        if table.name in DIGESTED_TABLES:
            packed = pack_fingerprints(fingerprints(batch))
            self._digests[run_id].append((table.name, name, batch.num_rows, hashlib.sha256(data).hexdigest(),
                                          packed, time.time(), hashlib.sha256(packed).hexdigest()))
            self._digest_bytes[run_id] += len(packed)
            if self._digest_bytes[run_id] >= DIGEST_FLUSH_BYTES:  # memory stays flat however long the run
                self.write_digests(run_id)
        self.files_written += 1
        self.bytes_written += len(data)

    def write_digests(self, run_id: str) -> None:
        """Store the digests of the segments written since the last call for ``run_id`` (one segment_digests file).

        Called when the held fingerprints reach DIGEST_FLUSH_BYTES and at the end of the run; the run's
        Merkle root is computed over the digests of all its segment_digests files.
        """
        entries = self._digests.pop(run_id, [])
        self._digest_bytes.pop(run_id, None)
        if not entries:
            return
        names, parts, counts, hashes, prints, times, print_hashes = zip(*entries, strict=True)
        batch = pa.Table.from_arrays([
            pa.array(names, pa.string()), pa.array(parts, pa.string()), pa.array(counts, pa.int64()),
            pa.array(hashes, pa.string()), pa.array(prints, pa.binary()),
            pa.array([int(t * 1e6) for t in times], pa.timestamp("us", tz="UTC")), pa.array(print_hashes, pa.string()),
        ], schema=SEGMENT_DIGESTS.file_schema)
        self.write_segment(SEGMENT_DIGESTS, run_id, batch)

    def adopt(self, run_id: str, prefixes: Sequence[str], listed: set[tuple[str, str]]) -> Adopted:
        """Digest the segments of ``run_id`` that writers which died left on disk, and count what they hold.

        A segment file is complete once renamed into place, but its writer's digests died with it: these
        segments (``part-<prefix>...``, not in ``listed``) join the digests written next, so the run's Merkle
        root covers every record on disk, and the run's counts include their outcomes and decisions.
        """
        adopted = Adopted()
        for name in DIGESTED_TABLES:
            directory = partition_dir(self.parquet_root, name, run_id)
            if not directory.is_dir():
                continue
            for path in sorted(directory.glob("part-*.parquet")):
                match = _PART.match(path.name)
                if match is None or (match["prefix"] or "") not in prefixes or (name, path.name) in listed:
                    continue
                data = path.read_bytes()
                records = pq.read_table(pa.BufferReader(data), schema=TABLES[name].file_schema)
                packed = pack_fingerprints(fingerprints(records))
                self._digests[run_id].append((name, path.name, records.num_rows, hashlib.sha256(data).hexdigest(),
                                              packed, time.time(), hashlib.sha256(packed).hexdigest()))
                self._digest_bytes[run_id] += len(packed)
                adopted.count(name, records)
        return adopted

    def close(self) -> None:
        for run_id in list(self._digests):
            self.write_digests(run_id)
        if self.fsync:
            for table, run_id in self._next_part:
                _fsync_dir(partition_dir(self.parquet_root, table, run_id))


@dataclass
class Adopted:
    """What the adopted segments of dead writers hold: records per table, outcomes, decisions per coalesce."""

    records: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    outcomes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    decisions: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))

    def count(self, table: str, records: pa.Table) -> None:
        self.records[table] += records.num_rows
        if table == "token_outcomes":
            counted = records.group_by("outcome").aggregate([("outcome", "count")])
            for outcome, n in zip(*counted.select(["outcome", "outcome_count"]).to_pydict().values(), strict=True):
                self.outcomes[outcome] += n
        elif table == "coalesce_events":
            counted = records.group_by(["coalesce_name", "event_type"]).aggregate([("event_type", "count")])
            columns = counted.select(["coalesce_name", "event_type", "event_type_count"]).to_pydict().values()
            for name, event_type, n in zip(*columns, strict=True):
                self.decisions[name][event_type] += n


class MemoryWriter:
    """Keeps every segment in memory; ``table(name)`` concatenates them. For tests and imports."""

    def __init__(self) -> None:
        self.segments: dict[str, list[pa.Table]] = defaultdict(list)
        self.closed = False

    def write_segment(self, table: Table, run_id: str, batch: pa.Table) -> None:
        column = pa.array([run_id] * batch.num_rows, pa.string())
        full = batch.append_column(PARTITION_COLUMN, column).select(table.columns)
        self.segments[table.name].append(full)

    def table(self, name: str) -> pa.Table:
        from elspeth_nb.audit.schema import table as table_def

        parts = self.segments.get(name)
        if not parts:
            return table_def(name).schema.empty_table()
        return pa.concat_tables(parts)

    def close(self) -> None:
        self.closed = True


def statistics_columns(table: Table) -> list[str]:
    """Columns whose min/max per row group are written: not JSON documents or blobs, which no filter prunes on.

    Their statistics were up to 2 KB a row group (the smallest and largest context), a third of the
    footers that every reader of the store parses.
    """
    return [f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name for f in table.file_schema
            if not f.name.endswith("_json") and not pa.types.is_binary(f.type)]


def dictionary_columns(table: Table) -> list[str]:
    """Text columns worth dictionary-encoding: repeated values (names, statuses, contexts), not ids or hashes.

    Lists of names (expected and arrived branches, lost reasons) are encoded element-wise: reading
    them back is ~20% faster for the coalesce timing queries, which unnest them.
    """
    found = []
    for f in table.file_schema:
        if pa.types.is_string(f.type):
            if not f.name.endswith(("_id", "_hash", "_ref")) and f.name != "payload_json":
                found.append(f.name)
        elif pa.types.is_list(f.type) and pa.types.is_string(f.type.value_type) and not f.name.endswith("_ids"):
            found.append(f"{f.name}.list.element")  # the Parquet path of a list element (compliant nesting)
    return found


def _next_part_number(directory: Path, prefix: str = "") -> int:
    """First unused part number for ``prefix`` in ``directory`` (a resumed or re-imported run appends)."""
    numbers = [int(m["number"]) for p in directory.iterdir()
               if (m := _PART.match(p.name)) and (m["prefix"] or "") == prefix]
    return max(numbers, default=-1) + 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
