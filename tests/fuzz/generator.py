"""Random fork/coalesce pipelines for the invariant fuzzing (hypothesis tests and bench/fuzz_invariants.py).

A pipeline is drawn from a small grammar: a source of a few rows, a fork into 2-3 branches, each
branch a chain of steps (passthrough, truncate, rename, a simulated call with latency and failures,
a python transform that raises on some rows, a keyword filter that loses rows, a gate that routes
some rows to a sink, or a nested fork with its own coalesce), a coalesce with a random policy,
strategy and timeout, then a sink. ``Draw`` abstracts the randomness, so the same generator runs from
a seeded ``random.Random`` (the bench) or from hypothesis (which can then shrink a failing case).
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

CATEGORIES = ["books", "toys", "garden", "tools"]


class Draw(Protocol):
    def integer(self, low: int, high: int) -> int: ...

    def choice(self, options: Sequence[Any]) -> Any: ...


class RandomDraw:
    """Draws from a seeded ``random.Random``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def choice(self, options: Sequence[Any]) -> Any:
        return self.rng.choice(list(options))


@dataclass
class _Builder:
    draw: Draw
    folder: Path
    transforms: list[dict[str, Any]] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)
    coalesces: list[dict[str, Any]] = field(default_factory=list)
    forks: int = 0
    counter: int = 0

    def name(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}{self.counter}"

    # -- structure ------------------------------------------------------------------------------
    def fork(self, input_connection: str, output_connection: str, depth: int) -> None:
        """gate forking ``input_connection`` into branches that a coalesce joins into ``output_connection``."""
        self.forks += 1
        gate, coalesce = self.name("fork"), self.name("merge")
        branches = [self.name("b") for _ in range(self.draw.integer(2, 3))]
        self.gates.append({"name": gate, "input": input_connection, "condition": "True",
                           "routes": {"true": "fork", "false": "errors"}, "fork_to": branches})
        ends = {branch: self.chain(branch, depth) for branch in branches}
        self.coalesces.append({"name": coalesce, "branches": ends, "on_success": output_connection,
                               **self.policy(branches)})

    def chain(self, start: str, depth: int) -> str:
        """A branch: 0-2 steps from ``start``; returns the connection the branch ends on."""
        current = start
        for _ in range(self.draw.integer(0, 2)):
            nested_allowed = depth < 2 and self.forks < 3
            kind = self.draw.choice(["pass", "truncate", "rename", "call", "python", "filter", "route"]
                                    + (["fork"] if nested_allowed else []))
            out = self.name("c")
            if kind == "fork":
                self.fork(current, out, depth + 1)
            elif kind == "route":
                self.route(current, out)
            else:
                self.transforms.append(self.step(kind, current, out))
            current = out
        return current

    def policy(self, branches: list[str]) -> dict[str, Any]:
        policy = self.draw.choice(["require_all", "quorum", "best_effort", "first"])
        merge = self.draw.choice(["union", "nested", "select"])
        options: dict[str, Any] = {"policy": policy, "merge": merge}
        if policy == "quorum":
            options["quorum_count"] = self.draw.integer(1, len(branches))
        if policy == "best_effort" or (policy in ("require_all", "quorum") and self.draw.integer(0, 1)):
            options["timeout_seconds"] = self.draw.choice([0.05, 0.2, 1.0])
        if merge == "select":
            options["select_branch"] = self.draw.choice(branches)
        return options

    # -- steps ------------------------------------------------------------------------------------
    def step(self, kind: str, input_connection: str, output: str) -> dict[str, Any]:
        step: dict[str, Any] = {"name": self.name("t"), "input": input_connection, "on_success": output}
        if kind == "pass":
            step.update(plugin="passthrough", options={})
        elif kind == "truncate":
            step.update(plugin="truncate", options={"fields": {"note": self.draw.integer(4, 12)}, "suffix": ".."})
        elif kind == "rename":
            step.update(plugin="field_mapper", options={"mapping": {"amount": self.name("amount")}})
        elif kind == "call":
            step.update(plugin="latency", options={
                "distribution": "uniform", "low_ms": 0, "high_ms": self.draw.choice([10, 120, 400]),
                "failure_rate": self.draw.choice([0.0, 0.2]), "seed": self.draw.integer(0, 99)})
            self.on_error(step)
        elif kind == "python":
            step.update(plugin="python", options={"function": "tests.fuzz.plugins:fail_every",
                                                  "options": {"every": self.draw.integer(2, 5)}})
            self.on_error(step)
        else:
            blocked = self.draw.choice(CATEGORIES)
            step.update(plugin="keyword_filter", options={"fields": ["category"], "blocked_patterns": [f"^{blocked}$"]})
            self.on_error(step)
        return step

    def on_error(self, step: dict[str, Any]) -> None:
        target = self.draw.choice(["discard", "errors", None])
        if target is not None:
            step["on_error"] = target

    def route(self, input_connection: str, output: str) -> None:
        """A gate that sends one category to the errors sink (a lost branch) and the rest on."""
        category = self.draw.choice(CATEGORIES)
        self.gates.append({"name": self.name("route"), "input": input_connection,
                           "condition": f"row.get('category') == '{category}'",
                           "routes": {"true": "errors", "false": output}})


def random_pipeline(draw: Draw, folder: Path) -> dict[str, Any]:
    """A random pipeline writing under ``folder`` (its input CSV is written there too)."""
    rows = draw.integer(1, 8)
    source = folder / "in.csv"
    with source.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "category", "amount", "note"])
        for i in range(rows):
            writer.writerow([i, draw.choice(CATEGORIES), draw.integer(0, 999), "a note of some length " * (i % 3)])
    builder = _Builder(draw, folder)
    builder.fork("raw", "merged", depth=0)
    tail = builder.chain("merged", depth=2)
    builder.transforms.append({"name": "last", "plugin": "passthrough", "input": tail, "on_success": "output",
                               "options": {}})
    return {
        "source": {"plugin": "csv", "on_success": "raw",
                   "options": {"path": str(source), "schema": {"mode": "observed"}}},
        "transforms": builder.transforms,
        "gates": builder.gates,
        "coalesce": builder.coalesces,
        "sinks": {"output": {"plugin": "jsonl", "options": {"path": str(folder / "output.jsonl")}},
                  "errors": {"plugin": "jsonl", "options": {"path": str(folder / "errors.jsonl")}}},
        "audit": {"path": str(folder / "audit")},
    }
