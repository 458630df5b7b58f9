"""Lineage: the whole token tree of one source row, with every state, decision and stored row.

A row is chosen by ``row_id``, ``row_index`` or any ``token_id`` of it; the answer always covers
the entire tree of that source row (source token, forks, every branch, coalesce decisions, late
and lost branches, merged tokens, sinks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import polars as pl

from elspeth_nb.analysis._tree import render_tree
from elspeth_nb.analysis.results import Displayable, format_value, html_block, html_table
from elspeth_nb.errors import NotFoundError

if TYPE_CHECKING:
    from elspeth_nb.analysis.audit import Audit

_ROW_SQL = """
SELECT r.row_id, r.row_index, r.source_node_id, n.node_name AS source_node, r.source_data_hash, r.source_data_ref,
       r.created_at, p.payload_json
FROM rows r
LEFT JOIN nodes n ON n.node_id = r.source_node_id AND n.run_id = r.run_id
LEFT JOIN (SELECT payload_hash, any_value(payload_json) AS payload_json FROM payloads WHERE run_id = $run GROUP BY 1) p
       ON p.payload_hash = coalesce(r.source_data_ref, r.source_data_hash)
WHERE r.run_id = $run AND r.row_id = $row
"""

_TOKENS_SQL = """
WITH RECURSIVE t AS (SELECT * FROM tokens WHERE run_id = $run AND row_id = $row),
p AS (SELECT token_id, list(parent_token_id ORDER BY ordinal) AS parents FROM token_parents
      WHERE run_id = $run AND token_id IN (SELECT token_id FROM t) GROUP BY token_id),
walk(token_id, depth) AS (
    SELECT token_id, 0 FROM t WHERE token_id NOT IN (SELECT token_id FROM p)
    UNION ALL
    SELECT tp.token_id, walk.depth + 1 FROM walk
    JOIN token_parents tp ON tp.parent_token_id = walk.token_id AND tp.run_id = $run
),
depth AS (SELECT token_id, max(depth) AS depth FROM walk GROUP BY token_id),
o AS (SELECT * FROM token_outcomes WHERE run_id = $run AND is_terminal = 1 AND token_id IN (SELECT token_id FROM t)
      QUALIFY row_number() OVER (PARTITION BY token_id ORDER BY recorded_at) = 1)
SELECT t.token_id, coalesce(p.parents, []) AS parents, t.branch_name AS branch, t.fork_group_id, t.join_group_id,
       t.expand_group_id, depth.depth, t.step_in_pipeline, t.created_at, o.outcome, o.sink_name AS sink,
       o.recorded_at AS outcome_at, o.join_group_id AS outcome_join_group_id, o.error_hash,
       o.context_json AS outcome_context_json, o.expected_branches_json
FROM t LEFT JOIN p USING (token_id) LEFT JOIN depth USING (token_id) LEFT JOIN o USING (token_id)
ORDER BY depth.depth NULLS LAST, t.created_at, t.token_id
"""

_STATES_SQL = """
WITH t AS (SELECT token_id, branch_name FROM tokens WHERE run_id = $run AND row_id = $row),
pl AS (SELECT DISTINCT payload_hash FROM payloads WHERE run_id = $run)
SELECT s.state_id, s.token_id, t.branch_name AS branch, n.node_name, n.node_type, s.node_id, s.step_index,
       s.attempt, s.status, s.input_hash, s.output_hash, pl.payload_hash IS NOT NULL AS output_stored,
       s.duration_ms, s.started_at, s.completed_at, s.context_before_json, s.context_after_json, s.error_json,
       s.success_reason_json
FROM node_states s JOIN t ON t.token_id = s.token_id
LEFT JOIN nodes n ON n.node_id = s.node_id AND n.run_id = s.run_id
LEFT JOIN pl ON pl.payload_hash = s.output_hash
WHERE s.run_id = $run
ORDER BY s.started_at, s.step_index, s.completed_at, s.state_id
"""

_DECISIONS_SQL = """
SELECT * EXCLUDE (run_id) FROM coalesce_events WHERE run_id = $run AND row_id = $row
ORDER BY decided_at, event_type = 'late_arrival', first_arrival_at, event_id
"""

_ROUTING_SQL = """
WITH s AS (SELECT s.state_id, s.token_id, n.node_name FROM node_states s
           JOIN tokens t ON t.token_id = s.token_id AND t.run_id = s.run_id
           LEFT JOIN nodes n ON n.node_id = s.node_id AND n.run_id = s.run_id
           WHERE s.run_id = $run AND t.row_id = $row)
SELECT e.event_id, s.token_id, e.state_id, s.node_name AS from_node, ed.label, dest.node_name AS to_node, e.mode,
       e.routing_group_id, e.ordinal, e.reason_hash, p.payload_json AS reason_json, e.created_at
FROM routing_events e JOIN s ON s.state_id = e.state_id
LEFT JOIN edges ed ON ed.edge_id = e.edge_id AND ed.run_id = e.run_id
LEFT JOIN nodes dest ON dest.node_id = ed.to_node_id AND dest.run_id = e.run_id
LEFT JOIN (SELECT payload_hash, any_value(payload_json) AS payload_json FROM payloads WHERE run_id = $run GROUP BY 1) p
       ON p.payload_hash = e.reason_ref
WHERE e.run_id = $run
ORDER BY e.created_at, e.routing_group_id, e.ordinal
"""

_ERRORS_SQL = """
SELECT 'transform' AS kind, e.error_id, e.token_id, n.node_name AS node, e.destination, e.row_hash,
       e.error_details_json AS details_json, e.row_data_json, e.created_at
FROM transform_errors e JOIN tokens t ON t.token_id = e.token_id AND t.run_id = e.run_id
LEFT JOIN nodes n ON n.node_id = e.transform_id AND n.run_id = e.run_id
WHERE e.run_id = $run AND t.row_id = $row
UNION ALL
SELECT 'validation' AS kind, v.error_id, NULL AS token_id, n.node_name AS node, v.destination, v.row_hash,
       json_object('error', v.error, 'violation_type', v.violation_type, 'field', v.original_field_name,
                   'expected_type', v.expected_type, 'actual_type', v.actual_type,
                   'location', v.source_location)::VARCHAR AS details_json, v.row_data_json, v.created_at
FROM validation_errors v
LEFT JOIN nodes n ON n.node_id = v.node_id AND n.run_id = v.run_id
WHERE v.run_id = $run AND (v.row_id = $row OR (v.row_id IS NULL AND v.row_hash = $row_hash))
ORDER BY created_at
"""

_DATA_SQL = """
WITH t AS (SELECT token_id, join_group_id FROM tokens WHERE run_id = $run AND row_id = $row),
p AS (SELECT payload_hash, any_value(payload_json) AS payload_json FROM payloads WHERE run_id = $run GROUP BY 1),
items AS (
    SELECT 0 AS ord, 'source' AS kind, NULL AS token_id, NULL AS state_id, $source_node AS node_name,
           $source_hash AS hash, $source_ref AS lookup, NULL::TIMESTAMPTZ AS at
    UNION ALL
    SELECT CASE n.node_type WHEN 'sink' THEN 3 WHEN 'coalesce' THEN 2 ELSE 1 END,
           CASE n.node_type WHEN 'sink' THEN 'sink_output' WHEN 'coalesce' THEN 'merged' ELSE 'state_output' END,
           s.token_id, s.state_id, n.node_name, s.output_hash, s.output_hash, s.completed_at
    FROM node_states s JOIN t ON t.token_id = s.token_id
    LEFT JOIN nodes n ON n.node_id = s.node_id AND n.run_id = s.run_id
    WHERE s.run_id = $run AND s.output_hash IS NOT NULL AND n.node_type <> 'source'
      AND (n.node_type <> 'coalesce' OR t.join_group_id IS NOT NULL)  -- branch states at a coalesce hold no row
)
SELECT items.kind, items.token_id, items.state_id, items.node_name, items.hash, p.payload_json IS NOT NULL AS stored,
       p.payload_json
FROM items LEFT JOIN p ON p.payload_hash = items.lookup
ORDER BY items.ord <> 0, items.at, items.ord, items.state_id
"""


@dataclass(frozen=True)
class Lineage(Displayable):
    """The whole tree of one source row. ``to_polars()`` is its node states in time order.

    Frames: ``tokens`` (parents in order, branch, fork/join group, depth, terminal outcome,
    sink), ``states`` (every node state in time order, hashes, timings, JSON contexts),
    ``decisions`` (coalesce decisions and late arrivals, full context), ``lost`` (branches lost
    before or after a decision), ``routing``, ``errors`` (transform and validation errors) and
    ``data`` (source row, state outputs, merged rows and sink outputs; ``stored`` says whether
    the payload is in the store or only its hash is).
    """

    run_id: str
    row: Mapping[str, Any]
    payload_mode: str | None
    tokens: pl.DataFrame
    states: pl.DataFrame
    decisions: pl.DataFrame
    lost: pl.DataFrame
    routing: pl.DataFrame
    errors: pl.DataFrame
    data: pl.DataFrame

    @property
    def row_id(self) -> str:
        return str(self.row["row_id"])

    @property
    def token_ids(self) -> list[str]:
        return list(self.tokens["token_id"])

    @property
    def source_row(self) -> dict[str, Any] | None:
        """The source row as stored, or None when the run kept hashes only."""
        text = self.row.get("payload_json")
        return json.loads(text) if text else None

    def context(self, event_id: str) -> dict[str, Any]:
        """The full parsed context of one coalesce decision or late arrival of this row."""
        match = self.decisions.filter(pl.col("event_id") == event_id)
        if match.height == 0:
            raise NotFoundError(f"Coalesce event of row `{self.row_id}`:", event_id, list(self.decisions["event_id"]))
        parsed: dict[str, Any] = json.loads(match["context_json"][0])
        return parsed

    def to_polars(self) -> pl.DataFrame:
        return self.states

    def title(self) -> str:
        mode = self.payload_mode or "unknown"
        return (f"Lineage of row {self.row['row_index']} (row_id {self.row_id}) in run {self.run_id} — "
                f"{self.tokens.height} tokens, {self.states.height} node states, payloads: {mode}")

    def tree(self) -> str:
        """The indented text tree: source → fork → branches → coalesce decision → merged token → sink."""
        return render_tree(self)

    def __repr__(self) -> str:
        return f"{self.title()}\n{self.tree()}"

    def to_html(self) -> str:
        from html import escape

        states = self.states.select("node_name", "node_type", "branch", "token_id", "step_index", "status",
                                    "duration_ms", "started_at", "input_hash", "output_hash", "output_stored",
                                    "context_after_json", "error_json")
        decisions = self.decisions.select("event_id", "coalesce_name", "event_type", "trigger", "failure_reason",
                                          "policy", "merge_strategy", "branches_arrived", "arrival_offsets_ms",
                                          "branches_lost", "wait_duration_ms", "late_branch", "late_by_ms",
                                          "merged_token_id", "context_json")
        data = self.data.with_columns(pl.col("payload_json").fill_null("(hashes only: payload not stored)"))
        parts = [
            f"<pre>{escape(self.tree())}</pre>",
            html_table(self.tokens.drop("outcome_context_json", "expected_branches_json"), "Tokens", 200),
            html_table(states, "Node states (time order)", 500),
            html_table(decisions, "Coalesce decisions and late arrivals", 100),
            html_table(self.lost, "Lost branches", 100),
            html_table(self.routing, "Routing events", 200),
            html_table(self.errors, "Errors", 100),
            html_table(data, "Stored rows", 200),
        ]
        return html_block(self.title(), *parts)


def _lost_frame(tokens: pl.DataFrame, decisions: pl.DataFrame) -> pl.DataFrame:
    """Branches lost before a decision (from its context) or after it (from the token's outcome)."""
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for event in decisions.filter(pl.col("event_type") != "late_arrival").iter_rows(named=True):
        lost = json.loads(event["context_json"]).get("branches_lost") or {}
        for branch, value in lost.items():
            reason = value if isinstance(value, dict) else {"reason": value}
            token = reason.get("token_id")
            seen.add(str(token))
            records.append({"coalesce": event["coalesce_name"], "branch": branch, "when": "before_decision",
                            "event_id": event["event_id"], "token_id": token, "reason": reason.get("reason"),
                            "node": reason.get("node"), "detail": format_value(reason.get("detail"), width=None)})
    for token in tokens.filter(pl.col("outcome_context_json").is_not_null()).iter_rows(named=True):
        context = json.loads(token["outcome_context_json"])
        lost_branch = context.get("lost_branch") if isinstance(context, dict) else None
        if not isinstance(lost_branch, dict) or token["token_id"] in seen:
            continue
        records.append({"coalesce": lost_branch.get("coalesce"), "branch": lost_branch.get("branch"),
                        "when": "after_decision", "event_id": None, "token_id": token["token_id"],
                        "reason": lost_branch.get("reason"), "node": lost_branch.get("node"),
                        "detail": format_value(lost_branch.get("detail"), width=None)})
    schema = {k: pl.String for k in ("coalesce", "branch", "when", "event_id", "token_id", "reason", "node", "detail")}
    return pl.DataFrame(records, schema=schema)


def _resolve_row(self: Audit, run: str, row_id: str | None, row_index: int | None, token_id: str | None) -> str:
    chosen = [n for n, v in (("row_id", row_id), ("row_index", row_index), ("token_id", token_id)) if v is not None]
    if len(chosen) != 1:
        raise ValueError(f"lineage() needs exactly one of row_id=, row_index= or token_id=; got "
                         f"{', '.join(chosen) or 'none'}")
    db = self._db
    if row_id is not None:
        found = db.rows("SELECT row_id FROM rows WHERE run_id = $run AND row_id = $v", {"run": run, "v": str(row_id)})
        if not found:
            sample = [r[0] for r in db.rows("SELECT row_id FROM rows WHERE run_id = $run ORDER BY row_index LIMIT 5",
                                            {"run": run})]
            raise NotFoundError(f"Run `{run}`: row_id", row_id, sample, hint="pass row_index= for the n-th source row")
        return str(found[0][0])
    if token_id is not None:
        found = db.rows("SELECT row_id FROM tokens WHERE run_id = $run AND token_id = $v",
                        {"run": run, "v": str(token_id)})
        if not found:
            sample = [r[0] for r in db.rows("SELECT token_id FROM tokens WHERE run_id = $run ORDER BY created_at, "
                                            "token_id LIMIT 5", {"run": run})]
            raise NotFoundError(f"Run `{run}`: token_id", token_id, sample)
        return str(found[0][0])
    if isinstance(row_index, bool) or not isinstance(row_index, int):
        raise TypeError(f"row_index must be an int, not {type(row_index).__name__}")
    found = db.rows("SELECT row_id FROM rows WHERE run_id = $run AND row_index = $v", {"run": run, "v": row_index})
    if not found:
        low, high, count = db.rows("SELECT min(row_index), max(row_index), count(*) FROM rows WHERE run_id = $run",
                                   {"run": run})[0]
        span = [f"{low}..{high}"] if count else []
        raise NotFoundError(f"Run `{run}`: row_index", row_index, span,
                            hint=f"the run has {count} source rows" if count else "the run has no source rows")
    return str(found[0][0])


def lineage(self: Audit, run_id: str = "latest", *, row_id: str | None = None, row_index: int | None = None,
            token_id: str | None = None) -> Lineage:
    """The whole token tree of one source row, chosen by exactly one of row_id, row_index or token_id.

    >>> tree = audit.lineage(row_index=0)
    >>> tree.tokens.height, list(tree.tokens["outcome"])
    (5, ['forked', 'coalesced', 'coalesced', 'coalesced', 'completed'])
    >>> print(tree.tree().splitlines()[1])  # doctest: +ELLIPSIS
    token …00000000  source ✓ → fork_gate ✓  forked
    """
    db = self._db
    run = db.resolve_run(run_id)
    row = _resolve_row(self, run, row_id, row_index, token_id)
    params = {"run": run, "row": row}
    row_record = db.frame(_ROW_SQL, params).row(0, named=True)
    tokens = db.frame(_TOKENS_SQL, params)
    decisions = db.frame(_DECISIONS_SQL, params)
    mode = db.rows("SELECT payload_mode FROM runs WHERE run_id = $run", {"run": run})
    return Lineage(
        run_id=run,
        row=MappingProxyType(row_record),
        payload_mode=mode[0][0] if mode else None,
        tokens=tokens,
        states=db.frame(_STATES_SQL, params),
        decisions=decisions,
        lost=_lost_frame(tokens, decisions),
        routing=db.frame(_ROUTING_SQL, params),
        errors=db.frame(_ERRORS_SQL, {**params, "row_hash": row_record["source_data_hash"]}),
        data=db.frame(_DATA_SQL, {**params, "source_node": row_record["source_node"],
                                  "source_hash": row_record["source_data_hash"],
                                  "source_ref": row_record["source_data_ref"] or row_record["source_data_hash"]}),
    )
