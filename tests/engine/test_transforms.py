"""Built-in transforms on rows that test their edges: name clashes, missing fields."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from elspeth_nb.engine.plugins.transforms import FieldMapper


def _mapper(mapping: dict[str, str], select_only: bool = False) -> FieldMapper:
    return FieldMapper(SimpleNamespace(mapping=mapping, select_only=select_only, strict=False))


@pytest.mark.parametrize(("row", "out", "reason"), [  # ELSPETH's reason: targets modified or added
    ({"a": "new", "b": "old"}, {"b": "new"}, {"fields_modified": ["b"]}),  # the mapped value wins, either order
    ({"b": "old", "a": "new"}, {"b": "new"}, {"fields_modified": ["b"]}),
    ({"b": "old", "c": 1}, {"b": "old", "c": 1}, {}),  # nothing to map: b stays, and the reason says so
    ({"a": 1, "c": 2}, {"b": 1, "c": 2}, {"fields_added": ["b"]}),
])
def test_field_mapper_renames_onto_an_existing_field_and_reports_what_it_mapped(
        row: dict[str, Any], out: dict[str, Any], reason: dict[str, Any]) -> None:
    result, text = _mapper({"a": "b"}).process(row)
    assert result == out and json.loads(text) == {"action": "mapped", **reason}


def test_field_mapper_swaps_two_fields() -> None:
    result, _ = _mapper({"a": "b", "b": "a"}).process({"a": 1, "b": 2, "c": 3})
    assert result == {"a": 2, "b": 1, "c": 3}
