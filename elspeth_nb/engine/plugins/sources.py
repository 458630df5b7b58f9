"""Sources: read rows from CSV, JSON Lines or Parquet and check them against the schema.

``records()`` yields either a row (a plain ``dict``) or a :class:`Quarantine` describing a
record that could not become a row (a malformed line, a wrong type, bad encoding). A row the
engine then cannot hash (NaN, an integer beyond +/-2**53-1, too deep) becomes the quarantine
``unhashable()`` gives, with the raw text where the source has it. The engine quarantines those
and goes on; only an unreadable file stops a run, before it starts.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from elspeth_nb.audit.hashing import is_canonical, nanosecond_iso
from elspeth_nb.errors import CanonicalizationError, InputError

MAX_FIELD_BYTES = 16 * 1024 * 1024
RAW_TEXT_CAP = 64 * 1024  # characters of a malformed CSV record's raw text kept in the trail


@dataclass(frozen=True)
class FieldRule:
    """One declared schema field: name, type (int/float/str/bool/any) and whether it is required."""

    name: str
    type: str
    required: bool = True


@dataclass(frozen=True)
class Quarantine:
    """A source record that failed parsing or validation; ``raw`` is JSON-safe."""

    raw: Any
    error: str
    violation_type: str
    location: str
    field: str | None = None
    expected_type: str | None = None
    actual_type: str | None = None


class SchemaViolation(Exception):
    def __init__(self, message: str, violation: str, field: str | None = None,
                 expected: str | None = None, actual: str | None = None) -> None:
        super().__init__(message)
        self.violation, self.field, self.expected, self.actual = violation, field, expected, actual


_TRUE = frozenset({"true", "1", "yes", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "f"})


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _ascii_number(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` for plain ASCII numbers only: Python also reads '٣' as 3 and '1_000' as 1000."""
    def strict(text: str) -> Any:
        if not text.isascii() or "_" in text:
            raise ValueError(text)
        return parse(text)

    return strict


_TEXT_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": _ascii_number(int), "float": _ascii_number(float), "bool": _parse_bool, "str": str, "any": str,
}


def _json_type_ok(kind: str, value: Any) -> bool:
    t = type(value)
    if kind == "any":
        return True
    if kind == "int":
        return t is int
    if kind == "float":
        return t is float or t is int
    if kind == "str":
        return t is str
    if kind == "bool":
        return t is bool
    return False


class _Source:
    #: The setting that names the input, as errors show it (``settings.yaml:3: source.options.path``).
    where = "source.options.path"
    """What every source shares: its file, schema mode and declared fields."""

    plugin = "source"

    def __init__(self, path: Path, schema_mode: str, fields: Sequence[FieldRule]) -> None:
        self.path = path
        self.schema_mode = schema_mode
        self.fields = tuple(fields)
        self.declared = {f.name: f for f in self.fields}
        self._current = 0

    def check_readable(self) -> None:
        """Fail before the run starts if the input cannot be opened."""
        if not self.path.exists():
            raise InputError(f"{self.where}: input file {self.path} does not exist")
        if not self.path.is_file():
            raise InputError(f"{self.where}: {self.path} is not a file")
        try:
            with self.path.open("rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise InputError(f"{self.where}: cannot read {self.path}: {exc.strerror or exc}") from exc

    def location(self, line: int) -> str:
        return f"{self.path.name}:{line}"

    def current_location(self) -> str:
        """Where the record yielded last came from (for problems found after parsing, like NaN)."""
        return self.location(self._current)

    def unhashable(self, row: dict[str, Any], error: CanonicalizationError) -> Quarantine:
        """The quarantine of the row yielded last, which has no canonical JSON (``error`` says why)."""
        return Quarantine(_json_safe(row), str(error), error.violation, self.current_location())

    def check_typed(self, row: dict[str, Any]) -> None:
        """Schema check for already-typed values (JSON, Parquet): presence, extras, types."""
        if self.schema_mode in ("observed", "parse") or not self.fields:
            return
        for rule in self.fields:
            if rule.name not in row or row[rule.name] is None:
                if rule.required:
                    raise SchemaViolation(f"required field '{rule.name}' is missing", "missing_field", rule.name,
                                          rule.type, "missing")
                continue
            value = row[rule.name]
            if not _json_type_ok(rule.type, value):
                raise SchemaViolation(
                    f"field '{rule.name}' should be {rule.type}, got {type(value).__name__} {value!r:.80}",
                    "type_mismatch", rule.name, rule.type, type(value).__name__)
        if self.schema_mode == "fixed":
            extra = [k for k in row if k not in self.declared]
            if extra:
                raise SchemaViolation(f"unexpected field(s) {extra} (schema mode fixed)", "extra_field", extra[0],
                                      None, type(row[extra[0]]).__name__)


class CsvSource(_Source):
    """CSV with a header line; declared field types are parsed from text."""

    plugin = "csv"

    def __init__(self, path: Path, schema_mode: str, fields: Sequence[FieldRule], *, delimiter: str = ",",
                 quotechar: str = '"', encoding: str = "utf-8") -> None:
        super().__init__(path, schema_mode, fields)
        self.delimiter, self.quotechar, self.encoding = delimiter, quotechar, encoding
        self.header: list[str] = []
        self._current_fields: list[str] = []

    def check_readable(self) -> None:
        """Fail before the run starts if the file cannot be opened or its header line is unusable."""
        super().check_readable()
        with self.path.open("rb") as handle:
            bad_lines: set[int] = set()
            self._read_header(self._reader(_decoded_lines(handle, self.encoding, bad_lines)), bad_lines)

    def _reader(self, lines: Iterator[str]) -> Any:
        # strict: an unterminated quote or text after a closing quote is a malformed record, not silently
        # merged into one field with the lines after it
        return csv.reader(lines, delimiter=self.delimiter, quotechar=self.quotechar, strict=True)

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any] | Quarantine]:
        """Rows and quarantines of records ``start <= index < stop`` (skipped records are only split)."""
        header: list[str] = []
        parsers: list[tuple[str, Callable[[str], Any], FieldRule]] = []
        for index, (line, fields) in enumerate(self._split()):
            if index < start:
                continue
            if stop is not None and index >= stop:
                return
            if isinstance(fields, Quarantine):
                yield fields
                continue
            if not header:
                header = self.header
                parsers = [(f.name, _TEXT_PARSERS[f.type], f) for f in self.fields if f.name in header]
            if len(fields) != len(header):
                yield Quarantine({"fields": fields}, f"record has {len(fields)} fields, the header has {len(header)}",
                                 "malformed_row", self.location(line))
                continue
            row = dict(zip(header, fields, strict=True))
            problem = _parse_text_fields(row, parsers)
            if problem is None:
                self._current, self._current_fields = line, fields
                yield row
            else:
                yield Quarantine(dict(zip(header, fields, strict=True)), str(problem), problem.violation,
                                 self.location(line), problem.field, problem.expected, problem.actual)

    def count_records(self) -> int:
        """How many records ``records()`` yields (rows and quarantines), found by splitting only."""
        return sum(1 for _ in self._split())

    def unhashable(self, row: dict[str, Any], error: CanonicalizationError) -> Quarantine:
        """The quarantine of the row yielded last, holding its fields as the text read (``1e400``, not inf)."""
        raw = dict(zip(self.header, self._current_fields, strict=True))
        return Quarantine(raw, str(error), error.violation, self.current_location())

    def _split(self) -> Iterator[tuple[int, list[str] | Quarantine]]:
        """(first line, fields) per non-blank record after the header; encoding and CSV errors as Quarantine."""
        bad_lines: set[int] = set()
        consumed: list[str] = []  # the lines read for the current record: a malformed one keeps its text
        previous_limit = csv.field_size_limit(MAX_FIELD_BYTES)
        skipped = 0  # lines taken into malformed records past the reader (its line_num does not count them)
        try:
            with self.path.open("rb") as handle:
                lines = _decoded_lines(handle, self.encoding, bad_lines, consumed)
                reader = self._reader(lines)
                self._read_header(reader, bad_lines)
                last_line = reader.line_num
                consumed.clear()
                while True:
                    first = last_line + 1
                    try:
                        fields = next(reader)
                    except StopIteration:
                        return
                    except csv.Error as exc:
                        skipped += self._rest_of_open_quote(lines, consumed)
                        last_line = reader.line_num + skipped
                        yield first, self._malformed(first, last_line, "".join(consumed), exc)
                        consumed.clear()
                        continue
                    consumed.clear()
                    line = reader.line_num + skipped
                    if bad_lines and any(n in bad_lines for n in range(first, line + 1)):
                        raw = [_escaped(f, self.encoding) for f in fields]
                        yield first, Quarantine({"fields": raw}, f"bytes that are not valid {self.encoding}",
                                                "encoding", self.location(first))
                    elif fields:
                        yield first, fields
                    last_line = line
        finally:
            csv.field_size_limit(previous_limit)

    def _rest_of_open_quote(self, lines: Iterator[str], consumed: list[str]) -> int:
        """After a malformed record that ends inside a quoted field, read on to that field's end; returns the lines.

        The reader gives up at the first bad character and starts the next record on the next line, which,
        inside a quoted field that spans lines, made the field's tail a record of its own, and a valid one.
        Only when its quotes do not pair up, and reading leniently (a quote closes a field only before a
        delimiter or a line end), so a stray quote, as in ``"12" ruler"``, opens nothing; at most the CSV
        field size limit is taken.
        """
        state, taken, size = _QuoteState(), 0, 0
        for text in consumed:
            state.read(text, self.delimiter, self.quotechar)
        if "".join(consumed).count(self.quotechar) % 2 == 0:  # paired quotes (`"ab"c`): nothing left open
            return 0
        while state.quoted and size < MAX_FIELD_BYTES:
            line = next(lines, None)  # appended to ``consumed`` as it is read
            if line is None:
                break
            state.read(line, self.delimiter, self.quotechar)
            taken, size = taken + 1, size + len(line)
        return taken

    def _malformed(self, first: int, last: int, text: str, exc: csv.Error) -> Quarantine:
        """A record the CSV reader refused: its raw text is kept, up to RAW_TEXT_CAP characters."""
        span = f" (it runs to line {last})" if last > first else ""
        raw: dict[str, Any] = {"line": first, "text": _escaped(text[:RAW_TEXT_CAP], self.encoding)}
        kept = ""
        if len(text) > RAW_TEXT_CAP:
            raw["text_chars"] = len(text)
            kept = f"; only its first {RAW_TEXT_CAP} of {len(text)} characters are kept"
        return Quarantine(raw, f"malformed CSV record{span}: {exc}{kept}", "malformed_row", self.location(first))

    def _read_header(self, reader: Any, bad_lines: set[int]) -> list[str]:
        try:
            header = next(reader)
            while not header:  # blank lines before the header, as after it, are no records
                header = next(reader)
        except StopIteration:
            raise InputError(f"{self.where}: {self.path} is empty; a CSV source needs a header line "
                             "naming its columns") from None
        except csv.Error as exc:
            if "new-line character seen in unquoted field" in str(exc):  # the line ended at a bare \r
                raise InputError(f"{self.path}:{reader.line_num}: the header line ends with a bare carriage return "
                                 "(old Mac line endings?); lines must end with \\n or \\r\\n") from exc
            raise InputError(f"{self.path}:{reader.line_num}: cannot read the CSV header: {exc}") from exc
        if bad_lines:
            raise InputError(f"{self.path}:{min(bad_lines)}: the header line has bytes that are not valid "
                             f"{self.encoding}")
        names = [h.strip() for h in header]
        if len(set(names)) != len(names):
            raise InputError(f"{self.path}: duplicate column names in the header {names}")
        if self.schema_mode in ("fixed", "flexible"):
            missing = [f.name for f in self.fields if f.required and f.name not in names]
            if missing:
                raise InputError(f"{self.path}: the header lacks declared field(s) {missing} (header: {names})")
        if self.schema_mode == "fixed":
            extra = [n for n in names if n not in self.declared]
            if extra:
                raise InputError(f"{self.path}: column(s) {extra} are not declared and the schema mode is fixed")
        self.header = names
        return names


class _QuoteState:
    """Whether CSV text read so far ends inside a quoted field, read leniently (see ``_rest_of_open_quote``)."""

    def __init__(self) -> None:
        self.quoted, self.at_field_start = False, True

    def read(self, text: str, delimiter: str, quote: str) -> None:
        i, end = 0, len(text)
        while i < end:
            char = text[i]
            if self.quoted:
                if char == quote:
                    after = text[i + 1] if i + 1 < end else "\n"
                    if after == quote:  # a doubled quote is a quote inside the field
                        i += 1
                    elif after in (delimiter, "\r", "\n"):
                        self.quoted = False
            elif char == quote and self.at_field_start:
                self.quoted = True
            self.at_field_start = not self.quoted and char in (delimiter, "\r", "\n")
            i += 1


def _parse_text_fields(row: dict[str, Any], parsers: Sequence[tuple[str, Callable[[str], Any], FieldRule]]
                       ) -> SchemaViolation | None:
    for name, parse, rule in parsers:
        text = row[name]
        if text == "" and rule.type != "str":
            if rule.required:
                return SchemaViolation(f"required field '{name}' is empty", "missing_field", name, rule.type, "empty")
            row[name] = None
            continue
        try:
            row[name] = parse(text)
        except ValueError:
            return SchemaViolation(f"field '{name}' should be {rule.type}, got {text!r:.80}", "type_mismatch", name,
                                   rule.type, "str")
    return None


def _without_bom(lines: Iterator[bytes], encoding: str) -> Iterator[bytes]:
    """The lines, less a UTF-8 byte order mark at the start of the file (spreadsheets write one)."""
    utf8 = codecs.lookup(encoding).name == "utf-8"
    for number, raw in enumerate(lines, start=1):
        yield raw[len(codecs.BOM_UTF8):] if number == 1 and utf8 and raw.startswith(codecs.BOM_UTF8) else raw


def _decoded_lines(handle: Any, encoding: str, bad_lines: set[int], consumed: list[str] | None = None
                   ) -> Iterator[str]:
    """Decode line by line so one bad byte quarantines one record instead of ending the run.

    Each line is also appended to ``consumed`` (when given), which the caller clears after each record.
    """
    keep = consumed.append if consumed is not None else None
    for number, raw in enumerate(_without_bom(handle, encoding), start=1):
        try:
            line = raw.decode(encoding)
        except UnicodeDecodeError:
            bad_lines.add(number)
            line = raw.decode(encoding, "surrogateescape")
        if keep is not None:
            keep(line)
        yield line


def _escaped(text: str, encoding: str) -> str:
    """Text decoded with ``surrogateescape``, its undecodable bytes shown as ``\\xNN`` (storable JSON)."""
    return text.encode(encoding, "surrogateescape").decode(encoding, "backslashreplace")


# orjson reads integers outside [-2**63, 2**64) as floats, silently rounded: each has 20+ digits, or is
# negative with 19. A line's shape (digits as 9, minus signs kept, the rest as dots) finds them cheaply.
_SHAPE = bytes(0x39 if 0x30 <= b <= 0x39 else b if b == 0x2D else 0x2E for b in range(256))
_NINETEEN_DIGITS, _TWENTY_DIGITS, _MINUS_NINETEEN_DIGITS = b"9" * 19, b"9" * 20, b"-" + b"9" * 19


class JsonlSource(_Source):
    """One JSON object per line; values keep their JSON types, integers exactly."""

    plugin = "jsonl"

    def __init__(self, path: Path, schema_mode: str, fields: Sequence[FieldRule], *, encoding: str = "utf-8") -> None:
        super().__init__(path, schema_mode, fields)
        self.encoding = encoding
        self._utf8 = encoding.lower().replace("-", "").replace("_", "") == "utf8"
        self._current_raw = b""

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any] | Quarantine]:
        """Rows and quarantines of records ``start <= index < stop`` (one per non-blank line)."""
        for index, (number, raw) in enumerate(self._lines()):
            if index < start:
                continue
            if stop is not None and index >= stop:
                return
            self._current, self._current_raw = number, raw
            yield self._parse(raw, number)

    def unhashable(self, row: dict[str, Any], error: CanonicalizationError) -> Quarantine:
        """The quarantine of the row yielded last, holding its line as read."""
        return Quarantine({"line": self._text(self._current_raw)}, str(error), error.violation,
                          self.current_location())

    def count_records(self) -> int:
        return sum(1 for _ in self._lines())

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        with self.path.open("rb") as handle:
            for number, raw in enumerate(_without_bom(handle, self.encoding), start=1):
                if raw.strip():
                    yield number, raw

    def _parse(self, raw: bytes, number: int) -> dict[str, Any] | Quarantine:
        """One line as a row, or the quarantine saying what is wrong with it (decoded only then)."""
        try:
            if not self._utf8:
                value = json.loads(raw.decode(self.encoding))
            else:
                value = orjson.loads(raw)  # also refuses bytes that are not UTF-8, NaN and Infinity
                shape = raw.translate(_SHAPE)
                if _NINETEEN_DIGITS in shape and (_TWENTY_DIGITS in shape or _MINUS_NINETEEN_DIGITS in shape):
                    value = json.loads(raw)  # read again by the stdlib, which keeps every integer exact
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return self._diagnose(raw, self.location(number), exc)
        if type(value) is not dict:
            return Quarantine({"line": self._text(raw)}, f"expected a JSON object, got {type(value).__name__}",
                              "malformed_row", self.location(number))
        try:
            self.check_typed(value)
        except SchemaViolation as problem:
            kept = value if is_canonical(value) else {"line": self._text(raw)}
            return Quarantine(kept, str(problem), problem.violation, self.location(number), problem.field,
                              problem.expected, problem.actual)
        return value

    def _text(self, raw: bytes) -> str:
        """A line as text for the trail, bytes that are not valid in the encoding kept as ``\\x`` escapes."""
        return raw.decode(self.encoding, "backslashreplace").rstrip("\r\n")

    def _diagnose(self, raw: bytes, where: str, exc: Exception) -> Quarantine:
        """What is wrong with a line the parser refused: its encoding, its nesting, NaN/Infinity, or its syntax."""
        text = self._text(raw)
        try:
            raw.decode(self.encoding)
        except UnicodeDecodeError:  # as for CSV: an `encoding` violation, the bad bytes kept as \x escapes
            return Quarantine({"line": text}, f"bytes that are not valid {self.encoding}", "encoding", where)
        try:  # the stdlib parser accepts NaN/Infinity and lone surrogates: tell the user which one is wrong
            json.loads(text)
        except RecursionError:
            return Quarantine({"line": text}, f"JSON nested too deeply to read ({exc})", "too_deep", where)
        except ValueError:
            return Quarantine({"line": text}, f"invalid JSON: {exc}", "malformed_row", where)
        if "surrogate" in str(exc):
            return Quarantine({"line": text}, f"a \\u escape that is not Unicode text ({exc})", "invalid_unicode",
                              where)
        return Quarantine({"line": text}, "NaN or Infinity is not allowed in audited data (use null)", "non_finite",
                          where)


class ParquetSource(_Source):
    """Parquet files, read in record batches."""

    plugin = "parquet"
    batch_size = 16_384

    def check_readable(self) -> None:
        super().check_readable()
        import pyarrow.parquet as pq

        try:
            pq.read_schema(self.path)
        except Exception as exc:
            raise InputError(f"{self.where}: {self.path} is not a readable Parquet file: {exc}") from exc

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any] | Quarantine]:
        """Rows and quarantines of rows ``start <= index < stop``, read batch by batch."""
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=self.batch_size):
            if number + batch.num_rows <= start:
                number += batch.num_rows
                continue
            for row in _python_rows(batch):
                number += 1
                if number <= start:
                    continue
                if stop is not None and number > stop:
                    return
                try:
                    self.check_typed(row)
                except SchemaViolation as problem:
                    yield Quarantine(_json_safe(row), str(problem), problem.violation, self.location(number),
                                     problem.field, problem.expected, problem.actual)
                    continue
                self._current = number
                yield row

    def count_records(self) -> int:
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(self.path).metadata.num_rows)

    def location(self, line: int) -> str:
        return f"{self.path.name}#row{line}"


def _python_rows(batch: Any) -> list[dict[str, Any]]:
    """A record batch's rows as Python values; nanosecond times are kept whole (see :func:`_nanosecond_times`)."""
    import pyarrow as pa

    names = batch.schema.names
    if not any(pa.types.is_timestamp(f.type) and f.type.unit == "ns" for f in batch.schema):
        return list(batch.to_pylist())
    columns = [_nanosecond_times(column) if pa.types.is_timestamp(column.type) and column.type.unit == "ns"
               else column.to_pylist() for column in batch.columns]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def _nanosecond_times(column: Any) -> list[Any]:
    """A ``timestamp[ns]`` column: a datetime where it holds the value exactly, else UTC ISO 8601 text with 9 digits.

    A datetime stops at microseconds, so pyarrow refuses to convert the others (which stopped the run);
    the text is what pandas' ``Timestamp.isoformat()`` gives, as ELSPETH normalises such values.
    """
    import pyarrow as pa

    return [nanosecond_iso(nanos) if nanos is not None and nanos % 1000
            else pa.scalar(nanos, column.type).as_py()  # as pyarrow converts it: None, or a datetime in its zone
            for nanos in column.cast(pa.int64()).to_pylist()]


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """``row``, or ELSPETH's ``{"_repr": repr(row)}`` when a value has no canonical JSON form (NaN, 2**62, too deep).

    Marked as a repr, it cannot be mistaken for data: replacing only the bad value by its repr text made a
    quarantined NaN (``"nan"``) identical, hash and all, to a real row holding the string ``"nan"``.
    """
    return row if is_canonical(row) else {"_repr": _repr(row)}


def _repr(value: Any) -> str:
    """``repr(value)``, or a stand-in when the value is nested too deeply to print."""
    try:
        return repr(value)
    except RecursionError:
        return f"<a {type(value).__name__} nested too deeply to show>"
