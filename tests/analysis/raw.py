"""Independent readers for the tests: the raw Parquet segments of a store, read with pyarrow only.

Nothing here uses elspeth_nb.analysis, so the helpers are checked against values computed apart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from elspeth_nb.audit.schema import TABLES


def rows(store: Path, table: str, run_id: str) -> list[dict[str, Any]]:
    """Every record of ``table`` for ``run_id`` (runs: every revision), straight from the segments."""
    folder = store / "parquet" / table / f"run_id={run_id}"
    files = sorted(folder.glob("part-*.parquet"))
    if not files:
        return []
    records = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    for record in records:
        record["run_id"] = run_id
    return records


def latest_run(store: Path, run_id: str) -> dict[str, Any]:
    return max(rows(store, "runs", run_id), key=lambda r: r["revision"])


def quantile_cont(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (DuckDB's quantile_cont, numpy's default)."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    position = q * (len(data) - 1)
    low, high = math.floor(position), math.ceil(position)
    return data[low] + (data[high] - data[low]) * (position - low)


def mean(values: Sequence[float]) -> float | None:
    data = [v for v in values if v is not None]
    return sum(data) / len(data) if data else None


def decisions(store: Path, run_id: str) -> list[dict[str, Any]]:
    return [e for e in rows(store, "coalesce_events", run_id) if e["event_type"] != "late_arrival"]


def late_events(store: Path, run_id: str) -> list[dict[str, Any]]:
    return [e for e in rows(store, "coalesce_events", run_id) if e["event_type"] == "late_arrival"]


def expected_merge_timings(store: Path, run_id: str) -> list[dict[str, Any]]:
    """One record per (decision, expected branch), computed in Python from the raw rows."""
    late = {(e["decision_event_id"], e["late_branch"]): e for e in late_events(store, run_id)}
    tokens = {t["token_id"]: t for t in rows(store, "tokens", run_id)}
    after_loss: dict[tuple[str, str, str], dict[str, Any]] = {}
    for outcome in rows(store, "token_outcomes", run_id):
        context = json.loads(outcome["context_json"]) if outcome["context_json"] else {}
        lost = context.get("lost_branch") if isinstance(context, dict) else None
        if lost:
            key = (tokens[outcome["token_id"]]["row_id"], lost["coalesce"], lost["branch"])
            after_loss[key] = {"token_id": outcome["token_id"], "reason": lost["reason"]}
    out = []
    for event in decisions(store, run_id):
        context = json.loads(event["context_json"])
        for branch in event["expected_branches"]:
            arrived = event["branches_arrived"]
            record: dict[str, Any] = {"event_id": event["event_id"], "branch": branch, "status": "missing",
                                      "token_id": None, "arrival_rank": None, "arrival_offset_ms": None,
                                      "wait_duration_ms": event["wait_duration_ms"], "late_by_ms": None,
                                      "lost_reason": None}
            loss = after_loss.get((event["row_id"], event["coalesce_name"], branch))
            if branch in arrived:
                i = arrived.index(branch)
                record.update(status="arrived", token_id=event["arrived_token_ids"][i], arrival_rank=i + 1,
                              arrival_offset_ms=event["arrival_offsets_ms"][i])
            elif (event["event_id"], branch) in late:
                late_event = late[(event["event_id"], branch)]
                record.update(status="late", token_id=late_event["late_token_id"], late_by_ms=late_event["late_by_ms"],
                              arrival_offset_ms=late_event["arrival_offsets_ms"][0])
            elif branch in event["branches_lost"]:
                i = event["branches_lost"].index(branch)
                record.update(status="lost", lost_reason=event["lost_reasons"][i],
                              token_id=context["branches_lost"][branch].get("token_id"))
            elif loss is not None:
                record.update(token_id=loss["token_id"], lost_reason=loss["reason"])
            out.append(record)
    return out


def table_columns(name: str) -> list[str]:
    return TABLES[name].columns
