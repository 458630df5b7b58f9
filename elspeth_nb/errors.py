"""One exception root for elspeth-nb; each leaf also inherits the builtin it behaves like.

Users can write ``except elspeth_nb.Error`` to catch anything we raise on purpose, or the
builtin (``KeyError``, ``ValueError``, ``FileNotFoundError``...) they would expect anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


class Error(Exception):
    """Root of every error elspeth-nb raises deliberately."""


class ConfigError(Error, ValueError):
    """A pipeline configuration is invalid; ``problems`` lists each one by its path in the file."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class CanonicalizationError(Error, ValueError):
    """A value cannot be hashed canonically; ``violation`` names why, for the audit trail.

    ``non_finite`` (NaN, Infinity), ``integer_range`` (beyond +/-2**53-1), ``too_deep`` (nesting, a value
    containing itself), ``invalid_unicode`` (a lone surrogate) or ``not_json`` (a type or key JSON cannot hold).
    """

    def __init__(self, message: str, violation: str = "not_json") -> None:
        super().__init__(message, violation)
        self.violation = violation

    def __str__(self) -> str:
        return str(self.args[0])


class InputError(Error, OSError):
    """A source or sink file cannot be read or written."""


class PluginError(Error, RuntimeError):
    """A plugin failed outside the per-row error handling (setup, teardown)."""


class AuditStoreError(Error, OSError):
    """The audit store cannot be opened, written or read; ``segments`` maps each segment file found unreadable
    to what reading it said (empty when no segment is to blame)."""

    def __init__(self, *args: object, segments: Mapping[Path, str] | None = None) -> None:
        super().__init__(*args)
        self.segments: dict[Path, str] = dict(segments or {})


class AuditStoreWarning(UserWarning):
    """Part of the audit store cannot be read and is left out; the rest is read as usual."""


class SchemaVersionError(AuditStoreError):
    """The audit store was written by a schema version this release cannot read."""


class NotFoundError(Error, KeyError):
    """Something asked for by id or name does not exist; the message lists what does."""

    def __init__(self, what: str, wanted: object, available: Iterable[object] = (), hint: str = "") -> None:
        self.what = what
        self.wanted = wanted
        shown = [str(a) for a in available]
        listing = ", ".join(f"`{a}`" for a in shown[:10])
        if len(shown) > 10:
            listing += f" (and {len(shown) - 10} more)"
        message = f"{what} `{wanted}` not found."
        if shown:
            message += f" Available: {listing}."
        elif available is not None:
            message += " There are none."
        if hint:
            message += f" Hint: {hint}"
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:  # KeyError quotes its argument; keep the sentence readable.
        return self.message


class RunNotFoundError(NotFoundError):
    """A run id is not in the audit store."""


class AuditClosedError(Error, ValueError):
    """An ``Audit`` was used after ``close()``; like a closed file, it must be opened again."""


class IntegrityError(Error, AssertionError):
    """Audit data violates an invariant or no longer matches its hashes."""


__all__ = [
    "AuditClosedError",
    "AuditStoreError",
    "AuditStoreWarning",
    "CanonicalizationError",
    "ConfigError",
    "Error",
    "InputError",
    "IntegrityError",
    "NotFoundError",
    "PluginError",
    "RunNotFoundError",
    "SchemaVersionError",
]
