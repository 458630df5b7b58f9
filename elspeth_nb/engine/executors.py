"""Executors for transforms, simulated calls, gates and sinks: one node visit each.

Each executor's ``receive(token, arg)`` runs the node for one token, records the node state
(and routing events, errors, outcomes) and pushes the token to the next node. Routes are
resolved once, after every executor exists, so a visit costs a few attribute lookups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

from elspeth_nb.audit.hashing import canonical_bytes, canonical_json, error_hash, stable_hash
from elspeth_nb.audit.schema import Outcome, StateStatus
from elspeth_nb.engine.plugins.sinks import Sink, SinkFailedError, SinkWriteError, shown_path
from elspeth_nb.engine.plugins.transforms import Latency, RowRejected
from elspeth_nb.engine.tokens import EngineContext, Token, hash_row
from elspeth_nb.errors import CanonicalizationError

Route = tuple[Callable[[Token, Any], None], Any]

COMPLETED, FAILED = StateStatus.COMPLETED, StateStatus.FAILED


class NodeExecutor:
    """What every executor knows: its node, the engine context and where tokens go next."""

    def __init__(self, ctx: EngineContext, name: str, node_id: str, step: int) -> None:
        self.ctx = ctx
        self.name = name
        self.node_id = node_id
        self.step = step

    def receive(self, token: Token, arg: Any) -> None:
        raise NotImplementedError


class ErrorRouting:
    """Where a transform sends a row it failed on: a sink, ``discard`` (quarantined) or nowhere (failed)."""

    def __init__(self, destination: str | None, route: Route | None, edge_id: int | None) -> None:
        self.destination = destination
        self.route = route
        self.edge_id = edge_id

    @property
    def label(self) -> str:
        return self.destination or "failed"


class TransformExecutor(NodeExecutor):
    """Runs a synchronous plugin; failures become transform_errors routed by on_error."""

    def __init__(self, ctx: EngineContext, name: str, node_id: str, step: int, plugin: Any) -> None:
        super().__init__(ctx, name, node_id, step)
        self.plugin = plugin
        self.process: Callable[[dict[str, Any]], tuple[dict[str, Any], str]] = getattr(plugin, "process", _waits)
        self.next: Route | None = None
        self.on_error = ErrorRouting(None, None, None)

    def receive(self, token: Token, arg: Any) -> None:
        ctx = self.ctx
        started = ctx.now()
        try:
            out, reason = self.process(token.row)
        except RowRejected as rejected:
            self.fail(token, rejected.details, started)
            return
        except Exception as exc:  # a plugin crash is a row error, never a lost row
            self.fail(token, {"reason": "exception", "type": type(exc).__name__, "exception": str(exc)}, started)
            return
        self.succeed(token, out, reason, started, ctx.now())

    def succeed(self, token: Token, out: dict[str, Any], reason: str | None, started: float, ended: float) -> None:
        ctx = self.ctx
        input_hash = token.hash
        if out is not token.row:
            try:
                data, out_hash = hash_row(out)
            except CanonicalizationError as exc:
                self.fail(token, {"reason": "non_canonical_output", "error": str(exc)}, started)
                return
            if ctx.store_all_payloads:
                ctx.store_payload(out_hash, data)
            token.row, token.data, token.hash = out, data, out_hash
        ctx.rec.node_states(ctx.new_state_id(), token.id, self.node_id, self.step, 0, COMPLETED, input_hash,
                            token.hash, None, None, (ended - started) * 1000.0, None, reason, started, ended)
        receive, arg = self.next  # type: ignore[misc]
        ctx.stack.append((receive, token, arg))

    def fail(self, token: Token, details: dict[str, Any], started: float) -> None:
        """Record the error and route the token by on_error; tell its coalesce the branch is lost."""
        ctx = self.ctx
        ended = ctx.now()
        error_json = canonical_json(details)
        state_id = ctx.new_state_id()
        ctx.rec.node_states(state_id, token.id, self.node_id, self.step, 0, FAILED, token.hash, None, None, None,
                            (ended - started) * 1000.0, error_json, None, started, ended)
        routing = self.on_error
        row_json = token.data.decode() if ctx.store_all_payloads else None  # a row inside the pipeline
        ctx.rec.transform_errors(ctx.new_error_id(), token.id, self.node_id, token.hash, row_json, error_json,
                                 routing.label, ended)
        summary = f"{details.get('reason', 'error')}"
        if routing.route is not None:
            loss = {"reason": "error_routed", "node": self.name, "sink": routing.destination, "detail": summary}
            ctx.rec.routing_events(ctx.new_event_id(), state_id, routing.edge_id, ctx.new_group_id(), 0,  # type: ignore[arg-type]
                                   "divert", stable_hash(details), None, ended)
            ctx.lose(token, loss, ended)
            receive, arg = routing.route
            ctx.stack.append((receive, token, (arg, ctx.loss_context(token, loss), None)))
            return
        if routing.destination == "discard":
            loss = {"reason": "quarantined", "node": self.name, "detail": summary}
            outcome = Outcome.QUARANTINED
        else:
            loss = {"reason": "transform_failed", "node": self.name, "detail": summary}
            outcome = Outcome.FAILED
        context = ctx.loss_context(token, loss)
        ctx.lose(token, loss, ended)
        ctx.finish(token, outcome, ended, error_hash=error_hash(summary), context_json=context)


def _waits(row: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Stand-in ``process`` of a transform that completes on a timer instead (never called)."""
    raise AssertionError("a simulated call completes on its timer")


class LatencyExecutor(TransformExecutor):
    """A simulated external call: the token waits on a timer while other work goes on."""

    def __init__(self, ctx: EngineContext, name: str, node_id: str, step: int, plugin: Latency) -> None:
        super().__init__(ctx, name, node_id, step, plugin)
        self.latency = plugin
        self._reason = canonical_json({"action": "called"})

    def receive(self, token: Token, arg: Any) -> None:
        plan = self.latency.plan(token.rc.index)
        started = self.ctx.now()
        self.ctx.call_at(started + plan.delay_s, self._respond, token, started, plan.fails)

    def _respond(self, token: Token, started: float, fails: bool) -> None:
        ctx = self.ctx
        ended = ctx.now()
        latency_ms = (ended - started) * 1000.0
        state_id = ctx.new_state_id() if not fails else None
        if fails:
            self.fail(token, {"reason": "simulated_call_failed", "latency_ms": latency_ms}, started)
            return
        ctx.rec.calls(ctx.new_call_id(), state_id, None, 0, "simulated", "success", token.hash, None, token.hash,
                      None, None, latency_ms, ended)
        ctx.rec.node_states(state_id, token.id, self.node_id, self.step, 0, COMPLETED, token.hash,  # type: ignore[arg-type]
                            token.hash, None, None, latency_ms, None, self._reason, started, ended)
        receive, arg = self.next  # type: ignore[misc]
        ctx.stack.append((receive, token, arg))


class GateExecutor(NodeExecutor):
    """Evaluates a condition and routes by its label: to a node, a sink, or a fork."""

    def __init__(self, ctx: EngineContext, name: str, node_id: str, step: int, condition: Any,
                 routes: Mapping[str, str]) -> None:
        super().__init__(ctx, name, node_id, step)
        self.condition = condition
        self.evaluate = condition.evaluate
        self.routes = dict(routes)
        self.targets: dict[str, tuple[str, Any, int]] = {}  # label -> (kind, route|fork, edge_id)
        self.fork_branches: list[tuple[str, Route, int, Any]] = []  # branch, route, edge_id, duty
        self._decisions: dict[str, tuple[str, str, str | None]] = {}

    def receive(self, token: Token, arg: Any) -> None:
        ctx = self.ctx
        started = ctx.now()
        try:  # the label too: str() of a 5,000-digit result raises, like any error of the condition
            result = self.evaluate(token.row)
            label = ("true" if result else "false") if isinstance(result, bool) else str(result)
            target = self.targets.get(label)
            decision = self._decision(label) if target is not None else None
        except Exception as exc:
            self._fail(token, {"reason": "condition_error", "type": type(exc).__name__,
                               "exception": str(exc) or repr(exc)}, started)
            return
        if target is None or decision is None:
            self._fail(token, {"reason": "no_route", "label": label, "routes": sorted(self.routes)}, started)
            return
        kind, route, edge_id = target
        context_json, reason_hash, reason_ref = decision
        state_id = ctx.new_state_id()
        ended = ctx.now()
        ctx.rec.node_states(state_id, token.id, self.node_id, self.step, 0, COMPLETED, token.hash, token.hash, None,
                            context_json, (ended - started) * 1000.0, None, None, started, ended)
        if kind == "fork":
            self._fork(token, state_id, reason_hash, reason_ref, ended)
            return
        ctx.rec.routing_events(ctx.new_event_id(), state_id, edge_id, ctx.new_group_id(), 0, "move", reason_hash,
                               reason_ref, ended)
        receive, route_arg = route
        if kind == "sink" and token.duties:
            loss = {"reason": "gate_routed_to_sink", "node": self.name, "sink": self.routes[label]}
            ctx.lose(token, loss, ended)
            route_arg = (route_arg, ctx.loss_context(token, loss), None)
        ctx.stack.append((receive, token, route_arg))

    def _decision(self, label: str) -> tuple[str, str, str | None]:
        """Gate context and routing reason for one route label, computed once and cached."""
        cached = self._decisions.get(label)
        if cached is None:
            ctx = self.ctx
            reason = {"condition": self.condition.text, "result": label}  # as ELSPETH records it: the route label
            data = canonical_bytes(reason)
            reason_hash = stable_hash(reason)
            if ctx.store_boundary_payloads:
                ctx.store_payload(reason_hash, data)
            context = canonical_json({**reason, "route_label": label})
            cached = self._decisions[label] = (context, reason_hash,
                                               reason_hash if ctx.store_boundary_payloads else None)
        return cached

    def _fork(self, token: Token, state_id: int, reason_hash: str, reason_ref: str | None, at: float) -> None:
        ctx = self.ctx
        fork_group_id = ctx.new_group_id()
        routing_group_id = ctx.new_group_id()
        children = []
        inherited = False
        for ordinal, (branch, route, edge_id, duty) in enumerate(self.fork_branches):
            duties = (*token.duties, duty) if duty is not None else ()
            inherited = inherited or duty is not None
            child = ctx.new_token(token.rc, token.row, token.data, token.hash, duties, at, fork_group_id=fork_group_id,
                                  branch_name=branch, step=self.step)
            ctx.rec.token_parents(child.id, token.id, ordinal)
            ctx.rec.routing_events(ctx.new_event_id(), state_id, edge_id, routing_group_id, ordinal, "copy",
                                   reason_hash, reason_ref, at)
            children.append((route, child))
        if token.duties and not inherited:
            ctx.lose(token, {"reason": "forked_without_coalesce", "node": self.name}, at)
        ctx.finish(token, Outcome.FORKED, at, fork_group_id=fork_group_id, expected_branches_json=self._expected)
        for (receive, arg), child in reversed(children):
            ctx.stack.append((receive, child, arg))

    @cached_property
    def _expected(self) -> str:
        return canonical_json([b for b, *_ in self.fork_branches])

    def _fail(self, token: Token, details: dict[str, Any], started: float) -> None:
        ctx = self.ctx
        ended = ctx.now()
        error_json = canonical_json(details)
        ctx.rec.node_states(ctx.new_state_id(), token.id, self.node_id, self.step, 0, FAILED, token.hash, None, None,
                            None, (ended - started) * 1000.0, error_json, None, started, ended)
        loss = {"reason": "gate_failed", "node": self.name, "detail": details["reason"]}
        context = ctx.loss_context(token, loss)
        ctx.lose(token, loss, ended)
        ctx.finish(token, Outcome.FAILED, ended, error_hash=error_hash(details["reason"]), context_json=context)


class SinkExecutor(NodeExecutor):
    """Writes a token's row; records the sink state and the completed/routed/quarantined outcome.

    A row the sink refuses (SinkWriteError) fails that token; anything else the sink raises fails the run.

    ``arg`` is the outcome (``completed`` on the normal path, ``routed`` when a gate or error
    routing sent it), or ``(outcome, context_json, error_hash)`` when the token left a branch early
    or was quarantined (a quarantined outcome carries its error_hash, as ELSPETH requires).
    """

    def __init__(self, ctx: EngineContext, name: str, node_id: str, step: int, sink: Sink) -> None:
        super().__init__(ctx, name, node_id, step)
        self.sink = sink
        self.write = sink.write
        self.first_state_id: int | None = None

    def receive(self, token: Token, arg: Any) -> None:
        ctx = self.ctx
        outcome, context, grouping = arg if type(arg) is tuple else (arg, None, None)
        started = ctx.now()
        state_id = ctx.new_state_id()
        if self.first_state_id is None:
            self.first_state_id = state_id
        try:
            self.write(token.row, token.data)
        except Exception as exc:
            refused = isinstance(exc, SinkWriteError)
            self._fail(token, state_id, started, context, "sink_write_failed" if refused else "sink_failed", exc)
            if not refused:  # the sink itself broke, not this row: the run fails
                raise SinkFailedError(self.name, shown_path(self.sink), "write", exc) from exc
            return
        ended = ctx.now()
        if ctx.store_boundary_payloads and not ctx.store_all_payloads:
            ctx.store_payload(token.hash, token.data)
        ctx.rec.node_states(state_id, token.id, self.node_id, self.step, 0, COMPLETED, token.hash, token.hash, None,
                            None, (ended - started) * 1000.0, None, None, started, ended)
        if token.duties and context is None:
            loss = {"reason": "routed_to_sink", "node": self.name, "sink": self.name}
            context = ctx.loss_context(token, loss)
            ctx.lose(token, loss, ended)
        ctx.finish(token, outcome, ended, sink_name=self.name, error_hash=grouping, context_json=context)

    def _fail(self, token: Token, state_id: int, started: float, context: str | None, reason: str,
              exc: Exception) -> None:
        """Record the token's failed sink state and its failed outcome, with the sink's error."""
        ctx = self.ctx
        ended = ctx.now()
        error_json = canonical_json({"reason": reason, "type": type(exc).__name__, "exception": str(exc)})
        ctx.rec.node_states(state_id, token.id, self.node_id, self.step, 0, FAILED, token.hash, None, None, None,
                            (ended - started) * 1000.0, error_json, None, started, ended)
        if token.duties and context is None:  # a branch token that ends here never reaches its coalesce
            loss = {"reason": reason, "node": self.name, "sink": self.name}
            context = ctx.loss_context(token, loss)
            ctx.lose(token, loss, ended)
        ctx.finish(token, Outcome.FAILED, ended, sink_name=self.name, error_hash=error_hash(reason),
                   context_json=context)
