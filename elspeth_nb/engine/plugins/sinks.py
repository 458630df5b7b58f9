"""Sinks: write rows to JSON Lines, a JSON array, CSV or Parquet, and describe the artifact.

JSON sinks write each row as its RFC 8785 canonical JSON, the very bytes the engine hashed, so
``sha256(line) == node_states.output_hash`` for every line a sink wrote. Every sink keeps a
running SHA-256 of the file for the ``artifacts`` table.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from elspeth_nb.errors import InputError, PluginError


@dataclass(frozen=True)
class Artifact:
    """What a closed sink produced."""

    path: Path
    content_hash: str
    size_bytes: int
    rows: int
    artifact_type: str = "file"


class SinkWriteError(Exception):
    """A row could not be written (e.g. a CSV row with fields the header does not have): that token fails."""


class SinkFailedError(PluginError):
    """A sink itself failed (a write, flush or close raised something else): the run fails, naming it."""

    def __init__(self, sink: str, path: Path | str, action: str, cause: BaseException) -> None:
        self.sink = sink
        detail = " ".join(str(cause).split())  # one line, whatever the library put in its message
        super().__init__(f"sink {sink!r} ({path}): {action} failed: {type(cause).__name__}: {detail}")


class _FileSink:
    """Buffered binary file with a running hash; subclasses turn rows into bytes."""

    plugin = "file"
    flush_bytes = 1 << 20

    def __init__(self, path: Path) -> None:
        self.path = path
        #: How errors name this sink's file (a worker's part names the file it will be joined into).
        self.shown_as = str(path)
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
        try:
            self._end()
            self.flush()
        finally:
            self._handle.close()
        return Artifact(self.path, self._hash.hexdigest(), self._size, self.rows)

    def abort(self) -> None:
        """Release the file without writing what is still buffered (the sink failed)."""
        self._handle.close()


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
        # csv quotes a field holding a character of the line terminator, "\n" here: a bare "\r" would be
        # written unquoted and read back as a line break, so rows holding one are written fully quoted
        self._quoting_all = csv.writer(self._text, delimiter=delimiter, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def write(self, row: dict[str, Any], canonical: bytes) -> None:
        if not row:  # it would be a blank line, which CSV readers skip: the row would vanish on reading
            raise SinkWriteError("a row with no fields cannot be written as CSV (it would be a blank line)")
        if self.header is None:
            self.header = list(row)
            self._write_row(self.header)
        elif len(row) != len(self.header) or any(k not in row for k in self.header):
            raise SinkWriteError(f"row fields {sorted(row)} do not match the CSV header {self.header}")
        self._write_row([_cell(row[k]) for k in self.header])
        self.rows += 1
        if self._text.tell() >= 1 << 16:
            self._drain()

    def _write_row(self, cells: list[Any]) -> None:
        carriage_return = any(isinstance(c, str) and "\r" in c for c in cells)
        (self._quoting_all if carriage_return else self._writer).writerow(cells)

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
    """Parquet, written in row groups; the first row written fixes the schema, as it fixes a CSV header.

    A later row with a field the schema lacks, or a value its column cannot hold, fails its own write
    (:class:`SinkWriteError`) when it is written, so it never takes a row group of good rows with it;
    a field the row lacks is stored as null. Fields declared in the sink's ``schema`` (``'note: str?'``)
    take their declared type instead, so an optional field first seen empty still gets a real column.
    """

    plugin = "parquet"
    batch_rows = 50_000

    def __init__(self, path: Path, declared: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.declared = dict(declared or {})  # field name -> declared type (int, float, str, bool, any)
        self.rows = 0
        self._pending: list[dict[str, Any]] = []
        self._writer: Any = None
        self._schema: Any = None
        self._fits: dict[str, Callable[[Any], bool]] = {}

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(b"")
        except OSError as exc:
            raise InputError(f"sink {self.path}: cannot open for writing: {exc.strerror or exc}") from exc

    def write(self, row: dict[str, Any], canonical: bytes) -> None:
        if self._schema is None:
            self._fix_schema(row)
        else:
            self._check(row)
        self._pending.append(row)
        self.rows += 1
        if len(self._pending) >= self.batch_rows:
            self.flush()

    def _fix_schema(self, row: dict[str, Any]) -> None:
        """Type the columns from ``row``, refusing a row that Parquet cannot store at all."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist([row])
            pq.write_table(table, pa.BufferOutputStream())
        except (pa.ArrowException, OverflowError, TypeError, ValueError) as exc:
            raise SinkWriteError(f"row cannot be stored in Parquet, so it cannot fix the file's schema: "
                                 f"{type(exc).__name__}: {exc}") from exc
        inferred = {f.name: f.type for f in table.schema}
        names = [*inferred, *(n for n in self.declared if n not in inferred)]
        schema = pa.schema([(n, _declared_type(self.declared.get(n, "any")) or inferred[n]) for n in names])
        fits = {f.name: _column_fits(f.type) for f in schema}
        wrong = [f"{k!r} is {_kind(v)} but it is declared {self.declared[k]}"
                 for k, v in row.items() if v is not None and k in self.declared and not fits[k](v)]
        if wrong:
            raise SinkWriteError(f"value(s) that do not fit the sink's declared schema: {', '.join(wrong)}")
        self._schema, self._fits = schema, fits

    def _check(self, row: dict[str, Any]) -> None:
        """Refuse a row with fields the schema lacks or values its columns cannot hold (key sets first)."""
        fits = self._fits
        problems = []
        if not row.keys() <= fits.keys():
            extra = [f"{k!r} ({_kind(v)})" for k, v in row.items() if k not in fits]
            problems.append(f"field(s) {', '.join(extra)} not in the schema")
        wrong = [f"{k!r} is {_kind(v)} but its column is {self._schema.field(k).type}"
                 for k, v in row.items() if v is not None and k in fits and not fits[k](v)]
        if wrong:
            problems.append(f"value(s) the columns cannot hold: {', '.join(wrong)}")
            untyped = [f.name for f in self._schema if str(f.type) == "null" and row.get(f.name) is not None]
            if untyped:
                problems.append(f"{', '.join(map(repr, untyped))} had no value in the first row; declare the type "
                                f"in the sink's options.schema.fields (e.g. '{untyped[0]}: str?')")
        if problems:
            columns = ", ".join(f"{f.name}: {f.type}" for f in self._schema)
            raise SinkWriteError(f"{'; '.join(problems)} (the sink's first row fixed the Parquet schema: {columns})")

    def flush(self) -> None:
        if not self._pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        batch = pa.Table.from_pylist(self._pending, schema=self._schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self._schema, compression="zstd")
        self._writer.write_table(batch)
        self._pending.clear()

    def close(self) -> Artifact:
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.close()
        data_hash, size = _hash_file(self.path)
        return Artifact(self.path, data_hash, size, self.rows)

    def abort(self) -> None:
        """Close the file with the row groups already written, dropping pending rows (the sink failed)."""
        if self._writer is not None:
            self._writer.close()


def _declared_type(name: str) -> Any:
    """The Arrow type of a declared schema type (None for ``any``: the first row decides)."""
    import pyarrow as pa

    return {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}.get(name)


_INT64 = (-(1 << 63), (1 << 63) - 1)
_EXACT_FLOAT_INT = 1 << 53


def _kind(value: Any) -> str:
    """A value's JSON-ish type name for messages: str, int, float, bool, dict, list."""
    return type(value).__name__


def _column_fits(column: Any) -> Callable[[Any], bool]:
    """Whether a column of Arrow type ``column`` holds a (non-null) value as its canonical JSON reads."""
    scalar = _SCALAR_FITS.get(str(column))
    return scalar if scalar is not None else partial(_round_trips, column)


def _fits_string(value: Any) -> bool:
    return type(value) is str


def _fits_bool(value: Any) -> bool:
    return type(value) is bool


def _fits_int64(value: Any) -> bool:
    kind = type(value)
    return (kind is int or (kind is float and value.is_integer())) and _INT64[0] <= value <= _INT64[1]


def _fits_double(value: Any) -> bool:
    kind = type(value)
    return kind is float or (kind is int and -_EXACT_FLOAT_INT <= value <= _EXACT_FLOAT_INT)


_SCALAR_FITS: dict[str, Callable[[Any], bool]] = {
    "string": _fits_string, "bool": _fits_bool, "int64": _fits_int64, "double": _fits_double,
}


def _round_trips(column: Any, value: Any) -> bool:
    """A nested (or unusual) column holds ``value`` if Arrow reads back the same value; a missing key reads null."""
    import pyarrow as pa

    try:
        stored = pa.array([value], type=column).to_pylist()[0]
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return False
    return _same(stored, value)


def _same(stored: Any, value: Any) -> bool:
    """Equal as canonical JSON, where a key the value lacks may read back as null (bools are not numbers)."""
    if isinstance(value, dict):
        return (isinstance(stored, dict) and stored.keys() >= value.keys()
                and all(_same(stored[k], value.get(k)) for k in stored))
    if isinstance(value, list):
        return isinstance(stored, list) and len(stored) == len(value) and all(map(_same, stored, value))
    if isinstance(value, bool) or isinstance(stored, bool):
        return stored is value
    return bool(stored == value)


Sink = JsonlSink | JsonArraySink | CsvSink | ParquetSink


class OpenSinks:
    """The sinks one process writes, opened, flushed and closed together.

    Any exception a sink raises becomes a :class:`SinkFailedError` naming it; a sink that failed
    writes nothing more and records no artifact, so the trail never describes a file it did not finish.
    """

    def __init__(self, sinks: Mapping[str, Sink]) -> None:
        self.sinks = dict(sinks)
        self.failed: list[str] = []  # sinks that were open and record no artifact
        self._open: dict[str, Sink] = {}

    def open(self) -> None:
        """Open every sink (an InputError names one that cannot be opened)."""
        for name, sink in self.sinks.items():
            sink.open()
            self._open[name] = sink

    def flush(self) -> None:
        """Hand every open sink's buffered rows to its file (the engine calls this before each audit flush)."""
        for name, sink in self._open.items():
            try:
                sink.flush()
            except Exception as exc:
                raise SinkFailedError(name, shown_path(sink), "flush", exc) from exc

    def close(self, failure: BaseException | None = None) -> tuple[dict[str, Artifact], SinkFailedError | None]:
        """Close every open sink, aborting the one ``failure`` names; the artifacts and the first close failure."""
        failed = failure.sink if isinstance(failure, SinkFailedError) else None
        artifacts: dict[str, Artifact] = {}
        error: SinkFailedError | None = None
        for name, sink in self._open.items():
            if name == failed:
                self.failed.append(name)
                with suppress(Exception):
                    sink.abort()
                continue
            try:
                artifacts[name] = sink.close()
            except Exception as exc:
                self.failed.append(name)
                error = error or SinkFailedError(name, shown_path(sink), "close", exc)
        self._open.clear()
        return artifacts, error


def shown_path(sink: Sink) -> str:
    """How errors name ``sink``'s file."""
    return getattr(sink, "shown_as", str(sink.path))


def part_path(sink: Sink, run_id: str, index: int) -> Path:
    """Where worker ``index`` of run ``run_id`` writes ``sink``: a hidden file beside it, named for the run.

    Named ``<path>.part<k>`` the part of one sink could be another sink's file, and joining them lost rows.
    """
    return sink.path.with_name(f".{sink.path.name}.{run_id}.part{index}")


def part_sink(sink: Sink, run_id: str, index: int) -> Sink:
    """The sink worker ``index`` of a sharded run writes (see :func:`part_path`), joined by :func:`assemble_parts`."""
    path = part_path(sink, run_id, index)
    part: _FileSink
    if isinstance(sink, JsonArraySink):
        part = JsonArraySink(path, fragment=True)
    elif isinstance(sink, CsvSink | ParquetSink):
        raise ValueError(f"{sink.plugin} sinks are not sharded: each part would fix its columns from its own first row")
    else:
        part = JsonlSink(path)
    part.shown_as = f"{sink.path} (worker {index}'s part)"
    return part


def assemble_parts(sink: Sink, parts: list[tuple[Path, int | None]]) -> Artifact:
    """Join the workers' parts (path, rows; None: not known) of ``sink`` into its file, in order, and delete them.

    A part whose row count is not known (its worker died) is joined whole; the artifact then counts only the
    rows known. A missing part file is skipped.
    """
    rows = sum(n or 0 for _, n in parts)
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
            if not path.is_file():
                continue
            has_rows = count if count is not None else path.stat().st_size > 0
            if array and has_rows:
                emit(b"\n" if written == 0 else b",\n")
            with path.open("rb") as part:
                while chunk := part.read(1 << 20):
                    emit(chunk)
            written += 1 if has_rows else 0
        if array:
            emit(b"\n]\n" if written else b"]\n")
    for path, _ in parts:
        path.unlink(missing_ok=True)
    return Artifact(sink.path, digest.hexdigest(), size, rows)


def _hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
