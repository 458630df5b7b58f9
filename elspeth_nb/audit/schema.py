"""The audit schema, declared once: one Arrow schema per table.

Every writer (Parquet segments, DuckDB tables, the in-memory writer of the tests), every reader
and the ELSPETH importer derive their columns from here. Table and column names follow ELSPETH's
Landscape so that anyone who knows ELSPETH can query a store; columns of our own only ever come
*after* the Landscape columns, and a table only ever gains columns at its end (readers of an older
store see NULL for a newer column).

``run_id`` is a column of every table. In the Parquet layout it lives in the hive partition path
(``parquet/<table>/run_id=<id>/part-<n>.parquet``) rather than inside the files.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pyarrow as pa

#: Bumped whenever a table gains a column or a table is added. Readers refuse a newer version.
#: 2: runs.import_problems_json and segment_digests.fingerprints_sha256; a run of version 2 has a Merkle
#: root that also covers its record fingerprints and its own runs row (see audit.integrity).
SCHEMA_VERSION = 2
#: Hash scheme of every ``*_hash`` column, identical to ELSPETH's.
CANONICAL_VERSION = "sha256-rfc8785-v1"
#: Name of the hive partition column of every table.
PARTITION_COLUMN = "run_id"

_S = pa.string()
_I32 = pa.int32()
_I64 = pa.int64()
_F64 = pa.float64()
_TS = pa.timestamp("us", tz="UTC")
_STRINGS = pa.list_(pa.string())
_FLOATS = pa.list_(pa.float64())


@dataclass(frozen=True)
class Table:
    """One audit table: its name, Arrow schema (DuckDB column order), key and meaning."""

    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    doc: str
    #: ``landscape`` for ELSPETH's tables, ``extension`` for ours.
    origin: str = "landscape"

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    @property
    def file_schema(self) -> pa.Schema:
        """The schema of one Parquet segment: every column except the partition column."""
        return self.schema.remove(self.schema.get_field_index(PARTITION_COLUMN))

    @property
    def file_columns(self) -> list[str]:
        return [c for c in self.schema.names if c != PARTITION_COLUMN]


def _table(name: str, key: tuple[str, ...], doc: str, *cols: tuple[str, pa.DataType],
           origin: str = "landscape") -> Table:
    return Table(name, pa.schema([pa.field(c, t) for c, t in cols]), key, doc, origin)


RUNS = _table(
    "runs", ("run_id", "revision"),
    "One row per run revision; readers keep the highest `revision` (running -> completed/failed/interrupted).",
    ("run_id", _S), ("started_at", _TS), ("completed_at", _TS), ("config_hash", _S), ("settings_json", _S),
    ("reproducibility_grade", _S), ("canonical_version", _S), ("source_schema_json", _S),
    ("source_field_resolution_json", _S), ("status", _S), ("export_status", _S), ("export_error", _S),
    ("exported_at", _TS), ("export_format", _S), ("export_sink", _S), ("schema_contract_json", _S),
    ("schema_contract_hash", _S),
    # ours
    ("revision", _I32), ("schema_version", _I32), ("producer", _S), ("pipeline_path", _S),
    ("payload_mode", _S), ("counts_json", _S), ("error_message", _S), ("merkle_root", _S),
    ("import_problems_json", _S),
)

NODES = _table(
    "nodes", ("node_id", "run_id"),
    "Pipeline nodes of a run. Join on (node_id, run_id): node ids are deterministic and repeat across runs.",
    ("node_id", _S), ("run_id", _S), ("plugin_name", _S), ("node_type", _S), ("plugin_version", _S),
    ("determinism", _S), ("config_hash", _S), ("config_json", _S), ("schema_hash", _S),
    ("sequence_in_pipeline", _I32), ("registered_at", _TS), ("schema_mode", _S), ("schema_fields_json", _S),
    ("input_contract_json", _S), ("output_contract_json", _S),
    # ours
    ("node_name", _S),
)

EDGES = _table(
    "edges", ("edge_id",),
    "Connections between nodes; `label` is the route or branch name, `default_mode` move/copy/divert.",
    ("edge_id", _S), ("run_id", _S), ("from_node_id", _S), ("to_node_id", _S), ("label", _S),
    ("default_mode", _S), ("created_at", _TS),
)

ROWS = _table(
    "rows", ("row_id",),
    "Source rows. `source_data_ref` is the payload hash of the stored row (NULL when payloads are hashes only).",
    ("row_id", _S), ("run_id", _S), ("source_node_id", _S), ("row_index", _I64), ("source_data_hash", _S),
    ("source_data_ref", _S), ("created_at", _TS),
)

TOKENS = _table(
    "tokens", ("token_id",),
    "A row's instance on one path. Fork children carry fork_group_id + branch_name, merged tokens join_group_id.",
    ("token_id", _S), ("row_id", _S), ("run_id", _S), ("fork_group_id", _S), ("join_group_id", _S),
    ("expand_group_id", _S), ("branch_name", _S), ("step_in_pipeline", _I32), ("created_at", _TS),
)

TOKEN_PARENTS = _table(
    "token_parents", ("token_id", "parent_token_id"),
    "Parent links: a fork child has its parent at ordinal 0; a merged token its branch tokens in arrival order.",
    ("token_id", _S), ("parent_token_id", _S), ("ordinal", _I32),
    # ours
    ("run_id", _S),
)

TOKEN_OUTCOMES = _table(
    "token_outcomes", ("outcome_id",),
    "Exactly one terminal outcome per token. `context_json` carries the coalesce context for coalesced/failed "
    "branch tokens and late arrivals.",
    ("outcome_id", _S), ("run_id", _S), ("token_id", _S), ("outcome", _S), ("is_terminal", _I32),
    ("recorded_at", _TS), ("sink_name", _S), ("batch_id", _S), ("fork_group_id", _S), ("join_group_id", _S),
    ("expand_group_id", _S), ("error_hash", _S), ("context_json", _S), ("expected_branches_json", _S),
)

NODE_STATES = _table(
    "node_states", ("state_id",),
    "One row per token visit of a node, written once it is final. Coalesce states carry the coalesce context "
    "in context_after_json; the merged token has its own state at the coalesce (output_hash = merged row).",
    ("state_id", _S), ("token_id", _S), ("run_id", _S), ("node_id", _S), ("step_index", _I32),
    ("attempt", _I32), ("status", _S), ("input_hash", _S), ("output_hash", _S), ("context_before_json", _S),
    ("context_after_json", _S), ("duration_ms", _F64), ("error_json", _S), ("success_reason_json", _S),
    ("started_at", _TS), ("completed_at", _TS),
)

ROUTING_EVENTS = _table(
    "routing_events", ("event_id",),
    "Gate decisions: one event per destination (fork: one per branch, mode copy), grouped by routing_group_id.",
    ("event_id", _S), ("state_id", _S), ("edge_id", _S), ("routing_group_id", _S), ("ordinal", _I32),
    ("mode", _S), ("reason_hash", _S), ("reason_ref", _S), ("created_at", _TS),
    # ours
    ("run_id", _S),
)

OPERATIONS = _table(
    "operations", ("operation_id",),
    "Source loads and sink writes.",
    ("operation_id", _S), ("run_id", _S), ("node_id", _S), ("operation_type", _S), ("started_at", _TS),
    ("completed_at", _TS), ("status", _S), ("input_data_ref", _S), ("input_data_hash", _S),
    ("output_data_ref", _S), ("output_data_hash", _S), ("error_message", _S), ("duration_ms", _F64),
)

CALLS = _table(
    "calls", ("call_id",),
    "External calls made while processing a token (the `latency` plugin records its simulated calls here).",
    ("call_id", _S), ("state_id", _S), ("operation_id", _S), ("call_index", _I32), ("call_type", _S),
    ("status", _S), ("request_hash", _S), ("request_ref", _S), ("response_hash", _S), ("response_ref", _S),
    ("error_json", _S), ("latency_ms", _F64), ("created_at", _TS),
    # ours
    ("run_id", _S),
)

ARTIFACTS = _table(
    "artifacts", ("artifact_id",),
    "Files written by sinks, with the SHA-256 of their bytes.",
    ("artifact_id", _S), ("run_id", _S), ("produced_by_state_id", _S), ("sink_node_id", _S),
    ("artifact_type", _S), ("path_or_uri", _S), ("content_hash", _S), ("size_bytes", _I64),
    ("idempotency_key", _S), ("created_at", _TS),
    # ours
    ("row_count", _I64),
)

VALIDATION_ERRORS = _table(
    "validation_errors", ("error_id",),
    "Source rows that failed parsing or the schema (quarantined). `row_id` and `source_location` are ours.",
    ("error_id", _S), ("run_id", _S), ("node_id", _S), ("row_hash", _S), ("row_data_json", _S), ("error", _S),
    ("schema_mode", _S), ("destination", _S), ("created_at", _TS), ("violation_type", _S),
    ("original_field_name", _S), ("normalized_field_name", _S), ("expected_type", _S), ("actual_type", _S),
    # ours
    ("row_id", _S), ("source_location", _S),
)

TRANSFORM_ERRORS = _table(
    "transform_errors", ("error_id",),
    "Rows a transform rejected or raised on; `destination` is the on_error sink or `discard`.",
    ("error_id", _S), ("run_id", _S), ("token_id", _S), ("transform_id", _S), ("row_hash", _S),
    ("row_data_json", _S), ("error_details_json", _S), ("destination", _S), ("created_at", _TS),
)

COALESCE_EVENTS = _table(
    "coalesce_events", ("event_id",),
    "One typed row per coalesce decision (event_type merged/failed) or late arrival (late_arrival). "
    "Lists are parallel: branches_arrived[i] arrived as arrived_token_ids[i] at arrival_offsets_ms[i]; "
    "branches_lost[i] was lost for lost_reasons[i]. context_json is the full context, as in node_states.",
    ("event_id", _S), ("run_id", _S), ("node_id", _S), ("coalesce_name", _S), ("row_id", _S),
    ("event_type", _S), ("trigger", _S), ("failure_reason", _S), ("policy", _S), ("merge_strategy", _S),
    ("quorum_count", _I32), ("timeout_seconds", _F64), ("select_branch", _S),
    ("expected_branches", _STRINGS), ("branches_arrived", _STRINGS), ("arrived_token_ids", _STRINGS),
    ("arrival_offsets_ms", _FLOATS), ("branches_lost", _STRINGS), ("lost_reasons", _STRINGS),
    ("n_expected", _I32), ("n_arrived", _I32), ("n_lost", _I32),
    ("first_arrival_at", _TS), ("decided_at", _TS), ("wait_duration_ms", _F64),
    ("join_group_id", _S), ("merged_token_id", _S), ("merged_row_hash", _S), ("union_collisions", _STRINGS),
    ("decision_event_id", _S), ("late_branch", _S), ("late_token_id", _S), ("late_by_ms", _F64),
    ("context_json", _S),
    origin="extension",
)

PAYLOADS = _table(
    "payloads", ("payload_hash",),
    "Content-addressed rows: payload_hash = SHA-256 of payload_json (RFC 8785 canonical JSON).",
    ("payload_hash", _S), ("payload_json", _S),
    ("run_id", _S),
    origin="extension",
)

SEGMENT_DIGESTS = _table(
    "segment_digests", ("table_name", "part_file"),
    "Tamper evidence: one row per Parquet segment of the run (every table except runs): its SHA-256 and "
    "record count, leaves of the run's Merkle root (runs.merkle_root), and a 64-bit fingerprint per record "
    "in file order (packed little-endian int64s), which locates a changed, missing or moved record; "
    "fingerprints_sha256 (in the leaf since schema 2) makes the fingerprints themselves tamper-evident.",
    ("table_name", _S), ("part_file", _S), ("record_count", _I64), ("file_sha256", _S),
    ("fingerprints", pa.binary()), ("written_at", _TS), ("fingerprints_sha256", _S),
    ("run_id", _S),
    origin="extension",
)

TABLES: Mapping[str, Table] = {
    t.name: t
    for t in (
        RUNS, NODES, EDGES, ROWS, TOKENS, TOKEN_PARENTS, TOKEN_OUTCOMES, NODE_STATES, ROUTING_EVENTS,
        OPERATIONS, CALLS, ARTIFACTS, VALIDATION_ERRORS, TRANSFORM_ERRORS, COALESCE_EVENTS, PAYLOADS,
        SEGMENT_DIGESTS,
    )
}
#: Tables whose segments are covered by a run's Merkle root (runs holds the root; digests are its leaves).
DIGESTED_TABLES = tuple(name for name in TABLES if name not in ("runs", "segment_digests"))


def table(name: str) -> Table:
    """The table called ``name``; a KeyError lists the known tables."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown audit table {name!r}; tables: {', '.join(TABLES)}") from None


def iter_tables() -> Iterator[Table]:
    return iter(TABLES.values())


# Stored string values, so writers and readers agree on spelling.
class Outcome:
    COMPLETED = "completed"
    ROUTED = "routed"
    FORKED = "forked"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    COALESCED = "coalesced"
    #: Ours: a branch token that reached a coalesce after its decision was taken (not a failure).
    LATE_ARRIVAL = "late_arrival"
    TERMINAL = frozenset({COMPLETED, ROUTED, FORKED, FAILED, QUARANTINED, COALESCED, LATE_ARRIVAL,
                          "diverted", "consumed_in_batch", "expanded"})


class StateStatus:
    OPEN = "open"
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"


class RunStatus:
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class CoalesceEventType:
    MERGED = "merged"
    FAILED = "failed"
    LATE_ARRIVAL = "late_arrival"


class Trigger:
    """What made a coalesce decide."""

    ALL_ARRIVED = "all_arrived"
    QUORUM_MET = "quorum_met"
    #: best_effort: every branch arrived or was lost, the last event being an arrival.
    ALL_ACCOUNTED = "all_accounted"
    FIRST_ARRIVAL = "first_arrival"
    BRANCH_LOST = "branch_lost"
    TIMEOUT = "timeout"
    END_OF_SOURCE = "end_of_source"
    LATE_ARRIVAL = "late_arrival"
