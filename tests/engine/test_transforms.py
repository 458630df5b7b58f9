"""Built-in transforms on rows that test their edges: name clashes, missing fields."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from elspeth_nb.engine.plugins.transforms import FieldMapper


def _mapper(mapping: dict[str, str], select_only: bool = False) -> FieldMapper:
    return FieldMapper(SimpleNamespace(mapping=mapping, select_only=select_only, strict=False))


@pytest.mark.parametrize(("row", "out", "mapped"), [
    ({"a": "new", "b": "old"}, {"b": "new"}, ["a"]),  # the mapped value wins, whichever field comes first
    ({"b": "old", "a": "new"}, {"b": "new"}, ["a"]),
    ({"b": "old", "c": 1}, {"b": "old", "c": 1}, []),  # nothing to map: b stays, and the reason says so
    ({"a": 1, "c": 2}, {"b": 1, "c": 2}, ["a"]),
])
def test_field_mapper_renames_onto_an_existing_field_and_reports_what_it_mapped(
        row: dict[str, Any], out: dict[str, Any], mapped: list[str]) -> None:
    result, reason = _mapper({"a": "b"}).process(row)
    assert result == out and json.loads(reason) == {"action": "mapped", "fields_mapped": mapped}


def test_field_mapper_swaps_two_fields() -> None:
    result, _ = _mapper({"a": "b", "b": "a"}).process({"a": 1, "b": 2, "c": 3})
    assert result == {"a": 2, "b": 1, "c": 3}
