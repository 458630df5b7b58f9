"""User transforms for the fuzzed pipelines."""

from __future__ import annotations

from typing import Any


def fail_every(row: dict[str, Any], every: int = 3) -> dict[str, Any]:
    """Raise on every ``every``-th id (a transform error), pass the others through."""
    if int(row.get("id", 0)) % every == 0:
        raise RuntimeError(f"planned failure for id {row.get('id')}")
    return row
