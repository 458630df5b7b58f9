"""Run a pipeline: wire executors from the graph, drive the event loop, record the whole trail.

The loop is single-threaded and event-driven: a depth-first work stack (so a row's branches run
in configured order when nothing waits), a timer heap on the engine clock (simulated calls and
coalesce timeouts), and up to ``max_in_flight`` source rows at once, so memory stays flat
however long the input is.
"""

from __future__ import annotations

import gc
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from elspeth_nb._version import __version__
from elspeth_nb.audit.hashing import canonical_json, error_hash, stable_hash
from elspeth_nb.audit.recorder import Recorder
from elspeth_nb.audit.schema import CANONICAL_VERSION, SCHEMA_VERSION, Outcome, RunStatus, StateStatus
from elspeth_nb.audit.store import AuditStore, mark_interrupted
from elspeth_nb.audit.writer import ParquetSegmentWriter, SegmentWriter
from elspeth_nb.engine.clock import Clock, SystemClock
from elspeth_nb.engine.coalesce import CoalesceExecutor, EngineInvariantError
from elspeth_nb.engine.dag import Pipeline, load_pipeline
from elspeth_nb.engine.executors import (
    ErrorRouting,
    GateExecutor,
    LatencyExecutor,
    NodeExecutor,
    Route,
    SinkExecutor,
    TransformExecutor,
)
from elspeth_nb.engine.expressions import compile_condition
from elspeth_nb.engine.plugins import build_sink, build_source, build_transform
from elspeth_nb.engine.plugins.sources import Quarantine
from elspeth_nb.engine.plugins.transforms import Latency
from elspeth_nb.engine.tokens import EngineContext, RowContext, hash_row
from elspeth_nb.errors import CanonicalizationError, Error, InputError

PRODUCER = f"elspeth-nb {__version__}"


@dataclass(frozen=True)
class RunResult:
    """What a run did: its id, status, counts and where its audit trail is."""

    run_id: str
    status: str
    audit_path: Path
    duration_s: float
    rows: int
    quarantined: int
    outcomes: Mapping[str, int]
    coalesce: Mapping[str, Mapping[str, int]]
    artifacts: tuple[str, ...]
    duckdb: str
    warnings: tuple[str, ...] = ()
    error: str | None = None
    counts: Mapping[str, int] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.duration_s if self.duration_s > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "status": self.status, "audit_path": str(self.audit_path),
            "duration_s": round(self.duration_s, 3), "rows": self.rows, "quarantined": self.quarantined,
            "outcomes": dict(self.outcomes), "coalesce": {k: dict(v) for k, v in self.coalesce.items()},
            "artifacts": list(self.artifacts), "duckdb": self.duckdb, "warnings": list(self.warnings),
            "error": self.error,
        }

    def __repr__(self) -> str:
        outcomes = ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        lines = [
            f"Run {self.run_id}: {self.status} in {self.duration_s:.2f}s "
            f"({self.rows} source rows, {self.rows_per_second:,.0f} rows/s)",
            f"  audit store: {self.audit_path}",
            f"  outcomes: {outcomes}",
        ]
        for name, stats in self.coalesce.items():
            lines.append(f"  coalesce {name}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
        if self.duckdb:
            lines.append(f"  audit.duckdb: {self.duckdb}")
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.error:
            lines.append(f"  error: {self.error}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from html import escape

        rows = "".join(f"<tr><th style='text-align:left'>{escape(k)}</th><td>{escape(str(v))}</td></tr>"
                       for k, v in self.to_dict().items())
        return f"<table><caption>elspeth-nb run</caption>{rows}</table>"


class RunFailedError(Error, RuntimeError):
    """The run started, its audit trail is complete and marked failed, and it did not finish."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


def run_pipeline(
    pipeline: str | os.PathLike[str] | Pipeline | Mapping[str, Any],
    *,
    audit: str | os.PathLike[str] | None = None,
    clock: Clock | None = None,
    payloads: str | None = None,
    max_in_flight: int | None = None,
    run_id: str | None = None,
    sync_duckdb: bool = True,
    writer: SegmentWriter | None = None,
    segment_rows: int = 200_000,
    flush_interval_s: float = 5.0,
) -> RunResult:
    """Run a pipeline (YAML path, mapping or :class:`Pipeline`) and write its audit trail.

    >>> result = run_pipeline("data/demo/pipeline.yaml", audit="/tmp/enb-doctest")  # doctest: +SKIP
    >>> result.status  # doctest: +SKIP
    'completed'
    """
    if isinstance(pipeline, Pipeline):
        loaded = pipeline
    elif isinstance(pipeline, Mapping):
        loaded = Pipeline.from_dict(pipeline)
    else:
        loaded = load_pipeline(pipeline)
    engine = Engine(
        loaded,
        audit_root=Path(audit) if audit is not None else loaded.resolve_path(loaded.config.audit.path),
        clock=clock or SystemClock(),
        payload_mode=payloads or loaded.config.audit.payloads,
        max_in_flight=max_in_flight or loaded.config.engine.max_in_flight,
        run_id=run_id or uuid.uuid4().hex,
    )
    return engine.run(sync_duckdb=sync_duckdb, writer=writer, segment_rows=segment_rows,
                      flush_interval_s=flush_interval_s)


class Engine:
    """One run of one pipeline."""

    def __init__(self, pipeline: Pipeline, *, audit_root: Path, clock: Clock, payload_mode: str,
                 max_in_flight: int, run_id: str) -> None:
        if payload_mode not in ("all", "boundaries", "hashes"):
            raise ValueError(f"payloads must be all, boundaries or hashes, not {payload_mode!r}")
        self.pipeline = pipeline
        self.graph = pipeline.graph
        self.audit_root = audit_root
        self.clock = clock
        self.payload_mode = payload_mode
        self.max_in_flight = max(1, int(max_in_flight))
        self.run_id = run_id
        config = pipeline.config
        self.source = build_source(config.source, pipeline.resolve_path)
        self.source.check_readable()
        self.plugins = {t.name: build_transform(t, pipeline.base_dir) for t in config.transforms}
        self.sinks = {name: build_sink(s, pipeline.resolve_path) for name, s in config.sinks.items()}
        for name, sink in self.sinks.items():
            check_writable(sink.path, f"sinks.{name}.options.path")
        self.settings = config.model_dump(mode="json", exclude_none=True)
        self.opened_sinks: list[Any] = []

    # -- the run --------------------------------------------------------------------------------
    def run(self, *, sync_duckdb: bool, writer: SegmentWriter | None, segment_rows: int,
            flush_interval_s: float) -> RunResult:
        store = AuditStore.create(self.audit_root)
        mark_interrupted(store, found_by="the next run in this store")
        started = time.perf_counter()
        with store.writing(self.run_id):
            rec = Recorder(self.run_id, writer or ParquetSegmentWriter(store.parquet_root), segment_rows=segment_rows,
                           flush_interval_s=flush_interval_s, before_flush=self._flush_sinks,
                           time_offset=self.clock.offset)
            self.ctx = ctx = EngineContext(self.run_id, rec, self.clock, self.payload_mode)
            self.open_rows = ctx.open_rows
            self._record_run_start()
            rec.flush()
            status, error = RunStatus.COMPLETED, None
            try:
                self._wire()
                for sink in self.sinks.values():
                    sink.open()
                    self.opened_sinks.append(sink)
                self._loop()
            except KeyboardInterrupt:
                status, error = RunStatus.INTERRUPTED, "interrupted by the user (KeyboardInterrupt)"
                self._finalize(status, error)
                raise
            except BaseException as exc:  # SystemExit from a plugin too: record it, then report it
                status, error = RunStatus.FAILED, f"{type(exc).__name__}: {exc}"
            artifacts = self._finalize(status, error)
        message = ""
        if sync_duckdb and writer is None:
            sync = store.sync_duckdb([self.run_id])
            message = sync.message or f"up to date ({sync.seconds:.2f}s)"
        result = self._result(status, error, time.perf_counter() - started, artifacts, message)
        if status != RunStatus.COMPLETED:
            raise RunFailedError(f"run {self.run_id} {status}: {error}", result)
        return result

    def _loop(self) -> None:
        """Drive the run; the cyclic GC is relaxed meanwhile (rows release their cycles themselves)."""
        thresholds = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(50_000, 50, 1000)
        try:
            self._drive()
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()

    def _drive(self) -> None:
        ctx, stack, rec = self.ctx, self.ctx.stack, self.ctx.rec
        records = self.source.records()
        admitted = 0
        exhausted = False
        self._source_started = ctx.now()
        while True:
            while stack:
                receive, token, arg = stack.pop()
                receive(token, arg)
            if ctx.timers and ctx.fire_due_timer():
                continue
            if not exhausted and len(self.open_rows) < self.max_in_flight:
                record = next(records, None)
                if record is None:
                    exhausted = True
                    self._source_ended = ctx.now()
                    continue
                self._admit(record, admitted)
                admitted += 1
                if admitted & 255 == 0:
                    rec.tick()
                continue
            due = ctx.next_due()
            if due is not None:
                rec.tick()
                self.clock.sleep_until(due)
                continue
            if exhausted and self.open_rows:
                self._end_of_source()
                if stack:
                    continue
                raise EngineInvariantError(
                    f"{len(self.open_rows)} row(s) still have live tokens after end of source")
            if exhausted:
                break
        self.rows_admitted = admitted

    def _end_of_source(self) -> None:
        """Decide every join still pending (the engine normally leaves none)."""
        for rc in list(self.open_rows):
            for coalesce in self.coalesces:
                coalesce.flush(rc)

    # -- source rows ----------------------------------------------------------------------------
    def _admit(self, record: dict[str, Any] | Quarantine, index: int) -> None:
        ctx = self.ctx
        now = ctx.now()
        rc = RowContext(ctx.new_row_id(), index)
        self.open_rows.add(rc)
        if type(record) is not dict:
            self._quarantine(rc, record, now)  # type: ignore[arg-type]
            return
        try:
            data, row_hash = hash_row(record)
        except CanonicalizationError as exc:
            location = self.source.current_location()
            self._quarantine(rc, Quarantine(_safe_raw(record), str(exc), "non_finite", location), now)
            return
        ref = None
        if ctx.store_boundary_payloads:
            ctx.store_payload(row_hash, data)
            ref = row_hash
        ctx.rec.rows(rc.row_id, self.source_node.node_id, index, row_hash, ref, now)
        token = ctx.new_token(rc, record, data, row_hash, (), now)
        ctx.rec.node_states(ctx.new_state_id(), token.id, self.source_node.node_id, 0, 0, StateStatus.COMPLETED,
                            row_hash, row_hash, None, None, 0.0, None, None, now, now)
        receive, arg = self.source_route
        ctx.stack.append((receive, token, arg))

    def _quarantine(self, rc: RowContext, problem: Quarantine, now: float) -> None:
        ctx = self.ctx
        data, row_hash = hash_row(problem.raw)
        ref = None
        if ctx.store_boundary_payloads:
            ctx.store_payload(row_hash, data)
            ref = row_hash
        node_id = self.source_node.node_id
        ctx.rec.rows(rc.row_id, node_id, rc.index, row_hash, ref, now)
        token = ctx.new_token(rc, problem.raw, data, row_hash, (), now)
        details = {"reason": problem.violation_type, "error": problem.error, "location": problem.location}
        state_id = ctx.new_state_id()
        ctx.rec.node_states(state_id, token.id, node_id, 0, 0, StateStatus.FAILED, row_hash, None, None, None, 0.0,
                            canonical_json(details), None, now, now)
        destination = self.quarantine_destination
        ctx.rec.validation_errors(ctx.new_error_id(), node_id, row_hash, data.decode(), problem.error,
                                  self.source.schema_mode, destination, now, problem.violation_type, problem.field,
                                  problem.field, problem.expected_type, problem.actual_type, rc.row_id,
                                  problem.location)
        self.quarantined += 1
        if self.quarantine_route is None:
            ctx.finish(token, Outcome.QUARANTINED, now, error_hash=error_hash(problem.violation_type))
            return
        ctx.rec.routing_events(ctx.new_event_id(), state_id, self.edge_ids[("source", "__quarantine__")],
                               ctx.new_group_id(), 0, "divert", stable_hash(details), None, now)
        receive, _ = self.quarantine_route
        ctx.stack.append((receive, token, (Outcome.QUARANTINED, None)))

    # -- wiring -----------------------------------------------------------------------------------
    def _wire(self) -> None:
        """Build one executor per node and resolve every route once."""
        ctx, graph = self.ctx, self.graph
        self.executors: dict[str, NodeExecutor] = {}
        self.quarantined = 0
        self.rows_admitted = 0
        for node in graph.nodes:
            if node.node_type == "source":
                self.source_node = node
            elif node.node_type == "transform":
                plugin = self.plugins[node.name]
                cls = LatencyExecutor if isinstance(plugin, Latency) else TransformExecutor
                self.executors[node.name] = cls(ctx, node.name, node.node_id, node.step, plugin)
            elif node.node_type == "gate":
                gate = self._gate_config(node.name)
                self.executors[node.name] = GateExecutor(ctx, node.name, node.node_id, node.step,
                                                         compile_condition(gate.condition), gate.routes)
            elif node.node_type == "coalesce":
                config = next(c for c in self.pipeline.config.coalesce if c.name == node.name)
                self.executors[node.name] = CoalesceExecutor(ctx, node.name, node.node_id, node.step, config)
            else:
                self.executors[node.name] = SinkExecutor(ctx, node.name, node.node_id, node.step,
                                                         self.sinks[node.name])
        self.coalesces = [e for e in self.executors.values() if isinstance(e, CoalesceExecutor)]
        self._wire_routes()

    def _wire_routes(self) -> None:
        config, graph = self.pipeline.config, self.graph
        self.source_route = self._route(config.source.on_success, Outcome.COMPLETED)
        failure = config.source.options.on_validation_failure
        self.quarantine_destination = failure
        self.quarantine_route = None if failure == "discard" else self._route(failure, Outcome.QUARANTINED)
        for transform in config.transforms:
            executor = self.executors[transform.name]
            assert isinstance(executor, TransformExecutor)
            executor.next = self._route(transform.on_success, Outcome.COMPLETED)
            target = transform.on_error
            if target is None or target == "discard":
                executor.on_error = ErrorRouting(target, None, None)
            else:
                executor.on_error = ErrorRouting(target, self._route(target, Outcome.ROUTED),
                                                 self.edge_ids[(transform.name, f"__error_{transform.name}__")])
        for gate in config.gates:
            executor = self.executors[gate.name]
            assert isinstance(executor, GateExecutor)
            for label, destination in gate.routes.items():
                if destination == "fork":
                    executor.targets[label] = ("fork", None, "")
                    continue
                kind = graph.resolve(destination).kind
                executor.targets[label] = (kind, self._route(destination, Outcome.ROUTED),
                                           self.edge_ids[(gate.name, label)])
            for branch in gate.fork_to or ():
                target = graph.fork_targets.get((gate.name, branch))
                duty = None if target is None else (self.executors[target[0]], target[1])
                executor.fork_branches.append(
                    (branch, self._route(branch, Outcome.ROUTED), self.edge_ids[(gate.name, branch)], duty))
        for coalesce in config.coalesce:
            executor = self.executors[coalesce.name]
            assert isinstance(executor, CoalesceExecutor)
            executor.next = self._route(coalesce.on_success, Outcome.COMPLETED)

    def _route(self, label: str | None, sink_outcome: str) -> Route:
        destination = self.graph.resolve(label) if label is not None else None
        if destination is None or destination.kind == "discard" or destination.name is None:
            raise EngineInvariantError(f"no route for {label!r}")
        executor = self.executors[destination.name]
        if destination.kind == "sink":
            return executor.receive, sink_outcome
        if isinstance(executor, CoalesceExecutor):
            return executor.receive, destination.coalesce_branch
        return executor.receive, None

    def _gate_config(self, name: str) -> Any:
        return next(g for g in self.pipeline.config.gates if g.name == name)

    # -- run records ------------------------------------------------------------------------------
    def _record_run_start(self) -> None:
        rec, ctx = self.ctx.rec, self.ctx
        started = ctx.now()
        self._run_row = {
            "started_at": started, "config_hash": stable_hash(self.settings),
            "settings_json": canonical_json(self.settings), "reproducibility_grade": self._grade(),
            "canonical_version": CANONICAL_VERSION, "source_schema_json": None,
            "source_field_resolution_json": None, "schema_version": SCHEMA_VERSION, "producer": PRODUCER,
            "pipeline_path": str(self.pipeline.source_path) if self.pipeline.source_path else None,
            "payload_mode": self.payload_mode,
        }
        rec.runs(completed_at=None, status=RunStatus.RUNNING, revision=0, **self._run_row)
        self.edge_ids: dict[tuple[str, str], int] = {}
        names = {n.name: n.node_id for n in self.graph.nodes}
        for node in self.graph.nodes:
            config = dict(node.config)
            schema = (config.get("schema") or {}) if isinstance(config.get("schema"), dict) else {}
            rec.nodes(node.node_id, node.plugin_name, node.node_type, node.plugin_version, node.determinism,
                      node.config_hash, canonical_json(config), None, node.step, started,
                      schema.get("mode"), canonical_json(schema["fields"]) if schema.get("fields") else None,
                      None, None, node.name)
        for edge in self.graph.edges:
            edge_id = ctx.new_edge_id()
            self.edge_ids[(edge.from_node, edge.label)] = edge_id
            rec.edges(edge_id, names[edge.from_node], names[edge.to_node], edge.label, edge.mode, started)

    def _grade(self) -> str:
        kinds = {n.determinism for n in self.graph.nodes if n.node_type not in ("source", "sink")}
        return "full_reproducible" if kinds <= {"deterministic", "seeded"} else "replay_reproducible"

    def _flush_sinks(self) -> None:
        """Sink bytes reach the OS before the audit says they were written."""
        for sink in self.opened_sinks:
            sink.flush()

    def _finalize(self, status: str, error: str | None) -> list[str]:
        ctx, rec = self.ctx, self.ctx.rec
        artifacts = []
        now = ctx.now()
        for name, sink in self.sinks.items():
            if sink not in self.opened_sinks:
                continue
            executor = self.executors.get(name)
            try:
                artifact = sink.close()
            except (OSError, AttributeError, Error) as exc:
                error = error or f"sink {name} could not be closed: {exc}"
                status = RunStatus.FAILED if status == RunStatus.COMPLETED else status
                continue
            node_id = self.graph.node(name).node_id
            uri = artifact.path.resolve().as_uri()
            rec.artifacts(ctx.new_artifact_id(), getattr(executor, "first_state_id", None), node_id,
                          artifact.artifact_type, uri, artifact.content_hash, artifact.size_bytes, None,
                          now, artifact.rows)
            rec.operations(ctx.new_operation_id(), node_id, "sink_write", now, ctx.now(),
                           "completed", None, None, uri, artifact.content_hash, None, None)
            artifacts.append(str(artifact.path))
        source_started = getattr(self, "_source_started", now)
        source_ended = getattr(self, "_source_ended", now)
        rec.operations(ctx.new_operation_id(), self.graph.nodes[0].node_id, "source_load", source_started,
                       source_ended, "completed" if status == RunStatus.COMPLETED else "failed",
                       self.source.path.resolve().as_uri(), None, None, None, error,
                       (source_ended - source_started) * 1000.0)
        self._counts = self._count()
        rec.runs(completed_at=ctx.now(), status=status, revision=1, counts_json=orjson.dumps(self._counts).decode(),
                 error_message=error, **self._run_row)
        rec.close()
        self._error = error
        return artifacts

    def _count(self) -> dict[str, Any]:
        written = self.ctx.rec.pending_counts()
        return {
            "rows": getattr(self, "rows_admitted", 0), "quarantined": getattr(self, "quarantined", 0),
            "outcomes": dict(sorted(self.ctx.outcome_counts.items())),
            "coalesce": {c.name: {"merged": c.merges, "failed": c.failures, "late_arrivals": c.late_arrivals}
                         for c in getattr(self, "coalesces", [])},
            "records": written,
        }

    def _result(self, status: str, error: str | None, seconds: float, artifacts: list[str],
                duckdb_message: str) -> RunResult:
        counts = self._counts
        return RunResult(
            run_id=self.run_id, status=status, audit_path=self.audit_root, duration_s=seconds,
            rows=counts["rows"], quarantined=counts["quarantined"], outcomes=counts["outcomes"],
            coalesce=counts["coalesce"], artifacts=tuple(artifacts), duckdb=duckdb_message,
            warnings=self.pipeline.warnings, error=self._error or error, counts=counts["records"],
        )


def check_writable(path: Path, where: str) -> None:
    """Fail before the run starts if a sink cannot write ``path``."""
    if path.is_dir():
        raise InputError(f"{where}: {path} is a directory; a sink writes a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{where}: cannot create the folder for {path}: {exc.strerror or exc}") from exc
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{where}: {path} is not writable")


def _safe_raw(record: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe stand-in for a row that cannot be hashed (non-finite floats become strings)."""
    return {k: (repr(v) if isinstance(v, float) else v) if not isinstance(v, dict | list) else repr(v)
            for k, v in record.items()}
