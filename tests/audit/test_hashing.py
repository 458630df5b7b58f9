"""Our canonical JSON must be byte-identical to the reference RFC 8785 encoder ELSPETH uses."""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from elspeth_nb.audit.hashing import (
    MAX_DEPTH,
    canonical_bytes,
    error_hash,
    format_number,
    is_canonical,
    stable_hash,
)
from elspeth_nb.errors import CanonicalizationError

SAFE_INT = 2**53 - 1
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-SAFE_INT, max_value=SAFE_INT)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_matches_reference_encoder(value: object) -> None:
    assert canonical_bytes(value) == rfc8785.dumps(value)


@settings(max_examples=1000, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_format_like_ecmascript(value: float) -> None:
    assert format_number(value).encode() == rfc8785.dumps(value)


def test_keys_sort_by_utf16_code_units_outside_the_bmp() -> None:
    value = {"\ue000": 1, "\U0001f600": 2, "a": 3}
    assert canonical_bytes(value) == rfc8785.dumps(value)
    assert canonical_bytes(value).index("😀".encode()) < canonical_bytes(value).index("\ue000".encode())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, {"x": [1, math.nan]}, Decimal("NaN")])
def test_non_finite_values_are_rejected_with_their_path(bad: object) -> None:
    with pytest.raises(CanonicalizationError, match=r"NaN|Infinity|finite|nan|inf"):
        canonical_bytes(bad)


def test_unsafe_integers_and_sets_are_rejected() -> None:
    with pytest.raises(CanonicalizationError, match=r"\$\.big"):
        canonical_bytes({"big": 2**60})
    with pytest.raises(CanonicalizationError, match="sorted list"):
        canonical_bytes({"s": {1, 2}})


def test_rejections_name_their_violation() -> None:
    for value, violation in (({"big": -(2**53)}, "integer_range"), ({"x": [math.inf]}, "non_finite"),
                             ({"s": {1}}, "not_json"), ({"s": "\ud800"}, "not_json")):
        with pytest.raises(CanonicalizationError) as caught:
            canonical_bytes(value)
        assert caught.value.violation == violation, value


def _nested(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("levels", [MAX_DEPTH, MAX_DEPTH + 1, 900, 5000])
def test_nesting_past_max_depth_is_a_canonicalization_error_not_a_recursion_error(levels: int) -> None:
    row = {"x": _nested(levels - 1)}  # the row itself is the first level
    if levels <= MAX_DEPTH:
        assert canonical_bytes(row) == rfc8785.dumps(row)
        return
    with pytest.raises(CanonicalizationError, match=rf"^\$\.x\[0\].*: nested more than {MAX_DEPTH} levels") as caught:
        canonical_bytes(row)
    assert caught.value.violation == "too_deep"


def test_a_value_that_contains_itself_is_rejected() -> None:
    row: dict[str, object] = {"id": 1}
    row["me"] = row
    with pytest.raises(CanonicalizationError, match=r"contains itself") as caught:
        canonical_bytes({"id": 1, "row": row})
    assert caught.value.violation == "too_deep"


def test_elspeth_normalisation_of_python_types() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    naive = datetime(2026, 1, 2, 3, 4, 5)
    value = {"t": moment, "n": naive, "d": Decimal("1.10"), "b": b"\x00\xff", "tuple": (1, 2)}
    expected = {
        "t": moment.astimezone(UTC).isoformat(), "n": naive.replace(tzinfo=UTC).isoformat(), "d": "1.10",
        "b": {"__bytes__": base64.b64encode(b"\x00\xff").decode()}, "tuple": [1, 2],
    }
    assert canonical_bytes(value) == rfc8785.dumps(expected)


class _NumpyLike(float):
    """A float subclass with a repr of its own, as numpy 2's float64 (``np.float64(0.25)``)."""

    __module__ = "numpy"

    def __repr__(self) -> str:
        return f"np.float64({float(self)!r})"


class _DType(str):
    """A dtype: its name as str() gives it, and its kind letter."""

    kind: str


class ndarray:
    """Named as numpy names its arrays, which is what the normaliser looks for."""

    __module__ = "numpy"

    def __init__(self, values: list[Any], kind: str = "f", dtype: str = "float64") -> None:
        self.values = values
        self.dtype = _DType(dtype)
        self.dtype.kind = kind
        self.ndim = 1

    def __iter__(self) -> Iterator[Any]:
        return iter(self.values)

    def item(self) -> float:
        if len(self.values) != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        return self.values[0]

    def tolist(self) -> list[Any]:  # as numpy's: elements as Python scalars (times of ns precision: bare ints)
        return [v.item() if isinstance(v, datetime64) else v for v in self.values]


def test_a_float_subclass_is_written_as_its_number_and_arrays_as_lists() -> None:
    value = {"score": _NumpyLike(0.25), "w": _NumpyLike(3.0), "big": _NumpyLike(1e21), "one": ndarray([1.5]),
             "many": ndarray([1.0, 2.5])}
    expected = {"score": 0.25, "w": 3, "big": 1e21, "one": [1.5], "many": [1, 2.5]}
    assert canonical_bytes(value) == rfc8785.dumps(expected)


class datetime64:
    """As numpy's datetime64 answers the normaliser: str() ``NaT``, dtype, astype() to other units, item()."""

    __module__ = "numpy"

    def __init__(self, nanos: int | None, unit: str = "datetime64[ns]") -> None:
        self.nanos, self.dtype = nanos, unit

    def __str__(self) -> str:
        return "NaT" if self.nanos is None else f"datetime64({self.nanos}, {self.dtype})"

    def astype(self, unit: str) -> datetime64:
        return datetime64(self.nanos, unit)

    def item(self) -> int | date | datetime | None:
        if self.nanos is None:
            return None
        try:
            moment = datetime(1970, 1, 1) + timedelta(microseconds=self.nanos // 1000)
        except OverflowError:  # past year 9999 numpy's item() gives a bare int (days, for [D])
            return self.nanos // (86_400 * 10**9)
        if self.dtype == "datetime64[D]":
            return moment.date()
        if self.dtype in ("datetime64[us]", "datetime64[s]"):
            return moment
        return self.nanos  # numpy's item() of nanoseconds (and astype("int64")) is a bare int


def test_numpy_times_keep_their_nanoseconds() -> None:
    value = {"ns": datetime64(1_700_000_000_123_456_789), "us": datetime64(1_700_000_000_123_456_000),
             "nat": datetime64(None)}
    assert canonical_bytes(value) == rfc8785.dumps(
        {"ns": "2023-11-14T22:13:20.123456789+00:00", "us": "2023-11-14T22:13:20.123456+00:00", "nat": None})


def test_numpy_time_arrays_are_lists_of_times() -> None:
    """tolist() of a datetime64[ns] array gives bare ints, which would hash as numbers (or fail past 2**53)."""
    times = ndarray([datetime64(1_700_000_000_123_456_789), datetime64(None)], kind="M", dtype="datetime64[ns]")
    assert canonical_bytes({"at": times}) == rfc8785.dumps({"at": ["2023-11-14T22:13:20.123456789+00:00", None]})


def test_numpy_dates_beyond_2262_stay_what_they_are() -> None:
    """Coarser units are not passed through nanoseconds, which cannot hold a time past 2262 (it wrapped around)."""
    year_3000 = 32_503_680_000 * 10**9  # 3000-01-01 in nanoseconds since 1970: more than an int64 of ns holds
    day, second = datetime64(year_3000, "datetime64[D]"), datetime64(year_3000, "datetime64[s]")
    assert canonical_bytes({"d": day, "days": ndarray([day], kind="M", dtype="datetime64[D]"), "s": second}) == \
        rfc8785.dumps({"d": "3000-01-01", "days": ["3000-01-01"], "s": "3000-01-01T00:00:00+00:00"})


def test_numpy_times_in_multiples_of_a_nanosecond_and_past_year_9999() -> None:
    """A [2ns] unit is a sub-microsecond one too; a time past 9999 has no plain ISO text (it hashed as an int)."""
    assert canonical_bytes({"t": datetime64(10, "datetime64[2ns]")}) == b'{"t":"1970-01-01T00:00:00.000000010+00:00"}'
    with pytest.raises(CanonicalizationError, match=r"outside the years 1-9999") as caught:
        canonical_bytes({"t": datetime64(316_224_000 * 10**12, "datetime64[D]")})  # about year 12000
    assert caught.value.violation == "time_range"


def test_a_key_holding_a_lone_surrogate_is_a_canonicalization_error() -> None:
    with pytest.raises(CanonicalizationError) as caught:
        canonical_bytes({"ok": 1, "\ud800": 2})
    assert caught.value.violation == "invalid_unicode" and "'\\ud800'" in str(caught.value)
    assert not is_canonical({"\ud800": 2})


def test_stable_hash_is_sha256_of_canonical_bytes() -> None:
    row = {"id": 1, "name": "x", "amount": 2.5}
    assert stable_hash(row) == hashlib.sha256(rfc8785.dumps(row)).hexdigest()


def test_error_hash_matches_elspeth_grouping_keys() -> None:
    # values listed in the ELSPETH reference (sha256(text)[:16])
    assert error_hash("late_arrival_after_merge") == "6eb4c47f6e339fa9"
    assert error_hash("incomplete_branches") == "c320d0eeacce4a06"
    assert error_hash("quorum_not_met") == "d766cd0a95cc4e5f"


def test_the_violation_survives_pickling() -> None:
    """Sharded runs send errors between processes: the reason must arrive with the message."""
    import pickle

    from elspeth_nb.errors import CanonicalizationError

    error = pickle.loads(pickle.dumps(CanonicalizationError("$.x: too deep", "too_deep")))
    assert (str(error), error.violation) == ("$.x: too deep", "too_deep")
