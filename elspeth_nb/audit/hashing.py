"""Canonical JSON (RFC 8785 / JCS) and SHA-256 hashes, byte-identical to ELSPETH's.

ELSPETH normalises a few Python types (datetime -> UTC ISO 8601, Decimal -> str, bytes ->
``{"__bytes__": base64}``, tuples -> lists) and then serialises with RFC 8785. We do the same,
but serialise through orjson: for the common case (str/int/bool/None, nested dicts and lists)
orjson with sorted keys *is* RFC 8785, and floats are pre-formatted with the ECMAScript number
rules RFC 8785 requires. Keys outside the Basic Multilingual Plane (where UTF-16 and code point
order differ) go through the reference ``rfc8785`` encoder. NaN and +/-Infinity, integers beyond
+/-2**53-1 and values nested deeper than ``MAX_DEPTH`` (a value containing itself included) are
rejected with a :class:`CanonicalizationError`, never a ``RecursionError``.

>>> stable_hash({"b": 1, "a": [1.0, "x"]}) == stable_hash({"a": [1, "x"], "b": 1})
True
>>> canonical_json({"b": 1.5e-7, "a": None})
'{"a":null,"b":1.5e-7}'
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from elspeth_nb.errors import CanonicalizationError

_SORT = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER
_dumps = orjson.dumps
_sha256 = hashlib.sha256
_MAX_SAFE_INT = 2**53 - 1
MAX_DEPTH = 254  # nested containers orjson serialises; deeper (or self-containing) values are rejected
_Fragment = orjson.Fragment
_FLAT_TYPES = frozenset({str, int, bool, type(None)})


class _NeedsReference(Exception):
    """The value needs the careful path (special types, non-BMP keys, or an error to explain)."""


def canonical_bytes(obj: Any) -> bytes:
    """RFC 8785 canonical JSON of ``obj`` as UTF-8 bytes."""
    try:
        if type(obj) is dict and _FLAT_TYPES.issuperset(map(type, obj.values())) and all(map(str.isascii, obj)):
            return _dumps(obj, option=_SORT)
        return _dumps(_prepare(obj), option=_SORT)
    except (_NeedsReference, TypeError, orjson.JSONEncodeError, CanonicalizationError, RecursionError):
        pass  # the careful path below explains what is wrong, or serialises what only it can
    try:
        return _dumps(_normalise(obj, "$", 0))
    except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate in a string
        raise CanonicalizationError(f"$: {exc}") from exc


def is_canonical(obj: Any) -> bool:
    """Whether ``obj`` has an RFC 8785 form (no NaN, no integer beyond 2**53, not too deep, JSON types only).

    >>> is_canonical({"a": [1, "x"]}), is_canonical(float("nan"))
    (True, False)
    """
    try:
        canonical_bytes(obj)
    except CanonicalizationError:
        return False
    return True


def canonical_json(obj: Any) -> str:
    """RFC 8785 canonical JSON of ``obj`` as a string."""
    return canonical_bytes(obj).decode("utf-8")


def stable_hash(obj: Any) -> str:
    """SHA-256 hex digest of the canonical JSON of ``obj`` (ELSPETH's ``stable_hash``)."""
    return _sha256(canonical_bytes(obj)).hexdigest()


def hash_bytes(data: bytes) -> str:
    """SHA-256 hex digest of raw bytes (payload refs, file contents)."""
    return _sha256(data).hexdigest()


def error_hash(text: str) -> str:
    """ELSPETH's 16-hex grouping key for an error string: ``sha256(text)[:16]``."""
    return _sha256(text.encode("utf-8")).hexdigest()[:16]


def canonical_json_prepared(obj: Any) -> str:
    """Canonical JSON of a structure the engine built itself: ASCII string keys, plain values and
    floats already passed through :func:`json_number` (skips the checks ``canonical_json`` makes)."""
    return _dumps(obj, option=_SORT).decode("utf-8")


def json_number(value: float) -> Any:
    """A float as orjson must see it to print RFC 8785's number form (raises for NaN/Infinity)."""
    magnitude = abs(value)
    if 1e-5 <= magnitude < 9007199254740992.0:
        return int(value) if value.is_integer() else value
    return _Fragment(format_number(value).encode("ascii"))


def _prepare(obj: Any) -> Any:
    """Plain JSON values with floats in RFC 8785 form; anything unusual asks for the reference path."""
    t = type(obj)
    if t is str or t is int or t is bool or obj is None:
        return obj
    if t is float:
        return json_number(obj)
    if t is _Fragment:  # a number already in RFC 8785 form
        return obj
    if t is dict:
        for key in obj:
            if type(key) is not str or (not key.isascii() and max(key) > "\uffff"):
                raise _NeedsReference
        return {k: _prepare(v) for k, v in obj.items()}
    if t is list or t is tuple:
        return [_prepare(v) for v in obj]
    raise _NeedsReference


def _normalise(obj: Any, path: str, depth: int) -> Any:
    """Turn ``obj`` into something orjson serialises canonically *without* OPT_SORT_KEYS.

    ``depth`` counts the containers around ``obj``; past ``MAX_DEPTH`` the value is rejected.
    """
    if obj is None or isinstance(obj, str | bool):
        return obj
    if isinstance(obj, int):
        if not -_MAX_SAFE_INT <= obj <= _MAX_SAFE_INT:
            raise CanonicalizationError(
                f"{path}: integer {obj} is outside the range RFC 8785 can represent exactly (+/-2**53-1); "
                "store it as a string", "integer_range")
        return int(obj)
    if isinstance(obj, float):  # float() first: a subclass (numpy's float64) has a repr of its own
        return _Fragment(format_number(float(obj), path).encode("ascii"))
    if isinstance(obj, _Fragment):
        return obj
    if isinstance(obj, Mapping | list | tuple) and depth >= MAX_DEPTH:
        shown = path if len(path) <= 60 else f"{path[:60]}..."
        raise CanonicalizationError(
            f"{shown}: nested more than {MAX_DEPTH} levels deep (or a value that contains itself); "
            "canonical JSON cannot be written for it", "too_deep")
    if isinstance(obj, Mapping):
        items = []
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CanonicalizationError(f"{path}: key {k!r} is a {type(k).__name__}; JSON keys must be strings")
            items.append((k, _normalise(v, f"{path}.{k}", depth + 1)))
        try:
            items.sort(key=lambda kv: kv[0].encode("utf-16-be"))
        except UnicodeEncodeError:  # a lone surrogate: not Unicode text, so no UTF-16 order and no UTF-8 bytes
            bad = next(k for k, _ in items if not _encodable(k))
            raise CanonicalizationError(f"{path}: key {bad!r} holds a lone surrogate, which JSON text cannot carry",
                                        "invalid_unicode") from None
        return dict(items)
    if isinstance(obj, list | tuple):
        return [_normalise(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj)]
    return _normalise(_normalise_scalar(obj, path), path, depth)


def _normalise_scalar(obj: Any, path: str) -> Any:
    """ELSPETH's value normalisation for non-JSON scalars."""
    if isinstance(obj, datetime):
        aware = obj if obj.tzinfo is not None else obj.replace(tzinfo=UTC)
        return aware.astimezone(UTC).isoformat()
    if isinstance(obj, date):
        return obj.isoformat()
    if isinstance(obj, bytes | bytearray | memoryview):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, Decimal):
        if not obj.is_finite():
            raise CanonicalizationError(
                f"{path}: non-finite Decimal {obj} cannot be hashed; use None for missing values", "non_finite")
        return str(obj)
    if isinstance(obj, frozenset | set):
        raise CanonicalizationError(f"{path}: sets have no canonical order; use a sorted list")
    if type(obj).__module__ == "numpy":  # numpy values as Python values, without importing numpy
        kind = type(obj).__name__
        if kind == "ndarray":  # before item(): a one-element array stays a list
            if obj.dtype.kind == "M":  # times one by one: tolist() gives some as bare ints
                return [_normalise_scalar(v, path) for v in obj] if obj.ndim else _normalise_scalar(obj[()], path)
            return obj.tolist()
        if kind == "datetime64":  # a UTC time, as ELSPETH writes it
            return _numpy_time(obj, path)
        if callable(getattr(obj, "item", None)):
            return obj.item()
    raise CanonicalizationError(f"{path}: a {type(obj).__name__} value cannot be hashed canonically")


#: numpy time units finer than a microsecond, which a Python datetime cannot hold (``[ns]``, ``[2ns]``...).
_SUB_MICROSECOND = re.compile(r"\[\d*(ns|ps|fs|as)\]$")


def _numpy_time(obj: Any, path: str) -> Any:
    """A numpy datetime64 as a date or datetime, or as ISO text with its nanoseconds."""
    if str(obj) == "NaT":
        return None
    if _SUB_MICROSECOND.search(str(obj.dtype)):  # through nanoseconds: item() of these is a bare int
        nanos = obj.astype("datetime64[ns]").astype("int64").item()
        return nanosecond_iso(nanos) if nanos % 1000 else obj.astype("datetime64[us]").item()
    value = obj.item()  # a date or datetime; an int past what those hold (year 10000 on)
    if isinstance(value, int):
        raise CanonicalizationError(f"{path}: the time {obj} is outside the years 1-9999 that ISO 8601 text "
                                    "without a sign holds; store it as a string", "time_range")
    return value


def nanosecond_iso(nanos: int) -> str:
    """UTC ISO 8601 text of a time in nanoseconds since the epoch, with nine fractional digits.

    For times a Python datetime cannot hold (it stops at microseconds); what pandas' isoformat writes.

    >>> nanosecond_iso(1_700_000_000_123_456_789), nanosecond_iso(-1)
    ('2023-11-14T22:13:20.123456789+00:00', '1969-12-31T23:59:59.999999999+00:00')
    """
    micros, rest = divmod(nanos, 1000)
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond:06d}{rest:03d}+00:00"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def format_number(value: float, path: str = "$") -> str:
    """Format a float as RFC 8785 requires (ECMAScript ``Number.prototype.toString``).

    >>> [format_number(v) for v in (1.0, 0.1, 1e21, 1.5e-7, 123456789012345680000.0, -0.0)]
    ['1', '0.1', '1e+21', '1.5e-7', '123456789012345680000', '0']
    """
    if math.isnan(value) or math.isinf(value):
        raise CanonicalizationError(
            f"{path}: {value} is not a finite number; NaN and Infinity cannot be hashed (use None for missing values)",
            "non_finite")
    if value == 0:
        return "0"
    text = float.__repr__(value)  # never a subclass's own repr
    sign = ""
    if text[0] == "-":
        sign, text = "-", text[1:]
    mantissa, _, exp_text = text.partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    exponent = int(exp_text) if exp_text else 0
    digits = (int_part + frac_part).lstrip("0")
    # value = 0.digits * 10**n  (ECMAScript's n), before stripping trailing zeros
    if int_part.strip("0"):
        n = len(int_part.lstrip("0")) + exponent
    else:
        n = exponent - (len(frac_part) - len(frac_part.lstrip("0")))
    digits = digits.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        exp = ("+" if e >= 0 else "-") + str(abs(e))
        out = (digits[0] + ("." + digits[1:] if k > 1 else "")) + "e" + exp
    return sign + out


__all__ = [
    "MAX_DEPTH", "canonical_bytes", "canonical_json", "canonical_json_prepared", "error_hash", "format_number",
    "hash_bytes", "json_number", "stable_hash",
]
