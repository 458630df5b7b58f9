"""Built-in row transforms: passthrough, field_mapper, truncate, keyword_filter, latency, python.

A transform's ``process(row)`` returns ``(output_row, success_reason_json)`` and never mutates
``row`` (forked branches share it). Returning the very same dict object means "unchanged": the
engine then reuses the input hash instead of hashing again. A row the transform refuses raises
:class:`RowRejected`, which the engine records as a transform error and routes by ``on_error``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import orjson

from elspeth_nb.errors import ConfigError

Row = dict[str, Any]


class RowRejected(Exception):
    """Raised by a transform (or a user ``python`` function) to refuse a row with a reason.

    >>> RowRejected("blocked_content", field="note").details
    {'reason': 'blocked_content', 'field': 'note'}
    """

    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.details: dict[str, Any] = {"reason": reason, **details}


def _reason(**fields: Any) -> str:
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS).decode()


class Passthrough:
    """Returns the row unchanged."""

    _REASON = _reason(action="passthrough")

    def __init__(self, options: Any = None) -> None:
        del options

    def process(self, row: Row) -> tuple[Row, str]:
        return row, self._REASON


class FieldMapper:
    """Renames fields (``mapping`` source -> target); ``select_only`` keeps only mapped fields."""

    def __init__(self, options: Any) -> None:
        self.mapping: dict[str, str] = dict(options.mapping)
        self.select_only: bool = bool(options.select_only)
        self.strict: bool = bool(getattr(options, "strict", False))
        self._targets = frozenset(self.mapping.values())
        self._reasons: dict[tuple[tuple[str, ...], tuple[bool, ...]], str] = {}

    def process(self, row: Row) -> tuple[Row, str]:
        """The mapped row; a mapped value wins over a field already named like its target, whatever their order."""
        mapping = self.mapping
        present = [f for f in mapping if f in row]
        if self.strict and len(present) < len(mapping):
            raise RowRejected("missing_field", fields=[f for f in mapping if f not in row], available=sorted(row))
        if self.select_only:
            out = {mapping[src]: row[src] for src in present}
        else:
            targets = self._targets if len(present) == len(mapping) else {mapping[f] for f in present}
            out = {}
            for key, value in row.items():
                if key in mapping:
                    out[mapping[key]] = value
                elif key not in targets:  # a field a mapped value replaces
                    out[key] = value
        return out, self._reason_for(present, row)

    def _reason_for(self, present: list[str], row: Row) -> str:
        """ELSPETH's reason: the targets the row already had (modified) and those it gains (added)."""
        targets = [self.mapping[src] for src in present]
        key = (tuple(present), tuple(target in row for target in targets))
        reason = self._reasons.get(key)
        if reason is None:
            lists = {"fields_added": sorted(t for t, had in zip(targets, key[1], strict=True) if not had),
                     "fields_modified": sorted(t for t, had in zip(targets, key[1], strict=True) if had)}
            reason = self._reasons[key] = _reason(action="mapped", **{k: v for k, v in lists.items() if v})
        return reason


class Truncate:
    """Shortens string fields to a maximum length that includes ``suffix`` (as ELSPETH)."""

    def __init__(self, options: Any) -> None:
        self.limits: list[tuple[str, int]] = list(dict(options.fields).items())
        self.suffix: str = options.suffix or ""
        self._reasons: dict[tuple[str, ...], str] = {}

    def process(self, row: Row) -> tuple[Row, str]:
        out: Row | None = None
        modified: list[str] = []
        suffix = self.suffix
        for field, limit in self.limits:
            value = row.get(field)
            if type(value) is str and len(value) > limit:
                if out is None:
                    out = dict(row)
                out[field] = value[: limit - len(suffix)] + suffix
                modified.append(field)
        key = tuple(modified)
        reason = self._reasons.get(key)
        if reason is None:
            reason = self._reasons[key] = (
                _reason(action="transformed", fields_modified=modified) if modified else _reason(action="unchanged")
            )
        return (row if out is None else out), reason


class KeywordFilter:
    """Rejects rows whose fields match a blocked pattern (``re.search``)."""

    _REASON = _reason(action="filtered")  # ELSPETH's word for a row the filter let through

    def __init__(self, options: Any) -> None:
        fields = options.fields
        self.fields: tuple[str, ...] | None = None if fields == "all" else tuple(fields)
        self.patterns = [(p, re.compile(p)) for p in options.blocked_patterns]

    def process(self, row: Row) -> tuple[Row, str]:
        names = self.fields if self.fields is not None else tuple(row)
        for name in names:
            value = row.get(name)
            if type(value) is not str:
                continue
            for text, pattern in self.patterns:
                match = pattern.search(value)
                if match is not None:
                    raise RowRejected(
                        "blocked_content", field=name, field_length=len(value),
                        match_length=match.end() - match.start(), match_position=match.start(), matched_pattern=text,
                    )
        return row, self._REASON


_MASK = (1 << 64) - 1
_UNIT = 1.0 / (1 << 64)
_STANDARD_NORMAL = NormalDist()


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


@dataclass(frozen=True)
class CallPlan:
    """What the simulated call will do for one row: how long it takes and whether it fails."""

    delay_s: float
    fails: bool


class Latency:
    """A simulated external call: seeded delay per (node, row), optional failure rate.

    Delays depend only on ``seed``, the node name and the row index, never on scheduling, so
    a run is reproducible even though branches overlap in time.
    """

    def __init__(self, options: Any, node_name: str) -> None:
        self.distribution: str = options.distribution
        self.mean_ms = float(options.mean_ms or 0.0)
        self.low_ms = float(options.low_ms or 0.0)
        self.high_ms = float(options.high_ms or 0.0)
        self.sigma = float(options.sigma or 0.5)
        self.max_ms = None if options.max_ms is None else float(options.max_ms)
        self.failure_rate = float(options.failure_rate or 0.0)
        digest = hashlib.sha256(f"{options.seed}:{node_name}".encode()).digest()
        self._salt = int.from_bytes(digest[:8], "little")

    def plan(self, row_index: int) -> CallPlan:
        a = _splitmix64(self._salt ^ row_index)
        b = _splitmix64(a)
        u = (a >> 11) * (1.0 / (1 << 53))
        u = min(max(u, 1e-12), 1 - 1e-12)
        ms = self._delay_ms(u)
        if self.max_ms is not None:
            ms = min(ms, self.max_ms)
        return CallPlan(delay_s=ms / 1000.0, fails=(b * _UNIT) < self.failure_rate)

    def _delay_ms(self, u: float) -> float:
        if self.distribution == "fixed":
            return self.mean_ms
        if self.distribution == "uniform":
            return self.low_ms + u * (self.high_ms - self.low_ms)
        if self.distribution == "exponential":
            return -self.mean_ms * math.log1p(-u)
        return self.mean_ms * math.exp(self.sigma * _STANDARD_NORMAL.inv_cdf(u))


class PythonFunction:
    """Calls a user function ``fn(row, **options) -> dict``; the extension point.

    The function gets a deep copy of the row, so it cannot alter what other branches see.
    """

    _REASON = _reason(action="python")

    def __init__(self, options: Any, base_dir: Path, where: str) -> None:
        self.function: Callable[..., Any] = load_callable(options.function, base_dir, where)
        self.kwargs: dict[str, Any] = dict(options.options or {})
        self.label = options.function

    def process(self, row: Row) -> tuple[Row, str]:
        out = self.function(copy.deepcopy(row), **self.kwargs)
        if not isinstance(out, Mapping):
            raise RowRejected("bad_return_type", function=self.label, returned=type(out).__name__)
        return dict(out), self._REASON


def load_callable(spec: str, base_dir: Path, where: str) -> Callable[..., Any]:
    """Resolve ``package.module:name`` or ``path/to/file.py:name`` (relative to the settings file)."""
    module_part, _, attr = spec.rpartition(":")
    try:
        if module_part.endswith(".py"):
            path = (base_dir / module_part).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            name = f"elspeth_nb_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_part)
        if not hasattr(module, attr):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise AttributeError(f"{module_part} has no attribute {attr!r}"
                                 + (f"; it defines {', '.join(names[:10])}" if names else ""))
        function = getattr(module, attr)
    except (ImportError, FileNotFoundError, AttributeError, SyntaxError) as exc:
        raise ConfigError([f"{where}: cannot load python function {spec!r}: {exc}"]) from exc
    except Exception as exc:  # the module's own code failed while it was imported
        raise ConfigError([f"{where}: importing {module_part!r} for python function {spec!r} raised "
                           f"{type(exc).__name__}: {exc}"]) from exc
    if not callable(function):
        raise ConfigError([f"{where}: {spec!r} is a {type(function).__name__}, not a function"])
    return function  # type: ignore[no-any-return]
