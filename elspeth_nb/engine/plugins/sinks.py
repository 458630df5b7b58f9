"""Sinks: write rows to JSON Lines, a JSON array, CSV or Parquet, and describe the artifact.

JSON sinks write each row as its RFC 8785 canonical JSON, the very bytes the engine hashed, so
``sha256(line) == node_states.output_hash`` for every line a sink wrote. Every sink keeps a
running SHA-256 of the file for the ``artifacts`` table.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from elspeth_nb.errors import InputError


@dataclass(frozen=True)
class Artifact:
    """What a closed sink produced."""

    path: Path
    content_hash: str
    size_bytes: int
    rows: int
    artifact_type: str = "file"


class SinkWriteError(Exception):
    """A row could not be written (e.g. a CSV row with fields the header does not have)."""


class _FileSink:
    """Buffered binary file with a running hash; subclasses turn rows into bytes."""

    plugin = "file"
    flush_bytes = 1 << 20

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self._hash = hashlib.sha256()
        self._size = 0
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._handle: Any = None

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("wb")
        except OSError as exc:
            raise InputError(f"sink {self.path}: cannot open for writing: {exc.strerror or exc}") from exc
        self._start()

    def _start(self) -> None:
        """Bytes a format writes before its first row."""

    def _end(self) -> None:
        """Bytes a format writes after its last row."""

    def _emit(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= self.flush_bytes:
            self.flush()

    def write(self, row: dict[str, Any], canonical: bytes) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Hand buffered bytes to the OS (the engine calls this before each audit flush)."""
        if not self._chunks:
            return
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        try:
            self._handle.write(data)
            self._handle.flush()
        except OSError as exc:
            raise InputError(f"sink {self.path}: write failed: {exc.strerror or exc}") from exc
        self._hash.update(data)
        self._size += len(data)

    def close(self) -> Artifact:
        self._end()
        self.flush()
        self._handle.close()
        return Artifact(self.path, self._hash.hexdigest(), self._size, self.rows)


class JsonlSink(_FileSink):
    """One canonical JSON object per line."""

    plugin = "jsonl"

    def write(self, row: dict[str, Any], canonical: bytes) -> None:
        self._emit(canonical + b"\n")
        self.rows += 1


class JsonArraySink(_FileSink):
    """A JSON array, one canonical row per line (a ``fragment`` holds the rows only, for sharded runs)."""

    plugin = "json"

    def __init__(self, path: Path, fragment: bool = False) -> None:
        super().__init__(path)
        self.fragment = fragment

    def _start(self) -> None:
        if not self.fragment:
            self._emit(b"[")

    def write(self, row: dict[str, Any], canonical: bytes) -> None:
        separator = b"," if self.rows else b""
        self._emit(separator + (canonical if self.fragment and not self.rows else b"\n" + canonical))
        self.rows += 1

    def _end(self) -> None:
        if not self.fragment:
            self._emit(b"\n]\n" if self.rows else b"]\n")


class CsvSink(_FileSink):
    """CSV with the first row's fields as header; nested values are written as JSON text."""

    plugin = "csv"

    def __init__(self, path: Path, delimiter: str = ",") -> None:
        super().__init__(path)
        self.delimiter = delimiter
        self.header: list[str] | None = None
        self._text = io.StringIO()
        self._writer = csv.writer(self._text, delimiter=delimiter, lineterminator="\n")

    def write(self, row: dict[str, Any], canonical: bytes) -> None:
        if self.header is None:
            self.header = list(row)
            self._writer.writerow(self.header)
        elif len(row) != len(self.header) or any(k not in row for k in self.header):
            raise SinkWriteError(f"row fields {sorted(row)} do not match the CSV header {self.header}")
        self._writer.writerow([_cell(row[k]) for k in self.header])
        self.rows += 1
        if self._text.tell() >= 1 << 16:
            self._drain()

    def _drain(self) -> None:
        self._emit(self._text.getvalue().encode("utf-8"))
        self._text.seek(0)
        self._text.truncate()

    def flush(self) -> None:
        if self._text.tell():
            self._drain()
        super().flush()


def _cell(value: Any) -> Any:
    if isinstance(value, dict | list):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return "" if value is None else value


class ParquetSink:
    """Parquet, written in row groups; the schema comes from the first rows."""

    plugin = "parquet"
    batch_rows = 50_000

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self._pending: list[dict[str, Any]] = []
        self._writer: Any = None

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(b"")
        except OSError as exc:
            raise InputError(f"sink {self.path}: cannot open for writing: {exc.strerror or exc}") from exc

    def write(self, row: dict[str, Any], canonical: bytes) -> None:
        self._pending.append(row)
        self.rows += 1
        if len(self._pending) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:
            batch = pa.Table.from_pylist(self._pending)
            self._writer = pq.ParquetWriter(self.path, batch.schema, compression="zstd")
        else:
            batch = pa.Table.from_pylist(self._pending, schema=self._writer.schema)
        self._writer.write_table(batch)
        self._pending.clear()

    def close(self) -> Artifact:
        self.flush()
        if self._writer is not None:
            self._writer.close()
        data = self.path.read_bytes()
        return Artifact(self.path, hashlib.sha256(data).hexdigest(), len(data), self.rows)


Sink = JsonlSink | JsonArraySink | CsvSink | ParquetSink


def part_sink(sink: Sink, index: int) -> Sink:
    """The sink a worker of a sharded run writes: ``<path>.part<index>``, joined by :func:`assemble_parts`."""
    path = sink.path.with_name(f"{sink.path.name}.part{index}")
    if isinstance(sink, JsonArraySink):
        return JsonArraySink(path, fragment=True)
    if isinstance(sink, CsvSink):
        raise ValueError("CSV sinks are not sharded: each part would take its header from its own first row")
    return type(sink)(path)


def assemble_parts(sink: Sink, parts: list[tuple[Path, int]]) -> Artifact:
    """Join the workers' parts (path, rows) of ``sink`` into its file, in order, and delete the parts."""
    rows = sum(n for _, n in parts)
    if isinstance(sink, ParquetSink):
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(p) for p, n in parts if n]
        if tables:
            pq.write_table(pa.concat_tables(tables, promote_options="permissive"), sink.path, compression="zstd")
        else:
            sink.path.write_bytes(b"")
        data_hash, size = _hash_file(sink.path)
    else:
        digest, size = hashlib.sha256(), 0
        with sink.path.open("wb") as out:
            def emit(data: bytes) -> None:
                nonlocal size
                out.write(data)
                digest.update(data)
                size += len(data)

            array = isinstance(sink, JsonArraySink)
            if array:
                emit(b"[")
            written = 0
            for path, count in parts:
                if array and count:
                    emit(b"\n" if written == 0 else b",\n")
                with path.open("rb") as part:
                    while chunk := part.read(1 << 20):
                        emit(chunk)
                written += count
            if array:
                emit(b"\n]\n" if written else b"]\n")
        data_hash = digest.hexdigest()
    for path, _ in parts:
        path.unlink(missing_ok=True)
    return Artifact(sink.path, data_hash, size, rows)


def _hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
