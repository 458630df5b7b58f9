"""The most a batch-at-a-time engine could reach with today's trail: a ceiling for issue 2's target.

The engine moves one token at a time, so every record costs Python calls. This script measures what
would be left if it did not: it runs ``engine_throughput.py``'s pipeline (3-branch fork, require_all
union coalesce, JSONL sink, payloads ``all``) with the row loop replaced by one written for this
pipeline alone, ``--batch`` source rows at a time, appending whole columns to the real recorder.
Everything else is the real run: CSV source, plugins, hashing, coalesce contexts, the recorder's
Arrow conversion, Parquet segments, fingerprints, digests and the Merkle root.

It is a measuring instrument, not an engine: it handles no error, loss, timeout or other pipeline.
``--check`` first runs both on the same rows and compares their trails record for record (ids,
times and the hashes that embed ids left out), so the ceiling counts the same work the engine does.

``--row-groups`` and ``--no-fingerprints`` show what giving up two other guarantees would add:
2048-row row groups keep a lineage lookup at half the latency of 8192; fingerprints locate a
tampered record.

    .venv/bin/python bench/batch_ceiling.py --rows 100000 --workers 2 --check 2000
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from collections.abc import Iterable, Sequence
from itertools import islice, repeat
from pathlib import Path
from typing import Any

from _machine import Conditions
from engine_throughput import WORK, fresh_run

TARGET = 10_000
TRAIL_TABLES = ("rows", "tokens", "token_parents", "token_outcomes", "node_states", "routing_events", "payloads",
                "coalesce_events")
#: Context keys that hold ids or clock readings, which differ between any two runs.
VOLATILE_KEYS = frozenset({"event_id", "token_id", "merged_token_id", "join_group_id", "arrival_offset_ms",
                           "wait_duration_ms"})


def _ids(ctx: Any, counter: str, n: int) -> range:
    """Take ``n`` consecutive ids from one of the engine context's counters."""
    first = getattr(ctx, counter)()
    setattr(ctx, counter, itertools.count(first + n).__next__)
    return range(first, first + n)


def _ms(started: Sequence[float], ended: Sequence[float]) -> list[float]:
    """Durations in milliseconds between paired clock readings."""
    return [(e - s) * 1000.0 for s, e in zip(started, ended, strict=True)]


def _each(value: Any, n: int) -> Iterable[Any]:
    """A per-record column: the values themselves, or one value for all ``n`` records."""
    return value if isinstance(value, (list, range)) else repeat(value, n)


class Columns:
    """Appends whole columns of records to the recorder's buffers, in each table's column order."""

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder
        self.tables = {name: buffer.columns for name, buffer in recorder._tables.items()}

    def add(self, table: str, n: int, *values: Any) -> None:
        for column, value in zip(self.tables[table], values, strict=True):
            if isinstance(column, list):
                column.extend(_each(value, n))
            else:  # a list-typed column takes one list per record
                for item in _each(value, n):
                    column.append(item)

    def payloads(self, hashes: Sequence[str], datas: Sequence[bytes]) -> None:
        seen, (hash_column, json_column) = self.recorder._payloads_recent, self.tables["payloads"]
        for payload_hash, data in zip(hashes, datas, strict=True):
            if payload_hash not in seen:
                seen.add(payload_hash)
                hash_column.append(payload_hash)
                json_column.append(data.decode())


def batch_loop(self: Any, records: Any, start: int, batch: int) -> None:
    """``RowProcessor._loop`` for the benchmark pipeline only, ``batch`` source rows at a time."""
    from elspeth_nb.audit.hashing import canonical_json_prepared, json_number, stable_hash
    from elspeth_nb.engine.coalesce import merge_union
    from elspeth_nb.engine.tokens import hash_row

    ctx, out = self.ctx, Columns(self.ctx.rec)
    now, text, source = ctx.now, ctx.text, self.source_node_id
    gate, sink, coalesce = self.executors["fork_gate"], self.executors["output"], self.executors["merge3"]
    branches = [self.executors[name] for name in ("branch_a_passthrough", "branch_b_truncate", "branch_c_mapper")]
    order = coalesce.branches
    gate_context, reason_hash, reason_ref = gate._decision("true")
    index = start
    while rows := list(islice(records, batch)):
        n = len(rows)
        hashed = [hash_row(r) for r in rows]
        datas, hashes = [d for d, _ in hashed], [h for _, h in hashed]
        out.payloads(hashes, datas)
        admitted = [now() for _ in rows]
        row_ids, source_tokens = _ids(ctx, "new_row_id", n), _ids(ctx, "new_token_id", n)
        out.add("rows", n, row_ids, source, range(index, index + n), hashes, hashes, admitted)
        out.add("tokens", n, source_tokens, row_ids, None, None, None, None, None, admitted)
        out.add("node_states", n, _ids(ctx, "new_state_id", n), source_tokens, source, 0, 0, "completed", hashes,
                hashes, None, None, [0.0] * n, None, None, admitted, admitted)

        started, ended = [], []
        for row in rows:
            started.append(now())
            gate.evaluate(row)
            ended.append(now())
        gate_states = _ids(ctx, "new_state_id", n)
        out.add("node_states", n, gate_states, source_tokens, gate.node_id, gate.step, 0, "completed", hashes, hashes,
                None, gate_context, _ms(started, ended), None, None, started, ended)
        fork_groups, routing_groups = _ids(ctx, "new_group_id", n), _ids(ctx, "new_group_id", n)
        children = []
        for ordinal, (branch, _, edge_id, _) in enumerate(gate.fork_branches):
            child = _ids(ctx, "new_token_id", n)
            out.add("tokens", n, child, row_ids, fork_groups, None, None, branch, gate.step, ended)
            out.add("token_parents", n, child, source_tokens, ordinal)
            out.add("routing_events", n, _ids(ctx, "new_event_id", n), gate_states, edge_id, routing_groups, ordinal,
                    "copy", reason_hash, reason_ref, ended)
            children.append(child)
        out.add("token_outcomes", n, _ids(ctx, "new_outcome_id", n), source_tokens, "forked", 1, ended, None, None,
                fork_groups, None, None, None, None, gate._expected)

        branch_rows, branch_hashes, arrived = [], [], []
        for b, transform in enumerate(branches):
            outputs, reasons, started, ended = [], [], [], []
            for row in rows:
                started.append(now())
                result, reason = transform.process(row)
                ended.append(now())
                outputs.append(result)
                reasons.append(reason)
            output_hashes = []
            for row, result, row_hash in zip(rows, outputs, hashes, strict=True):
                if result is row:
                    output_hashes.append(row_hash)
                    continue
                data, result_hash = hash_row(result)
                output_hashes.append(result_hash)
                out.payloads([result_hash], [data])
            out.add("node_states", n, _ids(ctx, "new_state_id", n), children[b], transform.node_id, transform.step, 0,
                    "completed", hashes, output_hashes, None, None,
                    _ms(started, ended), None, reasons, started, ended)
            branch_rows.append(outputs)
            branch_hashes.append(output_hashes)
            arrived.append(ended)

        merged_tokens, join_groups = _ids(ctx, "new_token_id", n), _ids(ctx, "new_group_id", n)
        events = _ids(ctx, "new_coalesce_event_id", n)
        merged_rows, merged_datas, merged_hashes, contexts, decided = [], [], [], [], []
        merged_into, inputs_hashes, waits, offsets, token_texts, collisions_of = [], [], [], [], [], []
        for i in range(n):
            merged, collisions = merge_union(order, {order[b]: branch_rows[b][i] for b in range(3)})
            data, merged_hash = hash_row(merged)
            at, first = now(), arrived[0][i]
            row_offsets = [(arrived[b][i] - first) * 1000.0 for b in range(3)]
            texts = [text("token", children[b][i]) for b in range(3)]
            merged_text = text("token", merged_tokens[i])
            context = {
                "coalesce": coalesce.name, "event_id": text("coalesce_event", events[i]), "outcome": "merged",
                "trigger": "all_arrived", **coalesce._settings, "expected_branches": order, "branches_arrived": order,
                "arrival_order": [{"branch": order[b], "token_id": texts[b], "arrival_offset_ms": json_number(o)}
                                  for b, o in enumerate(row_offsets)],
                "branches_lost": {}, "wait_duration_ms": json_number((at - first) * 1000.0),
                "merged_token_id": merged_text, "join_group_id": text("group", join_groups[i]),
                "merged_row_hash": merged_hash,
            }
            if collisions:
                context["union_field_collisions"] = collisions
            contexts.append(canonical_json_prepared(context))
            merged_rows.append(merged)
            merged_datas.append(data)
            merged_hashes.append(merged_hash)
            decided.append(at)
            merged_into.append(hashlib.sha256(b'{"merged_into":"' + merged_text.encode() + b'"}').hexdigest())
            inputs_hashes.append(stable_hash({order[b]: branch_hashes[b][i] for b in range(3)}))
            waits.append((at - first) * 1000.0)
            offsets.append(row_offsets)
            token_texts.append(texts)
            collisions_of.append(sorted(collisions))
        out.add("tokens", n, merged_tokens, row_ids, None, join_groups, None, None, coalesce.step, decided)
        for b in range(3):
            out.add("token_parents", n, merged_tokens, children[b], b)
            out.add("node_states", n, _ids(ctx, "new_state_id", n), children[b], coalesce.node_id, coalesce.step, 0,
                    "completed", branch_hashes[b], merged_into, None, contexts,
                    _ms(arrived[b], decided), None, None, arrived[b], decided)
            out.add("token_outcomes", n, _ids(ctx, "new_outcome_id", n), children[b], "coalesced", 1, decided, None,
                    None, None, join_groups, None, None, contexts, None)
        out.add("node_states", n, _ids(ctx, "new_state_id", n), merged_tokens, coalesce.node_id, coalesce.step, 0,
                "completed", inputs_hashes, merged_hashes, None, contexts, waits, None, None, arrived[0], decided)
        out.payloads(merged_hashes, merged_datas)
        out.add("coalesce_events", n, events, coalesce.node_id, coalesce.name, row_ids, "merged", "all_arrived", None,
                coalesce.policy, coalesce.strategy, None, None, None, [order] * n, [order] * n, token_texts, offsets,
                [[]] * n, [[]] * n, 3, 3, 0, arrived[0], decided, waits, join_groups, merged_tokens, merged_hashes,
                collisions_of, None, None, None, None, contexts)
        coalesce.merges += n

        started, ended = [], []
        for row, data in zip(merged_rows, merged_datas, strict=True):
            started.append(now())
            sink.write(row, data)
            ended.append(now())
        sink_states = _ids(ctx, "new_state_id", n)
        if sink.first_state_id is None:
            sink.first_state_id = sink_states[0]
        out.add("node_states", n, sink_states, merged_tokens, sink.node_id, sink.step, 0, "completed", merged_hashes,
                merged_hashes, None, None, _ms(started, ended), None, None, started,
                ended)
        out.add("token_outcomes", n, _ids(ctx, "new_outcome_id", n), merged_tokens, "completed", 1, ended, sink.name,
                None, None, None, None, None, None, None)
        for outcome, count in (("forked", n), ("coalesced", 3 * n), ("completed", n)):
            ctx.outcome_counts[outcome] = ctx.outcome_counts.get(outcome, 0) + count
        index += n
        self._next_index = index
        ctx.rec.tick()


def _install(batch: int, row_groups: int | None, fingerprints: bool) -> None:
    import pyarrow as pa

    from elspeth_nb.audit import writer
    from elspeth_nb.engine.processor import RowProcessor

    RowProcessor._loop = lambda self, records, start: batch_loop(self, records, start, batch)  # type: ignore[method-assign]
    if row_groups is not None:
        writer.ROW_GROUP_ROWS = row_groups
    if not fingerprints:
        writer.fingerprints = lambda records: pa.array([0] * records.num_rows, pa.int64())  # type: ignore[attr-defined]


def _trail(audit: Path) -> dict[str, list[str]]:
    """Each trail table's records as sorted JSON text, without ids, times and the hashes that embed ids."""
    import duckdb

    def stable(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: stable(v) for k, v in value.items() if k not in VOLATILE_KEYS}
        if isinstance(value, list):
            return [stable(v) for v in value]
        return value

    found: dict[str, list[str]] = {}
    with duckdb.connect() as con:
        for table in TRAIL_TABLES:
            files = sorted(str(f) for f in (audit / "parquet" / table).glob("*/*.parquet"))
            if not files:
                found[table] = []
                continue
            relation = con.read_parquet(files, hive_partitioning=False)
            kept = [c for c in relation.columns if not c.endswith(("_id", "_ids", "_at", "_ms"))
                    and c not in ("output_hash", "duration_ms")]
            records = relation.select(*kept).fetchall()
            found[table] = sorted(json.dumps([stable(json.loads(v)) if c.endswith("_json") and v else v
                                              for c, v in zip(kept, r, strict=True)], default=str) for r in records)
    return found


def check(rows: int, work: Path, batch: int) -> list[str]:
    """Run the engine and this loop on the same ``rows`` rows; the tables whose trails differ."""
    import subprocess

    engine_run = subprocess.run([sys.executable, __file__, "--child-engine", "--rows", str(rows), "--work", str(work)],
                                check=True, capture_output=True, text=True)
    batch_run = subprocess.run([sys.executable, __file__, "--rows", str(rows), "--work", str(work), "--workers", "1",
                                "--batch", str(batch), "--check", "0", "--folder", f"ceiling_check_{rows}"],
                               check=True, capture_output=True, text=True)
    del engine_run, batch_run
    engine = _trail(work / f"engine_check_{rows}" / "audit")
    ours = _trail(work / f"ceiling_check_{rows}" / "audit")
    return [t for t in TRAIL_TABLES if engine[t] != ours[t]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="source rows")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (the engine's sharding)")
    parser.add_argument("--batch", type=int, default=1024, help="source rows per batch")
    parser.add_argument("--row-groups", type=int, default=None, help="Parquet row group size (default: the writer's)")
    parser.add_argument("--no-fingerprints", action="store_true", help="skip per-record fingerprints")
    parser.add_argument("--check", type=int, default=2000, help="compare trails with the engine on this many rows "
                        "first (0: skip)")
    parser.add_argument("--work", type=Path, default=WORK, help="folder for the input, output and trail")
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-engine", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from elspeth_nb.engine.runner import run_pipeline

    if args.child_engine:
        pipeline, _ = fresh_run(args.work, f"engine_check_{args.rows}", args.rows)
        run_pipeline(pipeline, sync_duckdb=False, workers=1)
        return 0
    if args.check:
        differing = check(args.check, args.work, args.batch)
        print(f"trail check on {args.check:,} rows: "
              + ("same records as the engine's" if not differing else f"DIFFERENT in {', '.join(differing)}"))
        if differing:
            return 1
    _install(args.batch, args.row_groups, not args.no_fingerprints)
    pipeline, _ = fresh_run(args.work, args.folder or f"ceiling_{args.rows}", args.rows)
    conditions = Conditions().start()
    began = time.perf_counter()
    result = run_pipeline(pipeline, sync_duckdb=False, workers=args.workers)
    seconds = time.perf_counter() - began
    conditions.stop()
    variant = ", ".join(filter(None, [f"{args.row_groups}-row row groups" if args.row_groups else "",
                                      "no fingerprints" if args.no_fingerprints else ""])) or "today's trail"
    print(f"{args.rows:,} rows, {args.workers} worker(s), batches of {args.batch:,}, {variant}: "
          f"{args.rows / seconds:,.0f} rows/s ({seconds:.2f} s), {1e6 * conditions.cpu_s / args.rows:.0f} CPU us/row, "
          f"{conditions.shares()}; outcomes {dict(result.outcomes)} (target {TARGET:,} rows/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
