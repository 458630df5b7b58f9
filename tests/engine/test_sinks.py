"""Sinks write exactly what the trail says they wrote: a row that does not fit fails on its own, when written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from elspeth_nb.engine.plugins.sinks import ParquetSink, SinkWriteError


def _sink(tmp_path: Path, first: dict[str, Any]) -> ParquetSink:
    sink = ParquetSink(tmp_path / "out.parquet")
    sink.open()
    sink.write(first, b"")
    return sink


def _written(sink: ParquetSink) -> list[dict[str, Any]]:
    artifact = sink.close()
    table = pq.read_table(sink.path)
    assert artifact.rows == table.num_rows
    return table.to_pylist()


FITS = [  # (first row's value, a later value its column holds, what the file holds for it)
    (1, 2.0, 2), (1, -(2**63), -(2**63)), (1.5, 2, 2.0), (1.5, 2**53, float(2**53)), (True, False, False),
    ("a", "b", "b"), ({"k": [1]}, {"k": [2, 3]}, {"k": [2, 3]}), ({"k": 1, "j": "x"}, {"k": 2}, {"k": 2, "j": None}),
    ([1.5], [2], [2.0]),
]
DOES_NOT_FIT = [  # (first row's value, a later value its column cannot hold, the column type the error names)
    (1, 2.5, "int64"), (1, True, "int64"), (1, 2**63, "int64"), (1, "1", "int64"), (1.5, 2**53 + 1, "double"),
    (1.5, "x", "double"), (True, 1, "bool"), ("a", 1, "string"), ("a", {"k": 1}, "string"), (None, 5, "null"),
    ({"k": 1}, {"k": 1, "z": 2}, "struct<k: int64>"), ({"k": 1}, {"k": "x"}, "struct<k: int64>"),
    ([1], [True], "list<item: int64>"), ([1], ["x"], "list<item: int64>"), ([], [1], "list<item: null>"),
]


@pytest.mark.parametrize(("first", "later", "stored"), FITS)
def test_parquet_column_holds_values_that_read_back_the_same(tmp_path: Path, first: Any, later: Any,
                                                             stored: Any) -> None:
    sink = _sink(tmp_path, {"id": 1, "v": first})
    sink.write({"id": 2, "v": later}, b"")
    assert _written(sink)[1] == {"id": 2, "v": stored}


@pytest.mark.parametrize(("first", "later", "column"), DOES_NOT_FIT)
def test_parquet_value_its_column_cannot_hold_fails_that_row_only(tmp_path: Path, first: Any, later: Any,
                                                                  column: str) -> None:
    sink = _sink(tmp_path, {"id": 1, "v": first})
    with pytest.raises(SinkWriteError) as failed:
        sink.write({"id": 2, "v": later}, b"")
    kind = type(later).__name__
    hint = ("; 'v' had no value in the first row; declare the type in the sink's options.schema.fields "
            "(e.g. 'v: str?')") if column == "null" else ""
    assert str(failed.value) == (f"value(s) the columns cannot hold: 'v' is {kind} but its column is {column}{hint} "
                                 f"(the sink's first row fixed the Parquet schema: id: int64, v: {column})")
    sink.write({"id": 3, "v": None}, b"")
    assert [row["id"] for row in _written(sink)] == [1, 3]


def test_parquet_schema_is_fixed_by_the_first_row(tmp_path: Path) -> None:
    """A later row may lack fields (stored as null) but not add any; the check is made when it is written."""
    sink = _sink(tmp_path, {"id": 1, "x": "a"})
    sink.write({"x": "b"}, b"")
    with pytest.raises(SinkWriteError, match=re.escape(
            "field(s) 'extra' (str), 'n' (dict) not in the schema; value(s) the columns cannot hold: 'id' is str "
            "but its column is int64 (the sink's first row fixed the Parquet schema: id: int64, x: string)")):
        sink.write({"id": "3", "x": "c", "extra": "E", "n": {}}, b"")
    sink.flush()  # only checked rows are pending: a flush never fails on a row
    sink.write({"id": 4, "x": "d"}, b"")
    assert _written(sink) == [{"id": 1, "x": "a"}, {"id": None, "x": "b"}, {"id": 4, "x": "d"}]


def test_parquet_first_row_parquet_cannot_store_is_refused_and_the_next_fixes_the_schema(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path / "out.parquet")
    sink.open()
    with pytest.raises(SinkWriteError, match=r"^row cannot be stored in Parquet, so it cannot fix the file's "
                                             r"schema: ArrowNotImplementedError: Cannot write struct type 'e'"):
        sink.write({"id": 1, "e": {}}, b"")
    with pytest.raises(SinkWriteError, match=r"^row cannot be stored in Parquet, .*: OverflowError: "):
        sink.write({"id": 2**64}, b"")
    sink.write({"id": 3}, b"")
    assert _written(sink) == [{"id": 3}]


def test_parquet_declared_fields_take_their_declared_type(tmp_path: Path) -> None:
    """An optional field first seen empty gets its declared column; a declared field the first row lacks too."""
    sink = ParquetSink(tmp_path / "out.parquet", {"note": "str", "score": "float", "tag": "any"})
    sink.open()
    sink.write({"id": 1, "note": None, "tag": 7}, b"")
    sink.write({"id": 2, "note": "late", "score": 2}, b"")
    with pytest.raises(SinkWriteError, match=r"'note' is int but its column is string"):
        sink.write({"id": 3, "note": 5}, b"")
    assert _written(sink) == [{"id": 1, "note": None, "tag": 7, "score": None},
                              {"id": 2, "note": "late", "tag": None, "score": 2.0}]
    assert str(pq.read_schema(sink.path).field("note").type) == "string"


def test_parquet_first_row_that_breaks_the_declared_schema_is_refused(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path / "out.parquet", {"id": "int"})
    sink.open()
    with pytest.raises(SinkWriteError, match=re.escape(
            "value(s) that do not fit the sink's declared schema: 'id' is str but it is declared int")):
        sink.write({"id": "one"}, b"")
    sink.write({"id": 2}, b"")
    assert _written(sink) == [{"id": 2}]


def test_csv_values_holding_line_breaks_read_back_as_written(tmp_path: Path) -> None:
    import csv

    from elspeth_nb.engine.plugins.sinks import CsvSink

    rows = [{"id": 1, "note": "a\rb"}, {"id": 2, "note": "c\nd"}, {"id": 3, "note": "plain"}]
    sink = CsvSink(tmp_path / "out.csv")
    sink.open()
    for row in rows:
        sink.write(row, b"")
    artifact = sink.close()
    with (tmp_path / "out.csv").open(newline="") as handle:
        read = list(csv.DictReader(handle))
    assert read == [{"id": str(r["id"]), "note": r["note"]} for r in rows] and artifact.rows == len(read)


def test_csv_row_with_no_fields_is_refused_instead_of_written_as_a_blank_line(tmp_path: Path) -> None:
    """A blank line is no record to a CSV reader, so an empty row would vanish; refusing it fails that token only."""
    import csv

    from elspeth_nb.engine.plugins.sinks import CsvSink

    sink = CsvSink(tmp_path / "out.csv")
    sink.open()
    with pytest.raises(SinkWriteError, match="a row with no fields cannot be written as CSV"):
        sink.write({}, b"{}")
    sink.write({"id": 1}, b"")
    with pytest.raises(SinkWriteError, match="no fields"):
        sink.write({}, b"{}")
    artifact = sink.close()
    with (tmp_path / "out.csv").open(newline="") as handle:
        assert list(csv.DictReader(handle)) == [{"id": "1"}]
    assert artifact.rows == 1
