"""The recorder: buffers audit records per table and writes them as Arrow segments.

Records are appended as tuples in the table's file-column order (one cheap ``list.append``
per event, never one INSERT per event) and converted column-wise to Arrow when a table's
buffer is full or the flush interval has passed, so readers of a running pipeline see it
progress. Each method's parameters are exactly the columns of its table (a test checks this),
with timestamps passed as float epoch seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from elspeth_nb.audit.schema import TABLES, Table
from elspeth_nb.audit.writer import SegmentWriter

Row = tuple[Any, ...]


def rows_to_arrow(table: Table, rows: Sequence[Row]) -> pa.Table:
    """Column-wise conversion of recorded tuples (file-column order) to an Arrow table."""
    schema = table.file_schema
    columns: Iterable[Sequence[Any]] = zip(*rows, strict=True) if rows else ([] for _ in schema)
    arrays = []
    for values, field in zip(columns, schema, strict=True):
        if pa.types.is_timestamp(field.type):
            arrays.append(epoch_seconds_to_timestamps(values, field.type))
        else:
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def epoch_seconds_to_timestamps(values: Sequence[float | None], type_: pa.DataType) -> pa.Array:
    """Float epoch seconds (None for NULL) to a microsecond timestamp array, vectorised."""
    seconds = pa.array(values, pa.float64())
    micros = pc.cast(pc.round(pc.multiply(seconds, 1e6)), pa.int64())
    return pc.cast(micros, type_)


class Recorder:
    """Buffers the records of one run and hands full segments to a :class:`SegmentWriter`."""

    def __init__(
        self,
        run_id: str,
        writer: SegmentWriter,
        *,
        segment_rows: int = 200_000,
        flush_interval_s: float = 5.0,
        before_flush: Callable[[], None] | None = None,
        payload_cache_size: int = 250_000,
    ) -> None:
        self.run_id = run_id
        self.writer = writer
        self.segment_rows = segment_rows
        self.flush_interval_s = flush_interval_s
        self.before_flush = before_flush
        self.records_written: dict[str, int] = dict.fromkeys(TABLES, 0)
        self._buffers: dict[str, list[Row]] = {name: [] for name in TABLES}
        self._last_flush = time.monotonic()
        self._payload_cache_size = payload_cache_size
        self._payloads_recent: set[str] = set()
        self._payloads_older: set[str] = set()
        b = self._buffers
        self._rows, self._tokens, self._parents = b["rows"].append, b["tokens"].append, b["token_parents"].append
        self._states, self._outcomes = b["node_states"].append, b["token_outcomes"].append
        self._routing, self._payloads = b["routing_events"].append, b["payloads"].append

    # -- Landscape tables ------------------------------------------------------------------
    def runs(self, started_at: float, completed_at: float | None, config_hash: str, settings_json: str,
             reproducibility_grade: str | None, canonical_version: str, source_schema_json: str | None,
             source_field_resolution_json: str | None, status: str, export_status: str | None = None,
             export_error: str | None = None, exported_at: float | None = None, export_format: str | None = None,
             export_sink: str | None = None, schema_contract_json: str | None = None,
             schema_contract_hash: str | None = None, revision: int = 0, schema_version: int = 1,
             producer: str | None = None, pipeline_path: str | None = None, payload_mode: str | None = None,
             counts_json: str | None = None, error_message: str | None = None,
             merkle_root: str | None = None) -> None:
        self._buffers["runs"].append((
            started_at, completed_at, config_hash, settings_json, reproducibility_grade, canonical_version,
            source_schema_json, source_field_resolution_json, status, export_status, export_error, exported_at,
            export_format, export_sink, schema_contract_json, schema_contract_hash, revision, schema_version,
            producer, pipeline_path, payload_mode, counts_json, error_message, merkle_root))

    def nodes(self, node_id: str, plugin_name: str, node_type: str, plugin_version: str, determinism: str,
              config_hash: str, config_json: str, schema_hash: str | None, sequence_in_pipeline: int | None,
              registered_at: float, schema_mode: str | None, schema_fields_json: str | None,
              input_contract_json: str | None, output_contract_json: str | None, node_name: str | None) -> None:
        self._buffers["nodes"].append((
            node_id, plugin_name, node_type, plugin_version, determinism, config_hash, config_json, schema_hash,
            sequence_in_pipeline, registered_at, schema_mode, schema_fields_json, input_contract_json,
            output_contract_json, node_name))

    def edges(self, edge_id: str, from_node_id: str, to_node_id: str, label: str, default_mode: str,
              created_at: float) -> None:
        self._buffers["edges"].append((edge_id, from_node_id, to_node_id, label, default_mode, created_at))

    def rows(self, row_id: str, source_node_id: str, row_index: int, source_data_hash: str,
             source_data_ref: str | None, created_at: float) -> None:
        self._rows((row_id, source_node_id, row_index, source_data_hash, source_data_ref, created_at))

    def tokens(self, token_id: str, row_id: str, fork_group_id: str | None, join_group_id: str | None,
               expand_group_id: str | None, branch_name: str | None, step_in_pipeline: int | None,
               created_at: float) -> None:
        self._tokens((token_id, row_id, fork_group_id, join_group_id, expand_group_id, branch_name,
                      step_in_pipeline, created_at))

    def token_parents(self, token_id: str, parent_token_id: str, ordinal: int) -> None:
        self._parents((token_id, parent_token_id, ordinal))

    def token_outcomes(self, outcome_id: str, token_id: str, outcome: str, is_terminal: int, recorded_at: float,
                       sink_name: str | None, batch_id: str | None, fork_group_id: str | None,
                       join_group_id: str | None, expand_group_id: str | None, error_hash: str | None,
                       context_json: str | None, expected_branches_json: str | None) -> None:
        self._outcomes((outcome_id, token_id, outcome, is_terminal, recorded_at, sink_name, batch_id, fork_group_id,
                        join_group_id, expand_group_id, error_hash, context_json, expected_branches_json))

    def node_states(self, state_id: str, token_id: str, node_id: str, step_index: int, attempt: int, status: str,
                    input_hash: str, output_hash: str | None, context_before_json: str | None,
                    context_after_json: str | None, duration_ms: float | None, error_json: str | None,
                    success_reason_json: str | None, started_at: float, completed_at: float | None) -> None:
        self._states((state_id, token_id, node_id, step_index, attempt, status, input_hash, output_hash,
                      context_before_json, context_after_json, duration_ms, error_json, success_reason_json,
                      started_at, completed_at))

    def routing_events(self, event_id: str, state_id: str, edge_id: str, routing_group_id: str, ordinal: int,
                       mode: str, reason_hash: str | None, reason_ref: str | None, created_at: float) -> None:
        self._routing((event_id, state_id, edge_id, routing_group_id, ordinal, mode, reason_hash, reason_ref,
                       created_at))

    def operations(self, operation_id: str, node_id: str, operation_type: str, started_at: float,
                   completed_at: float | None, status: str, input_data_ref: str | None, input_data_hash: str | None,
                   output_data_ref: str | None, output_data_hash: str | None, error_message: str | None,
                   duration_ms: float | None) -> None:
        self._buffers["operations"].append((
            operation_id, node_id, operation_type, started_at, completed_at, status, input_data_ref, input_data_hash,
            output_data_ref, output_data_hash, error_message, duration_ms))

    def calls(self, call_id: str, state_id: str | None, operation_id: str | None, call_index: int, call_type: str,
              status: str, request_hash: str, request_ref: str | None, response_hash: str | None,
              response_ref: str | None, error_json: str | None, latency_ms: float | None, created_at: float) -> None:
        self._buffers["calls"].append((
            call_id, state_id, operation_id, call_index, call_type, status, request_hash, request_ref, response_hash,
            response_ref, error_json, latency_ms, created_at))

    def artifacts(self, artifact_id: str, produced_by_state_id: str | None, sink_node_id: str, artifact_type: str,
                  path_or_uri: str, content_hash: str, size_bytes: int, idempotency_key: str | None,
                  created_at: float, row_count: int) -> None:
        self._buffers["artifacts"].append((
            artifact_id, produced_by_state_id, sink_node_id, artifact_type, path_or_uri, content_hash, size_bytes,
            idempotency_key, created_at, row_count))

    def validation_errors(self, error_id: str, node_id: str | None, row_hash: str, row_data_json: str | None,
                          error: str, schema_mode: str, destination: str, created_at: float,
                          violation_type: str | None, original_field_name: str | None,
                          normalized_field_name: str | None, expected_type: str | None, actual_type: str | None,
                          row_id: str | None, source_location: str | None) -> None:
        self._buffers["validation_errors"].append((
            error_id, node_id, row_hash, row_data_json, error, schema_mode, destination, created_at, violation_type,
            original_field_name, normalized_field_name, expected_type, actual_type, row_id, source_location))

    def transform_errors(self, error_id: str, token_id: str, transform_id: str, row_hash: str,
                         row_data_json: str | None, error_details_json: str, destination: str,
                         created_at: float) -> None:
        self._buffers["transform_errors"].append((
            error_id, token_id, transform_id, row_hash, row_data_json, error_details_json, destination, created_at))

    # -- our tables ---------------------------------------------------------------------------
    def coalesce_events(self, event_id: str, node_id: str, coalesce_name: str, row_id: str, event_type: str,
                        trigger: str, failure_reason: str | None, policy: str, merge_strategy: str,
                        quorum_count: int | None, timeout_seconds: float | None, select_branch: str | None,
                        expected_branches: list[str], branches_arrived: list[str], arrived_token_ids: list[str],
                        arrival_offsets_ms: list[float], branches_lost: list[str], lost_reasons: list[str],
                        n_expected: int, n_arrived: int, n_lost: int, first_arrival_at: float | None,
                        decided_at: float, wait_duration_ms: float | None, join_group_id: str | None,
                        merged_token_id: str | None, merged_row_hash: str | None, union_collisions: list[str] | None,
                        decision_event_id: str | None, late_branch: str | None, late_token_id: str | None,
                        late_by_ms: float | None, context_json: str) -> None:
        self._buffers["coalesce_events"].append((
            event_id, node_id, coalesce_name, row_id, event_type, trigger, failure_reason, policy, merge_strategy,
            quorum_count, timeout_seconds, select_branch, expected_branches, branches_arrived, arrived_token_ids,
            arrival_offsets_ms, branches_lost, lost_reasons, n_expected, n_arrived, n_lost, first_arrival_at,
            decided_at, wait_duration_ms, join_group_id, merged_token_id, merged_row_hash, union_collisions,
            decision_event_id, late_branch, late_token_id, late_by_ms, context_json))

    def payloads(self, payload_hash: str, payload_json: str) -> None:
        """Store a payload once per content hash (deduplicated over a bounded recent window)."""
        if payload_hash in self._payloads_recent or payload_hash in self._payloads_older:
            return
        recent = self._payloads_recent
        if len(recent) >= self._payload_cache_size:
            self._payloads_older = recent
            self._payloads_recent = recent = set()
        recent.add(payload_hash)
        self._payloads((payload_hash, payload_json))

    # -- flushing ---------------------------------------------------------------------------------
    def buffered(self) -> int:
        """Records waiting in memory."""
        return sum(len(b) for b in self._buffers.values())

    def tick(self) -> None:
        """Flush full buffers, or everything once the flush interval has passed (cheap; call often)."""
        limit = self.segment_rows
        full = [name for name, buf in self._buffers.items() if len(buf) >= limit]
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()
        elif full:
            self.flush(full)

    def flush(self, tables: Iterable[str] | None = None) -> None:
        """Write the named (default: all non-empty) buffers as one segment each."""
        names = [n for n in (tables if tables is not None else self._buffers) if self._buffers[n]]
        if self.before_flush is not None:
            self.before_flush()
        for name in names:
            rows = self._buffers[name]
            batch = rows_to_arrow(TABLES[name], rows)
            self.writer.write_segment(TABLES[name], self.run_id, batch)
            self.records_written[name] += len(rows)
            rows.clear()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        self.writer.close()
