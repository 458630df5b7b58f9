"""Landscape tables (raw Arrow, timestamps parsed) -> our audit tables.

The coalesce derivation (decisions, late arrivals, contexts) and the small tables that need joins
(nodes, artifacts, validation_errors) are DuckDB SQL over the registered Arrow tables; the large
tables are patched with vectorised Arrow lookups keyed by id (new contexts, reclassified outcomes,
``run_id`` of link tables). Every output is cast to exactly ``TABLES[name].schema``.
"""

# ruff: noqa: S608  (every SQL string here is our own constant text; data never reaches it)

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from elspeth_nb.audit.importers.elspeth import _coalesce
from elspeth_nb.audit.importers.elspeth._arrow import conform, constant, lookup, lookup_many, replace
from elspeth_nb.audit.schema import PARTITION_COLUMN, SCHEMA_VERSION, TABLES, Outcome

_NODE_NAME = r"^(?:source|transform|aggregation|config_gate|coalesce|sink)_(.+)_[0-9a-f]{12}(?:_\d+)?$"

BASE = [
    f"""CREATE TEMP TABLE x_nodes AS
    SELECT n.* REPLACE (coalesce(n.sequence_in_pipeline, s.first_step) AS sequence_in_pipeline),
        coalesce(
            CASE WHEN n.plugin_name LIKE 'config_gate:%' OR n.plugin_name LIKE 'coalesce:%'
                THEN substr(n.plugin_name, strpos(n.plugin_name, ':') + 1) END,
            nullif(regexp_extract(n.node_id, '{_NODE_NAME}', 1), ''),
            n.node_id) AS node_name
    FROM l_nodes n LEFT JOIN (
        SELECT run_id, node_id, min(step_index) AS first_step FROM l_node_states GROUP BY ALL
    ) s ON s.run_id = n.run_id AND s.node_id = n.node_id""",
]

# tables built by SQL: a FROM clause whose columns cover the table's schema, and a deterministic order
SQL_ORDER = {
    "nodes": "run_id, registered_at, node_id",
    "artifacts": "run_id, created_at, artifact_id",
    "validation_errors": "run_id, created_at, error_id",
    "coalesce_events": "run_id, node_id, first_arrival_at, event_type DESC, event_id",
}
SQL_SOURCES: dict[str, str] = {
    "nodes": "x_nodes",
    "artifacts": """(SELECT a.*, CASE WHEN count(*) OVER (PARTITION BY a.run_id, a.sink_node_id) = 1 THEN
            (SELECT count(*) FROM l_node_states s
             WHERE s.run_id = a.run_id AND s.node_id = a.sink_node_id AND s.status = 'completed') END AS row_count
        FROM l_artifacts a)""",
    "validation_errors": """(SELECT v.*, r.row_id, NULL AS source_location FROM l_validation_errors v
        LEFT JOIN (SELECT run_id, source_data_hash, min(row_id) AS row_id FROM l_rows GROUP BY ALL
                   HAVING count(*) = 1) r ON r.run_id = v.run_id AND r.source_data_hash = v.row_hash)""",
    "coalesce_events": f"({_coalesce.EVENTS_SELECT})",
}

# patches for the large tables, keyed by their primary key; contexts are looked up by event_id in Arrow
OUTCOME_PATCH = """
SELECT o.outcome_id, coalesce(m.new_outcome, o.outcome) AS outcome,
    coalesce(o.join_group_id, m.join_group_id) AS join_group_id, m.event_id
FROM l_token_outcomes o JOIN (
    SELECT * FROM c_state_map QUALIFY row_number() OVER (PARTITION BY token_id ORDER BY state_id DESC) = 1
) m ON m.token_id = o.token_id
WHERE o.is_terminal = 1 AND o.outcome IN ('coalesced', 'failed')
"""
STATE_PATCH = "SELECT state_id, event_id FROM c_state_map WHERE kind <> 'merged'"

PAYLOAD_REFS = """
SELECT DISTINCT run_id, ref FROM (
    SELECT run_id, source_data_ref AS ref FROM l_rows
    UNION ALL SELECT s.run_id, r.reason_ref FROM l_routing_events r JOIN l_node_states s USING (state_id)
    UNION ALL SELECT run_id, input_data_ref FROM l_operations
    UNION ALL SELECT run_id, output_data_ref FROM l_operations
    UNION ALL SELECT coalesce(s.run_id, o.run_id), c.request_ref FROM l_calls c
        LEFT JOIN l_node_states s USING (state_id) LEFT JOIN l_operations o USING (operation_id)
    UNION ALL SELECT coalesce(s.run_id, o.run_id), c.response_ref FROM l_calls c
        LEFT JOIN l_node_states s USING (state_id) LEFT JOIN l_operations o USING (operation_id)
) WHERE ref IS NOT NULL ORDER BY run_id, ref
"""


def connect(raw: dict[str, pa.Table]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the raw tables registered as ``l_<name>`` and our macros."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET threads = 2")
    for name, table in raw.items():
        con.register(f"l_{name}", table)
    for sql in _coalesce.MACROS + BASE:
        con.execute(sql)
    return con


def derive(con: duckdb.DuckDBPyConnection, raw: dict[str, pa.Table], *, producer: str,
           payload_mode: str, pipeline_path: str | None = None) -> tuple[dict[str, pa.Table], list[str]]:
    """Every table except ``payloads`` in our schema, plus the problems met on the way.

    ``pipeline_path`` is the ELSPETH database the runs come from: ELSPETH's sink paths
    (``file://output.jsonl``) are relative to its folder, which ``verify`` needs once the runs are imported.
    """
    problems = _coalesce.build(con)
    tables = {name: conform(_arrow(con, f"SELECT * FROM {source} ORDER BY {SQL_ORDER[name]}"), name)
              for name, source in SQL_SOURCES.items()}
    tables["runs"] = conform(_runs(raw["runs"], producer, payload_mode, pipeline_path), "runs")
    for name in ("edges", "rows", "tokens", "operations", "transform_errors"):
        tables[name] = conform(raw[name], name)
    tables["token_parents"] = conform(_with_run(raw["token_parents"], "token_id", raw["tokens"], "token_id"),
                                      "token_parents")
    tables["routing_events"] = conform(_with_run(raw["routing_events"], "state_id", raw["node_states"], "state_id"),
                                       "routing_events")
    tables["calls"] = conform(_calls(raw), "calls")
    contexts = _arrow(con, _coalesce.EVENT_CONTEXTS)
    tables["token_outcomes"] = conform(_patch_outcomes(raw["token_outcomes"], _arrow(con, OUTCOME_PATCH), contexts,
                                                       _arrow(con, "SELECT * FROM c_after_loss")), "token_outcomes")
    states = raw["node_states"]
    event_ids = lookup(states.column("state_id"), _arrow(con, STATE_PATCH), "state_id", "event_id")
    context = pc.coalesce(states.column("context_after_json"), lookup(event_ids, contexts, "event_id", "context_json"))
    tables["node_states"] = conform(replace(states, "context_after_json", context), "node_states")
    return tables, problems


def payload_refs(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """(run_id, ref) of every payload ref the imported rows point to."""
    return _arrow(con, PAYLOAD_REFS)


def _arrow(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    return con.sql(sql).to_arrow_table()


def _runs(runs: pa.Table, producer: str, payload_mode: str, pipeline_path: str | None) -> pa.Table:
    """ELSPETH's runs plus our columns: revision 0, schema version, producer, payload mode, source database."""
    values: dict[str, Any] = {"revision": 0, "schema_version": SCHEMA_VERSION, "producer": producer,
                              "payload_mode": payload_mode, "pipeline_path": pipeline_path}
    for f in TABLES["runs"].schema:
        if f.name not in runs.column_names:
            runs = runs.append_column(f, constant(runs, values.get(f.name), f.type))
    return runs


def _with_run(table: pa.Table, key: str, parent: pa.Table, parent_key: str) -> pa.Table:
    """``table`` with the ``run_id`` of its parent row (token or node state) appended."""
    return replace(table, PARTITION_COLUMN, lookup(table.column(key), parent, parent_key, PARTITION_COLUMN))


def _calls(raw: dict[str, pa.Table]) -> pa.Table:
    """Calls belong to a node state or to an operation (ELSPETH's XOR); either gives the run."""
    calls = raw["calls"]
    if calls.num_rows == 0:  # matching against every node state would cost more than the whole table
        return replace(calls, PARTITION_COLUMN, pa.nulls(0, pa.string()))
    run = pc.coalesce(lookup(calls.column("state_id"), raw["node_states"], "state_id", PARTITION_COLUMN),
                      lookup(calls.column("operation_id"), raw["operations"], "operation_id", PARTITION_COLUMN))
    return replace(calls, PARTITION_COLUMN, run)


def _patch_outcomes(outcomes: pa.Table, patch: pa.Table, contexts: pa.Table, after_loss: pa.Table) -> pa.Table:
    """Reclassified late arrivals, filled coalesce contexts and lost-branch contexts, matched by outcome_id."""
    outcome, join_group_id, event_id = lookup_many(outcomes.column("outcome_id"), patch, "outcome_id",
                                                   ["outcome", "join_group_id", "event_id"])
    outcomes = replace(outcomes, "outcome", pc.coalesce(outcome, outcomes.column("outcome")))
    outcomes = replace(outcomes, "join_group_id", pc.coalesce(join_group_id, outcomes.column("join_group_id")))
    context = lookup(event_id, contexts, "event_id", "context_json")
    if after_loss.num_rows:
        context = pc.coalesce(context, lookup(outcomes.column("outcome_id"), after_loss, "outcome_id", "context_json"))
    return replace(outcomes, "context_json", pc.coalesce(outcomes.column("context_json"), context))


def add_counts(tables: dict[str, pa.Table], payload_mismatches: dict[str, list[str]] | None = None) -> None:
    """Fill ``runs.counts_json``: rows, quarantined, outcomes, coalesce decisions, records per table, and the
    refs whose payload file did not hash to the ref (left out, so ``verify`` can still report them)."""
    runs = tables["runs"]
    per_run: dict[str, dict[str, Any]] = defaultdict(lambda: {"outcomes": Counter(), "records": {}})
    for name, table in tables.items():
        for item in pc.value_counts(table.column(PARTITION_COLUMN)).to_pylist():
            per_run[item["values"]]["records"][name] = item["counts"]
    outcomes = tables["token_outcomes"].group_by([PARTITION_COLUMN, "outcome"]).aggregate([("outcome", "count")])
    for row in outcomes.to_pylist():
        per_run[row[PARTITION_COLUMN]]["outcomes"][row["outcome"]] = row["outcome_count"]
    events = tables["coalesce_events"].group_by([PARTITION_COLUMN, "coalesce_name", "event_type"]).aggregate(
        [("event_type", "count")])
    coalesce: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
    for row in events.to_pylist():
        entry = coalesce[row[PARTITION_COLUMN]].setdefault(
            row["coalesce_name"], {"merged": 0, "failed": 0, "late_arrivals": 0})
        entry["late_arrivals" if row["event_type"] == "late_arrival" else row["event_type"]] = row["event_type_count"]
    counts = []
    for run_id in runs.column(PARTITION_COLUMN).to_pylist():
        info = per_run[run_id]
        counts.append(orjson.dumps({
            "rows": info["records"].get("rows", 0),
            "quarantined": info["records"].get("validation_errors", 0),
            "outcomes": dict(sorted(info["outcomes"].items())),
            "coalesce": dict(sorted(coalesce[run_id].items())),
            "records": dict(sorted(info["records"].items())),
            "late_arrivals_reclassified": info["outcomes"].get(Outcome.LATE_ARRIVAL, 0),
            **({"payload_mismatches": sorted(wrong)} if (wrong := (payload_mismatches or {}).get(run_id)) else {}),
        }).decode())
    tables["runs"] = replace(runs, "counts_json", pa.array(counts, pa.string()))
