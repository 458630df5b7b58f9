"""The recorder: buffers audit records column by column and writes them as Arrow segments.

An event costs one ``list.append`` per column, never an INSERT. Every 8,192 records a table's
columns are turned into Arrow arrays while the values are still hot in the CPU cache; full
segments go to a background thread that finishes them (ids to text, engine time to UTC
timestamps) and writes the Parquet file, which releases the GIL, so it overlaps the engine.

Ids are passed as integers (see :data:`ID_COLUMNS`) and become 32-hex text at write time:
12 characters of the run id, one kind digit, then the 19-digit counter (``10**18 + n``), so
ids are unique across kinds and runs and sort in creation order. Times are passed as engine
clock readings and shifted by ``time_offset`` to epoch seconds.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from elspeth_nb.audit.schema import TABLES, Table
from elspeth_nb.audit.writer import SegmentWriter

#: Id kinds and their digit in the id text.
ID_KINDS = {
    "row": "1", "token": "2", "state": "3", "outcome": "4", "group": "5", "event": "6", "coalesce_event": "7",
    "edge": "8", "call": "9", "operation": "a", "artifact": "b", "error": "c",
}
#: Columns whose values the recorder receives as integer ids, by table: column -> kind.
ID_COLUMNS: dict[str, dict[str, str]] = {
    "rows": {"row_id": "row"},
    "tokens": {"token_id": "token", "row_id": "row", "fork_group_id": "group", "join_group_id": "group"},
    "token_parents": {"token_id": "token", "parent_token_id": "token"},
    "token_outcomes": {"outcome_id": "outcome", "token_id": "token", "fork_group_id": "group",
                       "join_group_id": "group"},
    "node_states": {"state_id": "state", "token_id": "token"},
    "routing_events": {"event_id": "event", "state_id": "state", "edge_id": "edge", "routing_group_id": "group"},
    "edges": {"edge_id": "edge"},
    "operations": {"operation_id": "operation"},
    "calls": {"call_id": "call", "state_id": "state"},
    "artifacts": {"artifact_id": "artifact", "produced_by_state_id": "state"},
    "validation_errors": {"error_id": "error", "row_id": "row"},
    "transform_errors": {"error_id": "error", "token_id": "token"},
    "coalesce_events": {"event_id": "coalesce_event", "row_id": "row", "join_group_id": "group",
                        "merged_token_id": "token", "decision_event_id": "coalesce_event", "late_token_id": "token"},
}
ID_BASE = 10**18
BATCH_ROWS = 2048


def id_prefix(run_id: str, kind: str) -> str:
    return run_id[:12] + ID_KINDS[kind]


def format_id(run_id: str, kind: str, number: int) -> str:
    """The text of integer id ``number`` of ``kind`` in run ``run_id`` (as written to the store)."""
    return f"{id_prefix(run_id, kind)}{ID_BASE + number}"


#: Long text columns whose values repeat (one coalesce context on many records): converted to Arrow
#: once per distinct value per mini-batch and referenced by code, instead of copied for every record.
MEMO_COLUMNS: dict[str, frozenset[str]] = {
    "node_states": frozenset({"context_after_json", "success_reason_json", "error_json"}),
    "token_outcomes": frozenset({"context_json", "expected_branches_json"}),
}


_REPEATED_TEXT = pa.dictionary(pa.int32(), pa.string())


def _encode_repeated_text(values: list[str | None]) -> pa.Array:
    """Dictionary-encode a text column whose values repeat, without copying each repeat into Arrow."""
    if values.count(None) == len(values):  # most states have no error and no context: a C loop, not a dict
        return pa.nulls(len(values), _REPEATED_TEXT)
    distinct = dict.fromkeys(values)
    distinct.pop(None, None)
    index = {value: code for code, value in enumerate(distinct)}
    codes = pa.array(list(map(index.get, values)), pa.int32())
    return pa.DictionaryArray.from_arrays(codes, pa.array(list(index), pa.string()))


class _ListColumn:
    """A list column kept flat (values + offsets), so Arrow builds it without nested Python lists."""

    def __init__(self, value_type: pa.DataType) -> None:
        self.value_type = value_type
        self.values: list[Any] = []
        self.offsets: list[int] = [0]

    def append(self, value: Sequence[Any] | None) -> None:
        self.values.extend(value or ())
        self.offsets.append(len(self.values))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def truncate(self, count: int) -> None:
        """Keep the first ``count`` values (and none of a value whose elements were only partly added)."""
        del self.offsets[count + 1:]
        del self.values[self.offsets[-1]:]

    def to_arrow(self) -> pa.Array:
        array = pa.ListArray.from_arrays(pa.array(self.offsets, pa.int32()), pa.array(self.values, self.value_type))
        self.values, self.offsets = [], [0]
        return array


class _TableBuffer:
    """Columns of one table plus the Arrow mini-batches already converted from them."""

    def __init__(self, table: Table) -> None:
        self.table = table
        memo = MEMO_COLUMNS.get(table.name, frozenset())
        self.raw_types = _raw_types(table)
        self.columns: list[Any] = []
        for f in table.file_schema:
            if pa.types.is_list(f.type):
                self.columns.append(_ListColumn(f.type.value_type))
            else:
                self.columns.append([])
        self.appends = tuple(c.append for c in self.columns)
        self.repeated = frozenset(i for i, name in enumerate(table.file_columns) if name in memo)
        self.batches: list[list[pa.Array]] = []
        self.batched_rows = 0

    def __len__(self) -> int:
        """Whole records held: a record torn by an interrupt (see ``_drop_torn_record``) does not count."""
        return min(map(len, self.columns)) + self.batched_rows

    def seal(self) -> None:
        """Convert the buffered columns to Arrow arrays now, while the values are hot."""
        count = len(self.columns[0])
        if not count:
            return
        if any(len(column) != count for column in self.columns):
            count = self._drop_torn_record()
            if not count:
                return
        arrays = []
        for i, (column, raw_type) in enumerate(zip(self.columns, self.raw_types, strict=True)):
            if not isinstance(column, list):
                arrays.append(column.to_arrow())
                continue
            arrays.append(_encode_repeated_text(column) if i in self.repeated else pa.array(column, raw_type))
            column.clear()
        self.batches.append(arrays)
        self.batched_rows += count

    def _drop_torn_record(self) -> int:
        """Drop a record an interrupt (Ctrl-C) cut between two column appends; the records before it are whole.

        Without this the table's columns differ in length and none of its buffered records could be written.
        """
        count = min(len(column) for column in self.columns)
        for column in self.columns:
            if isinstance(column, list):
                del column[count:]
            else:
                column.truncate(count)
        return count

    def take(self) -> list[list[pa.Array]]:
        self.seal()
        batches, self.batches, self.batched_rows = self.batches, [], 0
        return batches


def _raw_types(table: Table) -> list[pa.DataType]:
    """Column types as buffered: integer ids, float engine times, the final type otherwise."""
    ids = ID_COLUMNS.get(table.name, {})
    types = []
    for f in table.file_schema:
        if f.name in ids:
            types.append(pa.int64())
        elif pa.types.is_timestamp(f.type):
            types.append(pa.float64())
        else:
            types.append(f.type)
    return types


def finish_batches(table: Table, run_id: str, time_offset: float, batches: Sequence[Sequence[pa.Array]], *,
                   dictionaries: bool = False) -> pa.Table:
    """Raw mini-batches to one Arrow table of the file schema: id text, UTC timestamps, plain text.

    ``dictionaries`` keeps repeated text dictionary-encoded (for a writer that stores it as such):
    decoding a segment's contexts copied each one per record, a few hundred MB at once. Ids and times
    take one compute call per column over the whole segment: a call per mini-batch cost 3x as much.
    """
    ids = ID_COLUMNS.get(table.name, {})
    columns = []
    fields = []
    for i, (f, raw_type) in enumerate(zip(table.file_schema, _raw_types(table), strict=True)):
        chunks = [b[i] for b in batches]
        field_ = f
        if chunks and pa.types.is_dictionary(chunks[0].type):
            if dictionaries:
                field_ = f.with_type(chunks[0].type)
            else:
                chunks = [pc.cast(c, f.type) for c in chunks]
        column = pa.chunked_array(chunks, type=field_.type if field_ is not f else raw_type)
        if f.name in ids:  # prefix + str(10**18 + n): the leading "1" becomes prefix + "1"
            column = pc.binary_replace_slice(pc.cast(pc.add(column, ID_BASE), pa.string()), 0, 1,
                                             id_prefix(run_id, ids[f.name]) + "1")
        elif pa.types.is_timestamp(f.type):
            column = pc.cast(pc.cast(pc.round(pc.multiply(pc.add(column, time_offset), 1e6)), pa.int64()), f.type)
        columns.append(column)
        fields.append(field_)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


class _BackgroundSegments:
    """Finishes and writes segments on one thread; errors resurface on the next call.

    Up to ``depth`` segments wait, more than there are tables: a flush of every table never blocks
    the engine (which would make its timers fire late), while memory stays bounded.
    """

    def __init__(self, writer: SegmentWriter, run_id: str, time_offset: float, depth: int = 24) -> None:
        self.writer = writer
        self.run_id = run_id
        self.time_offset = time_offset
        self._queue: queue.Queue[tuple[Table, list[list[pa.Array]]] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="elspeth-nb-segments", daemon=True)
        self._thread.start()

    def submit(self, table: Table, batches: list[list[pa.Array]]) -> None:
        self._raise()
        self._queue.put((table, batches))

    def drain(self) -> None:
        """Wait until every submitted segment is written."""
        self._queue.join()
        self._raise()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:
                    table, batches = item
                    self.writer.write_segment(table, self.run_id, finish_batches(
                        table, self.run_id, self.time_offset, batches,
                        dictionaries=getattr(self.writer, "takes_dictionaries", False)))
            except BaseException as exc:  # reported to the engine thread, never swallowed
                self._error = exc
            finally:
                self._queue.task_done()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class Recorder:
    """Buffers the records of one run and hands full segments to a :class:`SegmentWriter`."""

    def __init__(
        self,
        run_id: str,
        writer: SegmentWriter,
        *,
        time_offset: float = 0.0,
        segment_rows: int = 200_000,
        flush_interval_s: float = 5.0,
        before_flush: Callable[[], None] | None = None,
        payload_cache_size: int = 65_536,
        background: bool = True,
    ) -> None:
        self.run_id = run_id
        self.writer = writer
        self.time_offset = time_offset
        self.segment_rows = segment_rows
        self.flush_interval_s = flush_interval_s
        self.before_flush = before_flush
        self.records_written: dict[str, int] = dict.fromkeys(TABLES, 0)
        self._tables = {name: _TableBuffer(t) for name, t in TABLES.items()}
        self._segments = _BackgroundSegments(writer, run_id, time_offset) if background else None
        self._last_flush = time.monotonic()
        self._payload_cache_size = payload_cache_size
        self._payloads_recent: set[str] = set()
        self._payloads_older: set[str] = set()
        t = self._tables
        self._rows_cols, self._tokens_cols = t["rows"].appends, t["tokens"].appends
        self._parents_cols, self._outcomes_cols = t["token_parents"].appends, t["token_outcomes"].appends
        self._states_cols, self._routing_cols = t["node_states"].appends, t["routing_events"].appends
        self._payloads_cols, self._events_cols = t["payloads"].appends, t["coalesce_events"].appends
        self._states_first = t["node_states"].columns[0]

    def _add(self, table: str, *values: Any) -> None:
        for append, value in zip(self._tables[table].appends, values, strict=True):
            append(value)

    # -- Landscape tables ------------------------------------------------------------------
    def runs(self, started_at: float, completed_at: float | None, config_hash: str, settings_json: str,
             reproducibility_grade: str | None, canonical_version: str, source_schema_json: str | None,
             source_field_resolution_json: str | None, status: str, export_status: str | None = None,
             export_error: str | None = None, exported_at: float | None = None, export_format: str | None = None,
             export_sink: str | None = None, schema_contract_json: str | None = None,
             schema_contract_hash: str | None = None, revision: int = 0, schema_version: int = 1,
             producer: str | None = None, pipeline_path: str | None = None, payload_mode: str | None = None,
             counts_json: str | None = None, error_message: str | None = None,
             merkle_root: str | None = None, import_problems_json: str | None = None) -> None:
        self._add("runs", started_at, completed_at, config_hash, settings_json, reproducibility_grade,
                  canonical_version, source_schema_json, source_field_resolution_json, status, export_status,
                  export_error, exported_at, export_format, export_sink, schema_contract_json, schema_contract_hash,
                  revision, schema_version, producer, pipeline_path, payload_mode, counts_json, error_message,
                  merkle_root, import_problems_json)

    def nodes(self, node_id: str, plugin_name: str, node_type: str, plugin_version: str, determinism: str,
              config_hash: str, config_json: str, schema_hash: str | None, sequence_in_pipeline: int | None,
              registered_at: float, schema_mode: str | None, schema_fields_json: str | None,
              input_contract_json: str | None, output_contract_json: str | None, node_name: str | None) -> None:
        self._add("nodes", node_id, plugin_name, node_type, plugin_version, determinism, config_hash, config_json,
                  schema_hash, sequence_in_pipeline, registered_at, schema_mode, schema_fields_json,
                  input_contract_json, output_contract_json, node_name)

    def edges(self, edge_id: int, from_node_id: str, to_node_id: str, label: str, default_mode: str,
              created_at: float) -> None:
        self._add("edges", edge_id, from_node_id, to_node_id, label, default_mode, created_at)

    def rows(self, row_id: int, source_node_id: str, row_index: int, source_data_hash: str,
             source_data_ref: str | None, created_at: float) -> None:
        c = self._rows_cols
        c[0](row_id), c[1](source_node_id), c[2](row_index), c[3](source_data_hash), c[4](source_data_ref)
        c[5](created_at)

    def tokens(self, token_id: int, row_id: int, fork_group_id: int | None, join_group_id: int | None,
               expand_group_id: str | None, branch_name: str | None, step_in_pipeline: int | None,
               created_at: float) -> None:
        c = self._tokens_cols
        c[0](token_id), c[1](row_id), c[2](fork_group_id), c[3](join_group_id), c[4](expand_group_id)
        c[5](branch_name), c[6](step_in_pipeline), c[7](created_at)

    def token_parents(self, token_id: int, parent_token_id: int, ordinal: int) -> None:
        c = self._parents_cols
        c[0](token_id), c[1](parent_token_id), c[2](ordinal)

    def token_outcomes(self, outcome_id: int, token_id: int, outcome: str, is_terminal: int, recorded_at: float,
                       sink_name: str | None, batch_id: str | None, fork_group_id: int | None,
                       join_group_id: int | None, expand_group_id: str | None, error_hash: str | None,
                       context_json: str | None, expected_branches_json: str | None) -> None:
        c = self._outcomes_cols
        c[0](outcome_id), c[1](token_id), c[2](outcome), c[3](is_terminal), c[4](recorded_at), c[5](sink_name)
        c[6](batch_id), c[7](fork_group_id), c[8](join_group_id), c[9](expand_group_id), c[10](error_hash)
        c[11](context_json), c[12](expected_branches_json)

    def node_states(self, state_id: int, token_id: int, node_id: str, step_index: int, attempt: int, status: str,
                    input_hash: str, output_hash: str | None, context_before_json: str | None,
                    context_after_json: str | None, duration_ms: float | None, error_json: str | None,
                    success_reason_json: str | None, started_at: float, completed_at: float | None) -> None:
        c = self._states_cols
        c[0](state_id), c[1](token_id), c[2](node_id), c[3](step_index), c[4](attempt), c[5](status)
        c[6](input_hash), c[7](output_hash), c[8](context_before_json), c[9](context_after_json)
        c[10](duration_ms), c[11](error_json), c[12](success_reason_json), c[13](started_at), c[14](completed_at)
        if len(self._states_first) >= BATCH_ROWS:
            self.seal()

    def routing_events(self, event_id: int, state_id: int, edge_id: int, routing_group_id: int, ordinal: int,
                       mode: str, reason_hash: str | None, reason_ref: str | None, created_at: float) -> None:
        c = self._routing_cols
        c[0](event_id), c[1](state_id), c[2](edge_id), c[3](routing_group_id), c[4](ordinal), c[5](mode)
        c[6](reason_hash), c[7](reason_ref), c[8](created_at)

    def operations(self, operation_id: int, node_id: str, operation_type: str, started_at: float,
                   completed_at: float | None, status: str, input_data_ref: str | None, input_data_hash: str | None,
                   output_data_ref: str | None, output_data_hash: str | None, error_message: str | None,
                   duration_ms: float | None) -> None:
        self._add("operations", operation_id, node_id, operation_type, started_at, completed_at, status,
                  input_data_ref, input_data_hash, output_data_ref, output_data_hash, error_message, duration_ms)

    def calls(self, call_id: int, state_id: int | None, operation_id: str | None, call_index: int, call_type: str,
              status: str, request_hash: str, request_ref: str | None, response_hash: str | None,
              response_ref: str | None, error_json: str | None, latency_ms: float | None, created_at: float) -> None:
        self._add("calls", call_id, state_id, operation_id, call_index, call_type, status, request_hash, request_ref,
                  response_hash, response_ref, error_json, latency_ms, created_at)

    def artifacts(self, artifact_id: int, produced_by_state_id: int | None, sink_node_id: str, artifact_type: str,
                  path_or_uri: str, content_hash: str, size_bytes: int, idempotency_key: str | None,
                  created_at: float, row_count: int) -> None:
        self._add("artifacts", artifact_id, produced_by_state_id, sink_node_id, artifact_type, path_or_uri,
                  content_hash, size_bytes, idempotency_key, created_at, row_count)

    def validation_errors(self, error_id: int, node_id: str | None, row_hash: str, row_data_json: str | None,
                          error: str, schema_mode: str, destination: str, created_at: float,
                          violation_type: str | None, original_field_name: str | None,
                          normalized_field_name: str | None, expected_type: str | None, actual_type: str | None,
                          row_id: int | None, source_location: str | None) -> None:
        self._add("validation_errors", error_id, node_id, row_hash, row_data_json, error, schema_mode, destination,
                  created_at, violation_type, original_field_name, normalized_field_name, expected_type, actual_type,
                  row_id, source_location)

    def transform_errors(self, error_id: int, token_id: int, transform_id: str, row_hash: str,
                         row_data_json: str | None, error_details_json: str, destination: str,
                         created_at: float) -> None:
        self._add("transform_errors", error_id, token_id, transform_id, row_hash, row_data_json, error_details_json,
                  destination, created_at)

    # -- our tables ---------------------------------------------------------------------------
    def coalesce_events(self, event_id: int, node_id: str, coalesce_name: str, row_id: int, event_type: str,
                        trigger: str, failure_reason: str | None, policy: str, merge_strategy: str,
                        quorum_count: int | None, timeout_seconds: float | None, select_branch: str | None,
                        expected_branches: list[str], branches_arrived: list[str], arrived_token_ids: list[str],
                        arrival_offsets_ms: Sequence[float | None], branches_lost: list[str], lost_reasons: list[str],
                        n_expected: int, n_arrived: int, n_lost: int, first_arrival_at: float | None,
                        decided_at: float, wait_duration_ms: float | None, join_group_id: int | None,
                        merged_token_id: int | None, merged_row_hash: str | None, union_collisions: list[str] | None,
                        decision_event_id: int | None, late_branch: str | None, late_token_id: int | None,
                        late_by_ms: float | None, context_json: str) -> None:
        c = self._events_cols
        c[0](event_id), c[1](node_id), c[2](coalesce_name), c[3](row_id), c[4](event_type), c[5](trigger)
        c[6](failure_reason), c[7](policy), c[8](merge_strategy), c[9](quorum_count), c[10](timeout_seconds)
        c[11](select_branch), c[12](expected_branches), c[13](branches_arrived), c[14](arrived_token_ids)
        c[15](arrival_offsets_ms), c[16](branches_lost), c[17](lost_reasons), c[18](n_expected), c[19](n_arrived)
        c[20](n_lost), c[21](first_arrival_at), c[22](decided_at), c[23](wait_duration_ms), c[24](join_group_id)
        c[25](merged_token_id), c[26](merged_row_hash), c[27](union_collisions), c[28](decision_event_id)
        c[29](late_branch), c[30](late_token_id), c[31](late_by_ms), c[32](context_json)

    def payloads(self, payload_hash: str, payload_json: str) -> None:
        """Store a payload once per content hash (deduplicated over a bounded recent window)."""
        if payload_hash in self._payloads_recent or payload_hash in self._payloads_older:
            return
        recent = self._payloads_recent
        if len(recent) >= self._payload_cache_size:
            self._payloads_older = recent
            self._payloads_recent = recent = set()
        recent.add(payload_hash)
        c = self._payloads_cols
        c[0](payload_hash), c[1](payload_json)

    # -- flushing ---------------------------------------------------------------------------------
    def buffered(self) -> int:
        """Records waiting in memory."""
        return sum(len(b) for b in self._tables.values())

    def seal(self) -> None:
        """Convert every table's column lists into Arrow arrays (cheap while the values are hot)."""
        for buffer in self._tables.values():
            if len(buffer.columns[0]) >= BATCH_ROWS // 4:
                buffer.seal()

    def tick(self) -> None:
        """Seal hot columns; write full tables, or everything once the flush interval has passed."""
        self.seal()
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()
            return
        full = [name for name, buffer in self._tables.items() if len(buffer) >= self.segment_rows]
        if full:
            self.flush(full)

    def flush(self, tables: Iterable[str] | None = None) -> None:
        """Write the named (default: all non-empty) tables as one segment each."""
        names = [n for n in (tables if tables is not None else self._tables) if len(self._tables[n])]
        if self.before_flush is not None:
            self.before_flush()
        for name in names:
            buffer = self._tables[name]
            count = len(buffer)
            batches = buffer.take()
            if self._segments is not None:
                self._segments.submit(buffer.table, batches)
            else:
                self.writer.write_segment(buffer.table, self.run_id,
                                          finish_batches(buffer.table, self.run_id, self.time_offset, batches,
                                                         dictionaries=getattr(self.writer, "takes_dictionaries",
                                                                              False)))
            self.records_written[name] += count
        self._last_flush = time.monotonic()

    def drain(self) -> None:
        """Write out everything buffered except ``runs`` and wait until it is on disk."""
        self.flush([name for name in self._tables if name != "runs"])
        if self._segments is not None:
            self._segments.drain()

    def pending_counts(self) -> dict[str, int]:
        """Records per table, written or buffered."""
        return {name: self.records_written[name] + len(buffer) for name, buffer in self._tables.items()}

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._segments is not None:
                self._segments.close()
        self.writer.close()
