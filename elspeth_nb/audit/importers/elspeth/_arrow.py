"""Vectorised Arrow helpers: timestamp parsing, keyed column patches and casting to our schema."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from elspeth_nb.audit.schema import TABLES

UTC_TS = pa.timestamp("us", tz="UTC")


def to_utc(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, int]:
    """ELSPETH's naive UTC text (or ISO 8601 with an offset) -> ``timestamp[us, UTC]``; (column, unparseable)."""
    try:
        return pc.cast(column, pa.timestamp("us")).cast(UTC_TS), 0
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    try:
        return pc.cast(column, UTC_TS), 0
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = [_parse(v) for v in column.to_pylist()]
        bad = sum(1 for v, raw in zip(values, column.to_pylist(), strict=True) if v is None and raw is not None)
        return pa.chunked_array([pa.array(values, UTC_TS)]), bad


def _parse(text: str | None) -> datetime | None:
    """One timestamp the vectorised casts refused (mixed formats); None if unparseable."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def convert_timestamps(name: str, table: pa.Table) -> tuple[pa.Table, list[str]]:
    """Every timestamp column of ``name`` (per our schema) parsed; a problem per column with bad values."""
    problems = []
    for f in TABLES[name].schema:
        if pa.types.is_timestamp(f.type) and f.name in table.column_names:
            index = table.schema.get_field_index(f.name)
            converted, bad = to_utc(table.column(index))
            table = table.set_column(index, pa.field(f.name, UTC_TS), converted)
            if bad:
                problems.append(f"{bad} unparseable timestamp(s) in {name}.{f.name} were imported as NULL")
    return table, problems


def lookup(keys: pa.ChunkedArray, table: pa.Table, key: str, value: str) -> pa.ChunkedArray:
    """``table[value]`` of the row whose ``table[key]`` equals each of ``keys`` (NULL where none)."""
    return lookup_many(keys, table, key, [value])[0]


def lookup_many(keys: pa.ChunkedArray, table: pa.Table, key: str, values: list[str]) -> list[pa.ChunkedArray]:
    """Several columns of :func:`lookup`, matching the keys once."""
    if table.num_rows == 0:
        return [pa.chunked_array([pa.nulls(len(keys), table.schema.field(v).type)]) for v in values]
    index = pc.index_in(keys, value_set=table.column(key).combine_chunks(), skip_nulls=True)
    return [pc.take(table.column(v), index) for v in values]


def replace(table: pa.Table, name: str, values: pa.ChunkedArray | pa.Array) -> pa.Table:
    """``table`` with column ``name`` replaced (or appended) by ``values``."""
    index = table.schema.get_field_index(name)
    field = pa.field(name, values.type)
    return table.set_column(index, field, values) if index >= 0 else table.append_column(field, values)


def constant(table: pa.Table, value: object, type_: pa.DataType) -> pa.Array:
    """A column of ``value`` as long as ``table``."""
    return pa.array([value] * table.num_rows, type_) if value is not None else pa.nulls(table.num_rows, type_)


def with_import_problems(runs: pa.Table, problems: list[str] | Mapping[str, list[str]]) -> pa.Table:
    """``runs`` carrying the import's findings (a JSON list; NULL when there were none): the same for every run,
    or each run's own (run id -> problems)."""
    if not isinstance(problems, Mapping):
        text = json.dumps(problems, ensure_ascii=False) if problems else None
        return replace(runs, "import_problems_json", constant(runs, text, pa.string()))
    texts = [json.dumps(problems[r], ensure_ascii=False) if problems.get(r) else None
             for r in runs.column("run_id").to_pylist()]
    return replace(runs, "import_problems_json", pa.array(texts, pa.string()))


def conform(table: pa.Table, name: str) -> pa.Table:
    """Exactly ``TABLES[name].schema``: columns in order, cast (int64 -> int32, list child names...)."""
    schema = TABLES[name].schema
    return pa.Table.from_arrays([table.column(f.name).cast(f.type) for f in schema], schema=schema)
