"""Argument checks shared by the engine and the notebook helpers: a wrong type is named where it was passed.

Without them a ``None`` path failed deep in pathlib and a wrong flag silently changed an answer.
"""

from __future__ import annotations

import os
from pathlib import Path


def require(value: object, types: type | tuple[type, ...], name: str, description: str) -> None:
    """TypeError naming ``name`` unless ``value`` is one of ``types`` (a bool never passes for an int).

    >>> require(True, bool, "include_late", "True or False")
    >>> require("no", bool, "include_late", "True or False")
    Traceback (most recent call last):
    TypeError: include_late must be True or False, not str 'no'
    """
    accepted = types if isinstance(types, tuple) else (types,)
    if isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted):
        return
    raise _wrong_type(value, name, description)


def _wrong_type(value: object, name: str, description: str) -> TypeError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return TypeError(f"{name} must be {description}, not {type(value).__name__} {shown}")


def path_argument(value: object, name: str) -> Path:
    """``value`` as a Path (``~`` expanded); TypeError for a non-path, ValueError for an empty or blank one.

    >>> path_argument("~/audit", "path") == Path.home() / "audit"
    True
    """
    if not isinstance(value, (str, os.PathLike)):
        raise _wrong_type(value, name, "a path (str or os.PathLike)")
    if not str(os.fspath(value)).strip():
        raise ValueError(f"{name} is an empty path")
    return Path(value).expanduser()
