"""The row processor: executors wired from the graph, and the event loop over source records.

The loop is single-threaded and event-driven: a depth-first work stack (so a row's branches run in
configured order when nothing waits), a timer heap on the engine clock (simulated calls and
coalesce timeouts), and up to ``max_in_flight`` source rows at once, so memory stays flat however
long the input is. One processor handles one range of source records; a run uses one, or one per
worker process when it is sharded.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from elspeth_nb.audit.hashing import canonical_json, error_hash, stable_hash
from elspeth_nb.audit.schema import Outcome, StateStatus
from elspeth_nb.engine.coalesce import CoalesceExecutor, EngineInvariantError
from elspeth_nb.engine.dag import Pipeline
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
from elspeth_nb.engine.plugins import Source
from elspeth_nb.engine.plugins.sinks import Sink
from elspeth_nb.engine.plugins.sources import Quarantine
from elspeth_nb.engine.plugins.transforms import Latency
from elspeth_nb.engine.tokens import EngineContext, RowContext, hash_row
from elspeth_nb.errors import CanonicalizationError


@dataclass
class ProcessStats:
    """What a processor did: rows, quarantines, decisions per coalesce, first sink states, timing."""

    rows: int = 0
    quarantined: int = 0
    coalesce: dict[str, dict[str, int]] = field(default_factory=dict)
    first_sink_states: dict[str, int | None] = field(default_factory=dict)
    source_started: float = 0.0
    source_ended: float = 0.0


class RunStopped(Exception):
    """Raised inside a processor asked to stop (a sharded run's parent did, for an interrupt or another worker)."""

    def __init__(self, reason: str, *, interrupted: bool) -> None:
        super().__init__(reason)
        self.interrupted = interrupted


class RowProcessor:
    """Wires one executor per node into ``ctx`` and processes source records.

    ``should_stop``, when given, is asked before each source row is admitted and before the engine waits
    for a timer (between rows, so no record is half written) and raises RunStopped with what it returns.
    """

    def __init__(self, pipeline: Pipeline, ctx: EngineContext, *, source: Source, plugins: Mapping[str, Any],
                 sinks: Mapping[str, Sink], edge_ids: Mapping[tuple[str, str], int], max_in_flight: int,
                 should_stop: Callable[[], RunStopped | None] | None = None) -> None:
        self.pipeline = pipeline
        self.graph = pipeline.graph
        self.ctx = ctx
        self.source = source
        self.plugins = plugins
        self.sinks = sinks
        self.edge_ids = edge_ids
        self.max_in_flight = max(1, int(max_in_flight))
        self.should_stop = should_stop
        self.stats = ProcessStats()
        self.executors: dict[str, NodeExecutor] = {}
        self._wire()

    # -- the loop --------------------------------------------------------------------------------
    def process(self, start: int = 0, stop: int | None = None) -> ProcessStats:
        """Process source records ``start <= index < stop``; the cyclic GC is relaxed meanwhile."""
        thresholds = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(50_000, 50, 1000)
        try:
            self._drive(start, stop)
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            stats = self.stats
            stats.coalesce = {c.name: {"merged": c.merges, "failed": c.failures, "late_arrivals": c.late_arrivals}
                              for c in self.coalesces}
            stats.first_sink_states = {name: e.first_state_id for name, e in self.executors.items()
                                       if isinstance(e, SinkExecutor)}
        return stats

    def _drive(self, start: int, stop: int | None) -> None:
        ctx = self.ctx
        records = self.source.records(start, stop)
        self.stats.source_started = self.stats.source_ended = ctx.now()
        self._next_index = start
        try:
            self._loop(records, start)
        finally:
            self.stats.rows = self._next_index - start

    def _loop(self, records: Any, start: int) -> None:
        ctx, stack, rec, open_rows = self.ctx, self.ctx.stack, self.ctx.rec, self.ctx.open_rows
        index = start
        exhausted = False
        while True:
            while stack:
                receive, token, arg = stack.pop()
                receive(token, arg)
            if ctx.timers and ctx.fire_due_timer():
                continue
            if not exhausted and len(open_rows) < self.max_in_flight:
                record = next(records, None)
                if record is None:
                    exhausted = True
                    self.stats.source_ended = ctx.now()
                    continue
                if self.should_stop is not None and (stop := self.should_stop()) is not None:
                    raise stop
                self._admit(record, index)
                self._next_index = index = index + 1
                if index & 63 == 0:
                    rec.tick()
                continue
            due = ctx.next_due()
            if due is not None:
                if self.should_stop is not None and (stop := self.should_stop()) is not None:
                    raise stop
                rec.tick()
                ctx.clock.sleep_until(due)
                continue
            if exhausted and self.should_stop is not None and (stop := self.should_stop()) is not None:
                raise stop  # asked during the last rows: the run stops as asked, not as if it finished
            if exhausted and open_rows:
                self._end_of_source()
                if stack or not open_rows:  # a join decided to merge has work; one decided to fail ended its row
                    continue
                raise EngineInvariantError(f"{len(open_rows)} row(s) still have live tokens after end of source")
            if exhausted:
                break

    def _end_of_source(self) -> None:
        """Decide every join still pending (the engine normally leaves none)."""
        for rc in list(self.ctx.open_rows):
            for coalesce in self.coalesces:
                coalesce.flush(rc)

    # -- source rows ----------------------------------------------------------------------------
    def _admit(self, record: dict[str, Any] | Quarantine, index: int) -> None:
        ctx = self.ctx
        now = ctx.now()
        rc = RowContext(ctx.new_row_id(), index)
        ctx.open_rows.add(rc)
        if type(record) is not dict:
            self._quarantine(rc, record, now)  # type: ignore[arg-type]
            return
        try:
            data, row_hash = hash_row(record)
        except CanonicalizationError as exc:  # NaN, an integer beyond +/-2**53-1, too deep: quarantined, as read
            self._quarantine(rc, self.source.unhashable(record, exc), now)
            return
        ref = None
        if ctx.store_boundary_payloads:
            ctx.store_payload(row_hash, data)
            ref = row_hash
        node_id = self.source_node_id
        ctx.rec.rows(rc.row_id, node_id, index, row_hash, ref, now)
        token = ctx.new_token(rc, record, data, row_hash, (), now)
        ctx.rec.node_states(ctx.new_state_id(), token.id, node_id, 0, 0, StateStatus.COMPLETED, row_hash, row_hash,
                            None, None, 0.0, None, None, now, now)
        receive, arg = self.source_route
        ctx.stack.append((receive, token, arg))

    def _quarantine(self, rc: RowContext, problem: Quarantine, now: float) -> None:
        ctx = self.ctx
        data, row_hash = hash_row(problem.raw)
        ref = None
        if ctx.store_boundary_payloads:
            ctx.store_payload(row_hash, data)
            ref = row_hash
        node_id = self.source_node_id
        ctx.rec.rows(rc.row_id, node_id, rc.index, row_hash, ref, now)
        token = ctx.new_token(rc, problem.raw, data, row_hash, (), now)
        details = {"reason": problem.violation_type, "error": problem.error, "location": problem.location}
        state_id = ctx.new_state_id()
        ctx.rec.node_states(state_id, token.id, node_id, 0, 0, StateStatus.FAILED, row_hash, None, None, None, 0.0,
                            canonical_json(details), None, now, now)
        ctx.rec.validation_errors(ctx.new_error_id(), node_id, row_hash, data.decode() if ref else None, problem.error,
                                  self.source.schema_mode, self.quarantine_destination, now, problem.violation_type,
                                  problem.field, problem.field, problem.expected_type, problem.actual_type, rc.row_id,
                                  problem.location)
        self.stats.quarantined += 1
        if self.quarantine_route is None:
            ctx.finish(token, Outcome.QUARANTINED, now, error_hash=error_hash(problem.violation_type))
            return
        ctx.rec.routing_events(ctx.new_event_id(), state_id, self.edge_ids[("source", "__quarantine__")],
                               ctx.new_group_id(), 0, "divert", stable_hash(details), None, now)
        receive, _ = self.quarantine_route
        ctx.stack.append((receive, token, (Outcome.QUARANTINED, None, error_hash(problem.violation_type))))

    # -- wiring -----------------------------------------------------------------------------------
    def _wire(self) -> None:
        """Build one executor per node and resolve every route once."""
        ctx, config = self.ctx, self.pipeline.config
        gates = {g.name: g for g in config.gates}
        coalesces = {c.name: c for c in config.coalesce}
        for node in self.graph.nodes:
            if node.node_type == "source":
                self.source_node_id = node.node_id
            elif node.node_type == "transform":
                plugin = self.plugins[node.name]
                cls = LatencyExecutor if isinstance(plugin, Latency) else TransformExecutor
                self.executors[node.name] = cls(ctx, node.name, node.node_id, node.step, plugin)
            elif node.node_type == "gate":
                gate = gates[node.name]
                self.executors[node.name] = GateExecutor(ctx, node.name, node.node_id, node.step,
                                                         compile_condition(gate.condition), gate.routes)
            elif node.node_type == "coalesce":
                self.executors[node.name] = CoalesceExecutor(ctx, node.name, node.node_id, node.step,
                                                             coalesces[node.name])
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
                    executor.targets[label] = ("fork", None, -1)
                    continue
                executor.targets[label] = (graph.resolve(destination).kind, self._route(destination, Outcome.ROUTED),
                                           self.edge_ids[(gate.name, label)])
            for branch in gate.fork_to or ():
                joins = graph.fork_targets.get((gate.name, branch))
                duty = None if joins is None else (self.executors[joins[0]], joins[1])
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
