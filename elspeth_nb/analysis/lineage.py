"""Lineage: the whole token tree of one source row, with every state, decision and stored row.

A row is chosen by ``row_id``, ``row_index`` or any ``token_id`` of it; the answer always covers
the entire tree of that source row (source token, forks, every branch, coalesce decisions, late
and lost branches, merged tokens, sinks).

The records of the tree are read first, each table once, by key (``tokens`` by row id; parent
links, outcomes, states and errors by token id; routing events by state id; payloads by hash),
from the few segments that can hold them in an audit store, then shaped into frames with polars.
The recursive SQL walk over the whole run is kept for the one case the row's own records cannot
answer (a parent token outside the row), and errors are joined on a scratch connection.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from elspeth_nb._arguments import require
from elspeth_nb.analysis._tree import render_tree
from elspeth_nb.analysis.results import Displayable, format_value, html_block, html_table
from elspeth_nb.audit.schema import RunStatus
from elspeth_nb.errors import NotFoundError

if TYPE_CHECKING:
    import duckdb

    from elspeth_nb.analysis._connection import Database
    from elspeth_nb.analysis.audit import Audit


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
    run_status: str | None = None

    @property
    def row_id(self) -> str:
        return str(self.row["row_id"])

    @property
    def token_ids(self) -> list[str]:
        return list(self.tokens["token_id"])

    @property
    def source_row(self) -> dict[str, Any] | None:
        """The source row as stored, or None when the run kept hashes only or its payload is missing."""
        text = self.row.get("payload_json")
        return json.loads(text) if text else None

    def context(self, event_id: str) -> dict[str, Any]:
        """The full parsed context of one coalesce decision or late arrival of this row."""
        require(event_id, str, "event_id", "a coalesce event id (str) from this lineage's decisions")
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


def _key_lookup(db: Database, table: str, run: str, column: str, value: Any) -> list[tuple[Any, ...]]:
    """``row_id`` of the run's ``table`` records whose ``column`` is ``value`` (as rows of one value)."""
    found = db.records(table, run, column, [value])
    if found is not None:
        return [(r,) for r in found.column("row_id").to_pylist()]
    scan = db.lookup(table, run, column, [value])
    return db.rows(f"SELECT row_id FROM {scan.sql} WHERE run_id = $run AND {column} = $v",  # noqa: S608
                   {"run": run, "v": value, **scan.params})


def _resolve_row(self: Audit, run: str, row_id: str | None, row_index: int | None, token_id: str | None) -> str:
    chosen = [n for n, v in (("row_id", row_id), ("row_index", row_index), ("token_id", token_id)) if v is not None]
    if len(chosen) != 1:
        raise ValueError(f"lineage() needs exactly one of row_id=, row_index= or token_id=; got "
                         f"{', '.join(chosen) or 'none'}")
    db = self._db
    if row_id is not None:
        found = _key_lookup(db, "rows", run, "row_id", str(row_id))
        if not found:
            sample = [r[0] for r in db.rows("SELECT row_id FROM rows WHERE run_id = $run ORDER BY row_index LIMIT 5",
                                            {"run": run})]
            raise NotFoundError(f"Run `{run}`: row_id", row_id, sample, hint="pass row_index= for the n-th source row")
        return str(found[0][0])
    if token_id is not None:
        found = _key_lookup(db, "tokens", run, "token_id", str(token_id))
        if not found:
            sample = [r[0] for r in db.rows("SELECT token_id FROM tokens WHERE run_id = $run ORDER BY created_at, "
                                            "token_id LIMIT 5", {"run": run})]
            raise NotFoundError(f"Run `{run}`: token_id", token_id, sample)
        return str(found[0][0])
    if isinstance(row_index, bool) or not isinstance(row_index, int):
        raise TypeError(f"row_index must be an int, not {type(row_index).__name__}")
    found = _key_lookup(db, "rows", run, "row_index", row_index)
    if not found:
        low, high, count = db.rows("SELECT min(row_index), max(row_index), count(*) FROM rows WHERE run_id = $run",
                                   {"run": run})[0]
        span = [f"{low}..{high}"] if count else []
        raise NotFoundError(f"Run `{run}`: row_index", row_index, span,
                            hint=f"the run has {count} source rows" if count else "the run has no source rows")
    return str(found[0][0])


def _among(column: str) -> str:
    """``column`` is one of ``$keys``; the range first, as DuckDB pushes it into the scan of a segment."""
    return f"{column} BETWEEN $low AND $high AND {column} IN (SELECT unnest($keys::VARCHAR[]))"


def _keys(values: list[str]) -> dict[str, Any]:
    return {"keys": values, "low": min(values, default=None), "high": max(values, default=None)}


class _Records:
    """The records of one source row's tree, each table read once, by key, several tables at a time."""

    def __init__(self, db: Database, run: str, row: str) -> None:
        self.db, self.run, self.row = db, run, row
        self.tables: dict[str, pa.Table] = {}
        self.payload_mode: str | None = None
        self.run_status: str | None = None

    def _job(self, table: str, where: str, params: dict[str, Any], column: str, values: list[Any], *,
             nulls: bool = False) -> Callable[[duckdb.DuckDBPyConnection], None]:
        """Read the run's records of ``table`` whose ``column`` is in ``values`` (or NULL, if ``nulls``) and that
        match ``where``: straight from the segments that can hold them, or by a query where it must."""
        def job(con: duckdb.DuckDBPyConnection) -> None:
            found = self.db.records(table, self.run, column, values, nulls=nulls)
            if found is None:
                scan = self.db.lookup(table, self.run, column, values, nulls=nulls)
                found = self.db.arrow(f"SELECT * FROM {scan.sql} WHERE run_id = $run AND ({where})",  # noqa: S608
                                      {"run": self.run, **params, **scan.params}, con=con)
            elif nulls and found.num_rows:  # the NULL keys were read too; ``where`` says which of them belong
                with self.db.scratch({"found": found}) as scratch:
                    found = scratch.sql(f"SELECT * FROM found WHERE {where}", params=params).to_arrow_table()  # noqa: S608
            self.tables[table] = found
        return job

    def _run_job(self, con: duckdb.DuckDBPyConnection) -> None:
        """payload_mode, nodes and edges of the run (kept for a finished run: they no longer change)."""
        known = self.db.finished_runs.get(self.run)
        if known is None:
            found = self.db.arrow("SELECT payload_mode, status FROM runs WHERE run_id = $run", {"run": self.run},
                                  con=con).to_pylist()
            known = {"payload_mode": found[0]["payload_mode"] if found else None,
                     "status": found[0]["status"] if found else None}
            for table in ("nodes", "edges"):
                scan = self.db.lookup(table, self.run)
                known[table] = self.db.arrow(f"SELECT * FROM {scan.sql} WHERE run_id = $run",  # noqa: S608
                                             {"run": self.run, **scan.params}, con=con)
            if found and found[0]["status"] not in (None, RunStatus.RUNNING):
                self.db.finished_runs[self.run] = known
        self.payload_mode, self.run_status = known["payload_mode"], known["status"]
        self.tables["nodes"], self.tables["edges"] = known["nodes"], known["edges"]

    def read(self) -> dict[str, pa.Table]:
        row = {"row": self.row}
        self.db.parallel([
            self._job("tokens", "row_id = $row", row, "row_id", [self.row]),
            self._job("rows", "row_id = $row", row, "row_id", [self.row]),
            self._job("coalesce_events", "row_id = $row", row, "row_id", [self.row]),
            self._run_job,
        ])
        rows = self.tables["rows"]
        token_ids = sorted({t for t in self.tables["tokens"].column("token_id").to_pylist() if t is not None})
        row_hash = rows.column("source_data_hash")[0].as_py() if rows.num_rows else None
        self.db.parallel([
            self._job("node_states", _among("token_id"), _keys(token_ids), "token_id", token_ids),
            self._job("token_outcomes", _among("token_id"), _keys(token_ids), "token_id", token_ids),
            self._job("token_parents", _among("token_id"), _keys(token_ids), "token_id", token_ids),
            self._job("transform_errors", _among("token_id"), _keys(token_ids), "token_id", token_ids),
            self._job("validation_errors", "row_id = $row OR (row_id IS NULL AND row_hash = $row_hash)",
                      {**row, "row_hash": row_hash}, "row_id", [self.row], nulls=True),
        ])
        state_ids = sorted({s for s in self.tables["node_states"].column("state_id").to_pylist() if s is not None})
        hashes = {h for h in (rows.column("source_data_ref").to_pylist() + rows.column("source_data_hash").to_pylist()
                              + self.tables["node_states"].column("output_hash").to_pylist()) if h is not None}

        def payloads(con: duckdb.DuckDBPyConnection) -> None:
            self.tables["payloads"] = self._payloads(sorted(hashes), con)

        self.db.parallel([self._job("routing_events", _among("state_id"), _keys(state_ids), "state_id", state_ids),
                          payloads])
        reasons = {h for h in self.tables["routing_events"].column("reason_ref").to_pylist() if h is not None}
        if reasons - hashes:  # routing reasons stored as payloads (gates that explain themselves)
            self.tables["payloads"] = pa.concat_tables(
                [self.tables["payloads"], self._payloads(sorted(reasons - hashes), self.db.con)])
        return self.tables

    def _payloads(self, hashes: list[str], con: duckdb.DuckDBPyConnection) -> pa.Table:
        """The stored payloads among ``hashes`` (from the segments that can hold them, in an audit store)."""
        rows = self.db.payload_rows(self.run, hashes)
        found = self.db.records_at("payloads", self.run, rows, "payload_hash", hashes) if rows is not None else None
        if found is not None:
            return found
        segments = set(rows) if rows is not None else None
        scan = self.db.lookup("payloads", self.run, "payload_hash", hashes, names=segments)
        where = _among("payload_hash") if hashes else "false"
        return self.db.arrow(f"SELECT * FROM {scan.sql} WHERE run_id = $run AND {where}",  # noqa: S608
                             {"run": self.run, **(_keys(hashes) if hashes else {}), **scan.params}, con=con)

    def parents_known(self) -> bool:
        """Whether every parent of the row's tokens is a token of the row (the walk needs no other link)."""
        tokens = set(self.tables["tokens"].column("token_id").to_pylist())
        return set(self.tables["token_parents"].column("parent_token_id").to_pylist()) <= tokens


def _first(frame: pl.DataFrame, column: str, value: Any) -> dict[str, Any] | None:
    match = frame.filter(pl.col(column) == value) if value is not None else frame.clear()
    return match.row(0, named=True) if match.height else None


def _sort(frame: pl.DataFrame, *by: str | pl.Expr) -> pl.DataFrame:
    """ORDER BY ``by`` as DuckDB does it: ascending, NULLs last, stable."""
    return frame.sort(list(by), nulls_last=True, maintain_order=True)


def _depths(tokens: pl.DataFrame, links: pl.DataFrame) -> dict[str, int]:
    """Longest path from a root (a token without parent links) to each token, over the parent links."""
    children: dict[str, list[str]] = {}
    for child, parent in links.select("token_id", "parent_token_id").iter_rows():
        children.setdefault(parent, []).append(child)
    linked = set(links["token_id"].drop_nulls())
    level = {t for t in tokens["token_id"].drop_nulls() if t not in linked}
    depth: dict[str, int] = {}
    for d in range(len(children) + 2):  # a longer path would go round a cycle
        if not level:
            break
        for token in level:
            depth[token] = d
        level = {c for token in level for c in children.get(token, ())}
    return depth


class _Shape:
    """The frames of a lineage, from the records of the row's tree (the queries of the module, in polars)."""

    def __init__(self, tables: dict[str, pa.Table]) -> None:
        self.t = {name: _polars(table) for name, table in tables.items()}
        payloads = self.t["payloads"]
        self.payloads = payloads.group_by("payload_hash").agg(pl.col("payload_json").first())
        self.stored = set(payloads["payload_hash"].drop_nulls())
        self.nodes = self.t["nodes"].select("node_id", "node_name", "node_type")

    def _payload(self, frame: pl.DataFrame, on: str, name: str) -> pl.DataFrame:
        return frame.join(self.payloads.rename({"payload_hash": on, "payload_json": name}), on=on, how="left",
                          maintain_order="left")

    def row(self, row: str) -> dict[str, Any]:
        record = _first(self.t["rows"], "row_id", row)
        assert record is not None
        node = _first(self.nodes, "node_id", record["source_node_id"])
        lookup = record["source_data_ref"] if record["source_data_ref"] is not None else record["source_data_hash"]
        payload = _first(self.payloads, "payload_hash", lookup)
        return {"row_id": record["row_id"], "row_index": record["row_index"],
                "source_node_id": record["source_node_id"], "source_node": node["node_name"] if node else None,
                "source_data_hash": record["source_data_hash"], "source_data_ref": record["source_data_ref"],
                "created_at": record["created_at"], "payload_json": payload["payload_json"] if payload else None}

    def tokens(self) -> pl.DataFrame:
        tokens, links = self.t["tokens"], self.t["token_parents"]
        parents = (_sort(links, "ordinal").group_by("token_id", maintain_order=True)
                   .agg(pl.col("parent_token_id").alias("parents")))
        depth = _depths(tokens, links)
        outcomes = (_sort(self.t["token_outcomes"].filter(pl.col("is_terminal") == 1), "recorded_at")
                    .unique("token_id", keep="first", maintain_order=True))
        depths = pl.DataFrame({"token_id": list(depth), "depth": list(depth.values())},
                              schema={"token_id": pl.String, "depth": pl.Int32})
        frame = (tokens.join(parents, on="token_id", how="left", maintain_order="left")
                 .join(depths, on="token_id", how="left", maintain_order="left")
                 .join(outcomes.select("token_id", "outcome", "sink_name", "recorded_at",
                                       pl.col("join_group_id").alias("outcome_join_group_id"), "error_hash",
                                       "context_json", "expected_branches_json"),
                       on="token_id", how="left", maintain_order="left"))
        frame = frame.select(
            "token_id", pl.col("parents").fill_null(pl.lit([], pl.List(pl.String))),
            pl.col("branch_name").alias("branch"),
            "fork_group_id", "join_group_id", "expand_group_id", "depth", "step_in_pipeline", "created_at", "outcome",
            pl.col("sink_name").alias("sink"), pl.col("recorded_at").alias("outcome_at"), "outcome_join_group_id",
            "error_hash", pl.col("context_json").alias("outcome_context_json"), "expected_branches_json")
        return _sort(frame, "depth", "created_at", "token_id")

    def _states(self) -> pl.DataFrame:
        """The row's node states, once per matching token record, with their node."""
        tokens = self.t["tokens"].select("token_id", pl.col("branch_name").alias("branch"), "join_group_id")
        return (self.t["node_states"].join(tokens, on="token_id", how="inner", maintain_order="left")
                .join(self.nodes, on="node_id", how="left", maintain_order="left"))

    def states(self) -> pl.DataFrame:
        stored = pl.col("output_hash").is_in(list(self.stored)).fill_null(False).alias("output_stored")
        frame = self._states().select(
            "state_id", "token_id", "branch", "node_name", "node_type", "node_id", "step_index", "attempt", "status",
            "input_hash", "output_hash", stored, "duration_ms", "started_at", "completed_at", "context_before_json",
            "context_after_json", "error_json", "success_reason_json")
        return _sort(frame, "started_at", "step_index", "completed_at", "state_id")

    def decisions(self) -> pl.DataFrame:
        return _sort(self.t["coalesce_events"].drop("run_id"), "decided_at",
                     pl.col("event_type") == "late_arrival", "first_arrival_at", "event_id")

    def routing(self) -> pl.DataFrame:
        states = self._states().select("state_id", "token_id", pl.col("node_name").alias("from_node"))
        edges = self.t["edges"].select("edge_id", "label", "to_node_id")
        dest = self.nodes.select(pl.col("node_id").alias("to_node_id"), pl.col("node_name").alias("to_node"))
        frame = (self.t["routing_events"].join(states, on="state_id", how="inner", maintain_order="left")
                 .join(edges, on="edge_id", how="left", maintain_order="left")
                 .join(dest, on="to_node_id", how="left", maintain_order="left"))
        frame = self._payload(frame, "reason_ref", "reason_json").select(
            "event_id", "token_id", "state_id", "from_node", "label", "to_node", "mode", "routing_group_id", "ordinal",
            "reason_hash", "reason_json", "created_at")
        return _sort(frame, "created_at", "routing_group_id", "ordinal")

    def data(self, source: dict[str, Any]) -> pl.DataFrame:
        states = self._states().filter(
            pl.col("output_hash").is_not_null() & (pl.col("node_type") != "source")
            & ((pl.col("node_type") != "coalesce") | pl.col("join_group_id").is_not_null()))
        ord_ = (pl.when(pl.col("node_type") == "sink").then(3).when(pl.col("node_type") == "coalesce").then(2)
                .otherwise(1).cast(pl.Int32))
        kind = (pl.when(pl.col("node_type") == "sink").then(pl.lit("sink_output"))
                .when(pl.col("node_type") == "coalesce").then(pl.lit("merged")).otherwise(pl.lit("state_output")))
        items = pl.concat([
            pl.DataFrame({"ord": [0], "kind": ["source"], "token_id": [None], "state_id": [None],
                          "node_name": [source["source_node"]], "hash": [source["source_hash"]],
                          "lookup": [source["source_ref"]], "at": [None]},
                         schema={"ord": pl.Int32, "kind": pl.String, "token_id": pl.String, "state_id": pl.String,
                                 "node_name": pl.String, "hash": pl.String, "lookup": pl.String,
                                 "at": states.schema["completed_at"]}),
            states.select(ord_.alias("ord"), kind.alias("kind"), "token_id", "state_id", "node_name",
                          pl.col("output_hash").alias("hash"), pl.col("output_hash").alias("lookup"),
                          pl.col("completed_at").alias("at")),
        ])
        items = _sort(self._payload(items, "lookup", "payload_json"), pl.col("ord") != 0, "at", "ord", "state_id")
        return items.select("kind", "token_id", "state_id", "node_name", "hash",
                            pl.col("payload_json").is_not_null().alias("stored"), "payload_json")


def _polars(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


#: Columns of ``Lineage.errors`` (as ``_ERRORS_SQL`` returns them), for a row without errors.
_ERRORS_SCHEMA: dict[str, pl.DataType | type[pl.DataType]] = {
    "kind": pl.String, "error_id": pl.String, "token_id": pl.String, "node": pl.String, "destination": pl.String,
    "row_hash": pl.String, "details_json": pl.String, "row_data_json": pl.String,
    "created_at": pl.Datetime("us", "UTC")}


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
    records = _Records(db, run, row)
    tables = records.read()
    shape = _Shape(tables)
    row_record = shape.row(row)
    # a parent outside the row (never in our runs) needs the links of the whole run for the depths
    tokens = shape.tokens() if records.parents_known() else db.frame(_TOKENS_SQL, params)
    decisions = shape.decisions()
    if tables["transform_errors"].num_rows or tables["validation_errors"].num_rows:
        with db.scratch(tables) as con:
            errors = _polars(con.sql(_ERRORS_SQL, params={**params, "row_hash": row_record["source_data_hash"]})
                             .to_arrow_table())
    else:
        errors = pl.DataFrame(schema=_ERRORS_SCHEMA)
    source = {"source_node": row_record["source_node"], "source_hash": row_record["source_data_hash"],
              "source_ref": row_record["source_data_ref"] or row_record["source_data_hash"]}
    return Lineage(
        run_id=run,
        row=MappingProxyType(row_record),
        payload_mode=records.payload_mode,
        tokens=tokens,
        states=shape.states(),
        decisions=decisions,
        lost=_lost_frame(tokens, decisions),
        routing=shape.routing(),
        errors=errors,
        data=shape.data(source),
        run_status=records.run_status,
    )
