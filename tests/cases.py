"""Canonical pipelines and inputs shared by the tests (one place, like dlt's tests/cases.py)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from elspeth_nb.audit.writer import MemoryWriter
from elspeth_nb.engine.clock import FakeClock
from elspeth_nb.engine.runner import RunResult, run_pipeline

ROWS = [
    {"id": 1, "category": "books", "amount": 10, "note": "a long note number one"},
    {"id": 2, "category": "toys", "amount": 20, "note": "short"},
    {"id": 3, "category": "books", "amount": 30, "note": "another long note here"},
    {"id": 4, "category": "garden", "amount": 40, "note": "tiny"},
]
FIELDS = ["id: int", "category: str", "amount: int", "note: str"]


def write_csv(path: Path, rows: Sequence[dict[str, Any]] = ROWS) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def fork_pipeline(
    input_path: Path,
    *,
    policy: str = "require_all",
    merge: str = "union",
    quorum_count: int | None = None,
    timeout_seconds: float | None = None,
    select_branch: str | None = None,
    lose_c_for: str | None = None,
    slow: dict[str, float] | None = None,
    payloads: str = "all",
) -> dict[str, Any]:
    """source -> fork [a, b, c] -> coalesce `merge3` -> jsonl sink `output`.

    a: passthrough; b: truncate note to 8 (suffix ".."); c: field_mapper (id, category,
    amount -> amount_c), optionally preceded by a keyword_filter that discards rows whose category
    matches ``lose_c_for`` (a lost branch). ``slow`` puts a fixed-latency call of that many ms at
    the head of the named branches.
    """
    slow = slow or {}
    transforms: list[dict[str, Any]] = []

    def chain(branch: str, steps: list[tuple[str, str, dict[str, Any], str | None]]) -> None:
        if branch in slow:
            steps.insert(0, (f"{branch}_call", "latency", {"distribution": "fixed", "mean_ms": slow[branch]}, None))
        current = branch
        for i, (name, plugin, options, on_error) in enumerate(steps):
            out = f"out_{branch}" if i == len(steps) - 1 else f"{branch}_{i}"
            step: dict[str, Any] = {"name": name, "plugin": plugin, "input": current, "on_success": out,
                                    "options": options}
            if on_error:
                step["on_error"] = on_error
            transforms.append(step)
            current = out

    chain("a", [("a_pass", "passthrough", {}, None)])
    chain("b", [("b_truncate", "truncate", {"fields": {"note": 8}, "suffix": ".."}, None)])
    c_steps: list[tuple[str, str, dict[str, Any], str | None]] = []
    if lose_c_for:
        c_steps.append(("c_filter", "keyword_filter",
                        {"fields": ["category"], "blocked_patterns": [f"^{lose_c_for}$"]}, "discard"))
    c_steps.append(("c_map", "field_mapper",
                    {"mapping": {"id": "id", "category": "category", "amount": "amount_c"}, "select_only": True},
                    None))
    chain("c", c_steps)
    coalesce: dict[str, Any] = {"name": "merge3", "branches": {"a": "out_a", "b": "out_b", "c": "out_c"},
                                "policy": policy, "merge": merge, "on_success": "output"}
    for key, value in (("quorum_count", quorum_count), ("timeout_seconds", timeout_seconds),
                       ("select_branch", select_branch)):
        if value is not None:
            coalesce[key] = value
    return {
        "source": {"plugin": "csv", "on_success": "raw",
                   "options": {"path": str(input_path), "schema": {"mode": "fixed", "fields": FIELDS}}},
        "gates": [{"name": "fork_gate", "input": "raw", "condition": "True",
                   "routes": {"true": "fork", "false": "output"}, "fork_to": ["a", "b", "c"]}],
        "transforms": transforms,
        "coalesce": [coalesce],
        "sinks": {"output": {"plugin": "jsonl", "options": {"path": str(input_path.parent / "output.jsonl")}}},
        "audit": {"path": str(input_path.parent / "audit"), "payloads": payloads},
    }


#: The coalesce scenarios every policy x strategy is tested under (see tests/engine/test_coalesce_matrix.py).
SCENARIOS = ("all", "lost", "delayed", "timeout")


def scenario_options(policy: str, merge: str, scenario: str) -> dict[str, Any]:
    """``fork_pipeline`` options of one scenario: ``all`` arrive, branch c of the toys row is ``lost``,
    b is ``delayed`` 300 ms, or b and c wait 2 s and the coalesce gives up after 1 s (``timeout``)."""
    options: dict[str, Any] = {"policy": policy, "merge": merge}
    if policy == "quorum":
        options["quorum_count"] = 2
    if policy != "first" and (policy == "best_effort" or scenario in ("delayed", "timeout")):
        options["timeout_seconds"] = 1.0
    if merge == "select":
        options["select_branch"] = "b"
    if scenario == "lost":
        options["lose_c_for"] = "toys"
    if scenario == "delayed":
        options["slow"] = {"b": 300}
    if scenario == "timeout":
        options["slow"] = {"b": 2000, "c": 2000}
    return options


class Trail:
    """A finished in-memory run: its result and every audit table as Python rows."""

    def __init__(self, result: RunResult, writer: MemoryWriter) -> None:
        self.result = result
        self.writer = writer

    def table(self, name: str) -> pa.Table:
        return self.writer.table(name)

    def rows(self, name: str) -> list[dict[str, Any]]:
        return self.writer.table(name).to_pylist()


def run_in_memory(pipeline: dict[str, Any] | str | Path, **kwargs: Any) -> Trail:
    """Run with a fake clock and an in-memory writer: exact, instant and deterministic."""
    writer = MemoryWriter()
    result = run_pipeline(pipeline, clock=FakeClock(), writer=writer, **kwargs)
    return Trail(result, writer)
