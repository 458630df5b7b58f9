"""Coalesce: the barrier that turns a source row's branch tokens back into one token.

A coalesce keeps one join per source row. Branch tokens arrive (or are reported lost) and the
policy decides when to merge or fail; a timer enforces ``timeout_seconds`` on the engine clock.
Every decision, merge or failure, is recorded with its full context in three places: the
coalesce-node states (``context_after_json``), the branch tokens' outcomes (``context_json``)
and one typed ``coalesce_events`` row. Tokens that arrive after the decision are recorded as
late arrivals with how late they were.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from elspeth_nb.audit.hashing import (
    canonical_bytes,
    canonical_json,
    canonical_json_prepared,
    error_hash,
    json_number,
    stable_hash,
)
from elspeth_nb.audit.schema import CoalesceEventType, Outcome, StateStatus, Trigger
from elspeth_nb.engine.executors import NodeExecutor, Route
from elspeth_nb.engine.tokens import Duty, EngineContext, RowContext, Timer, Token, _sha256, hash_row

Row = dict[str, Any]


class EngineInvariantError(RuntimeError):
    """The engine reached a state its design rules out (a bug, never bad user input)."""


class Verdict(NamedTuple):
    """A policy's answer: merge or fail, what triggered it, and the failure reason."""

    merge: bool
    trigger: str
    failure_reason: str | None = None


class PendingJoin:
    """A row's join that has not decided yet.

    It opens at its first event, an arrival or a loss (as ELSPETH's pending entry does): its timeout
    runs and its wait is measured from then. ``first_at`` is the first arrival, which offsets count from;
    ``last_at`` the latest event, before which no later event may be placed.
    """

    __slots__ = ("arrivals", "first_at", "last_at", "lost", "opened_at", "outer", "seen", "timer")

    def __init__(self, outer: tuple[Duty, ...], opened_at: float) -> None:
        self.arrivals: list[tuple[str, Token, float]] = []
        self.lost: dict[str, dict[str, Any]] = {}
        self.seen: set[str] = set()
        self.first_at: float | None = None
        self.opened_at = self.last_at = opened_at
        self.outer = outer
        self.timer: Timer | None = None

    def arrived(self) -> list[str]:
        return [branch for branch, _, _ in self.arrivals]


class DecisionFacts:
    """What a decision's three records share, computed once: arrivals, offsets, ids as text."""

    __slots__ = ("arrived", "event_id", "event_text", "now", "offsets", "token_texts", "wait_ms")

    def __init__(self, ctx: EngineContext, entry: PendingJoin, event_id: int, now: float) -> None:
        first = entry.first_at
        self.event_id = event_id
        self.event_text = ctx.text("coalesce_event", event_id)
        self.now = now
        self.arrived = [b for b, _, _ in entry.arrivals]
        self.token_texts = [ctx.text("token", t.id) for _, t, _ in entry.arrivals]
        self.offsets = [(at - first) * 1000.0 for _, _, at in entry.arrivals]  # type: ignore[operator]
        self.wait_ms = (now - entry.opened_at) * 1000.0


class Decision(NamedTuple):
    """A decided join, kept while the row is in flight so late arrivals can refer to it."""

    event_id: int
    decided_at: float
    first_at: float | None
    merged: bool
    trigger: str
    failure_reason: str | None
    join_group_id: int | None
    merged_token_id: int | None


def policy_verdict(policy: str, n: int, quorum: int | None, arrived: int, lost: int, event: str) -> Verdict | None:
    """When ``policy`` decides, given counts after ``event`` (arrival, loss, timeout, end_of_source)."""
    accounted = arrived + lost == n
    if policy == "require_all":
        if event == "arrival":
            return Verdict(True, Trigger.ALL_ARRIVED) if arrived == n else None
        if event == "loss":
            return Verdict(False, Trigger.BRANCH_LOST, "branch_lost")
        return Verdict(False, event, "incomplete_branches")
    if policy == "quorum":
        need = quorum or n
        if event == "arrival":
            return Verdict(True, Trigger.QUORUM_MET) if arrived >= need else None
        if event == "loss":
            return Verdict(False, Trigger.BRANCH_LOST, "quorum_impossible") if n - lost < need else None
        if arrived >= need:
            return Verdict(True, event)
        return Verdict(False, event, "quorum_not_met_at_timeout" if event == Trigger.TIMEOUT else "quorum_not_met")
    if policy == "best_effort":
        if event in ("arrival", "loss"):
            if not accounted:
                return None
            if arrived:
                trigger = Trigger.BRANCH_LOST if event == "loss" else (
                    Trigger.ALL_ARRIVED if lost == 0 else Trigger.ALL_ACCOUNTED)
                return Verdict(True, trigger)
            return Verdict(False, Trigger.BRANCH_LOST, "all_branches_lost")
        if arrived:
            return Verdict(True, event)
        return Verdict(False, event,
                       "best_effort_timeout_no_arrivals" if event == Trigger.TIMEOUT else "all_branches_lost")
    if policy == "first":
        if event == "arrival":
            return Verdict(True, Trigger.FIRST_ARRIVAL)
        if event == "loss":
            return Verdict(False, Trigger.BRANCH_LOST, "all_branches_lost") if lost == n else None
        return Verdict(True, event) if arrived else Verdict(False, event, "all_branches_lost")
    raise EngineInvariantError(f"unknown coalesce policy {policy!r}")


_SCALARS = (str, int, bool, type(None))


def _differ_as_json(a: Any, b: Any) -> bool:
    """Whether two values differ as canonical JSON (1 and 1.0 do not; [1] and [true] do)."""
    if type(a) is type(b) and type(a) in _SCALARS:
        return bool(a != b)
    return canonical_bytes(a) != canonical_bytes(b)


def merge_union(order: list[str], rows: dict[str, Row]) -> tuple[Row, dict[str, dict[str, Any]]]:
    """Overlay branch rows in configured order (the last configured branch wins a field).

    Also returns the collisions whose values differ: field -> {branches (config order), winner}.
    """
    out: Row = {}
    differing: set[str] = set()
    for branch in order:
        row = rows.get(branch)
        if row is None:
            continue
        if out:
            for field in out.keys() & row.keys():
                if _differ_as_json(out[field], row[field]):
                    differing.add(field)
        out.update(row)
    collisions = {}
    for field in sorted(differing):
        suppliers = [b for b in order if b in rows and field in rows[b]]
        collisions[field] = {"branches": suppliers, "winner": suppliers[-1]}
    return out, collisions


class CoalesceExecutor(NodeExecutor):
    """One coalesce node: joins per source row, policy decisions, merge strategies, recording."""

    def __init__(self, ctx: EngineContext, name: str, node_id: str, step: int, config: Any) -> None:
        super().__init__(ctx, name, node_id, step)
        self.branches: list[str] = list(config.branch_inputs)
        self.n = len(self.branches)
        self.policy: str = config.policy
        self.strategy: str = config.merge
        self.quorum: int | None = config.quorum_count
        self.timeout: float | None = config.timeout_seconds
        self.select_branch: str | None = config.select_branch
        self.next: Route | None = None
        self._settings: dict[str, Any] = {"policy": self.policy, "merge_strategy": self.strategy}
        for key, value in (("quorum_count", self.quorum), ("timeout_seconds", self.timeout),
                           ("select_branch", self.select_branch)):
            if value is not None:
                self._settings[key] = json_number(value) if isinstance(value, float) else value
        self.merges = self.failures = self.late_arrivals = 0
        ctx.coalesces.append(self)

    # -- events ----------------------------------------------------------------------------
    def receive(self, token: Token, branch: str) -> None:
        """A branch token arrives."""
        self._arrive(token, branch, self.ctx.now())

    def receive_at(self, token: Token, arrival: tuple[str, float]) -> None:
        """A merged token handed straight from an inner coalesce that decided at a deadline the engine had passed:
        it arrives at that deadline, unless this join has recorded a later event (or decided) since."""
        branch, at = arrival
        entry = token.rc.joins.get(self.name)
        if isinstance(entry, PendingJoin):
            at = max(at, entry.last_at)
        elif isinstance(entry, Decision):
            at = max(at, entry.decided_at)  # late by what the deadlines say, not by how late the engine woke
        self._arrive(token, branch, at)

    def _arrive(self, token: Token, branch: str, now: float) -> None:
        rc = token.rc
        entry = self._after_overdue_timeout(rc, now)
        if isinstance(entry, Decision):
            self._late(token, branch, entry, now)
            return
        if entry is None:
            entry = self._open(rc, token.duties[:-1], now)
        if branch in entry.seen:
            raise EngineInvariantError(f"coalesce {self.name}: branch {branch} of row {rc.row_id} arrived twice")
        entry.seen.add(branch)
        if entry.first_at is None:
            entry.first_at = now
        entry.last_at = now
        entry.arrivals.append((branch, token, now))
        verdict = policy_verdict(self.policy, self.n, self.quorum, len(entry.arrivals), len(entry.lost), "arrival")
        if verdict is not None:
            self._decide(rc, entry, verdict, now)

    def branch_lost(self, rc: RowContext, branch: str, outer: tuple[Duty, ...], reason: dict[str, Any],
                    now: float) -> None:
        """A branch token of ``rc`` ended elsewhere: it will never arrive.

        ``now`` may be a passed deadline (an inner coalesce that failed then); it is never placed before an
        event this join has recorded since.
        """
        pending = rc.joins.get(self.name)
        if isinstance(pending, PendingJoin):
            now = max(now, pending.last_at)
        entry = self._after_overdue_timeout(rc, now)
        if isinstance(entry, Decision):
            return
        if entry is None:
            entry = self._open(rc, outer, now)
        entry.seen.add(branch)
        entry.last_at = max(entry.last_at, now)
        entry.lost[branch] = reason
        verdict = policy_verdict(self.policy, self.n, self.quorum, len(entry.arrivals), len(entry.lost), "loss")
        if verdict is not None:
            self._decide(rc, entry, verdict, now)

    def _open(self, rc: RowContext, outer: tuple[Duty, ...], now: float) -> PendingJoin:
        """The row's join, opened by its first arrival or loss; its timeout (not ``first``'s) runs from now."""
        entry = rc.joins[self.name] = PendingJoin(outer, now)
        if self.timeout is not None and self.policy != "first":
            entry.timer = self.ctx.call_at(now + self.timeout, self._on_timeout, rc, entry)
        return entry

    def _after_overdue_timeout(self, rc: RowContext, now: float) -> PendingJoin | Decision | None:
        """The row's join, once a timeout already due by ``now`` has been decided (a busy engine fires timers late).

        Otherwise an arrival processed after the deadline would count as in time, and the trail would show a
        merge that waited longer than its own timeout.
        """
        entry = rc.joins.get(self.name)
        if isinstance(entry, PendingJoin) and entry.timer is not None and not entry.timer.cancelled \
                and entry.timer.due <= now:
            self._on_timeout(rc, entry)
            entry = rc.joins.get(self.name)
        return entry

    def _on_timeout(self, rc: RowContext, entry: PendingJoin) -> None:
        """Decide at the deadline itself: a timer fired late still records the time the timeout was due."""
        if rc.joins.get(self.name) is not entry:
            return
        verdict = policy_verdict(self.policy, self.n, self.quorum, len(entry.arrivals), len(entry.lost),
                                 Trigger.TIMEOUT)
        due = entry.timer.due if entry.timer is not None else self.ctx.now()
        self._decide(rc, entry, verdict, due)  # type: ignore[arg-type]

    def flush(self, rc: RowContext) -> None:
        """End of source with this row's join still pending: decide with what there is."""
        entry = rc.joins.get(self.name)
        if not isinstance(entry, PendingJoin):
            return
        verdict = policy_verdict(self.policy, self.n, self.quorum, len(entry.arrivals), len(entry.lost),
                                 Trigger.END_OF_SOURCE)
        self._decide(rc, entry, verdict, self.ctx.now())  # type: ignore[arg-type]

    def abandon_held(self, error: str, now: float, reason: str = "run_failed") -> dict[int, str]:
        """The run stopped while rows' branches waited here: record each held token's state; token id -> context.

        The state runs from the token's arrival to now and fails with ``reason`` (``run_failed``, or
        ``run_interrupted``); its context (also the token's outcome context) says what the join held:
        branches arrived and when, branches lost, wait so far.
        """
        ctx, contexts = self.ctx, {}
        for rc in list(ctx.open_rows):
            entry = rc.joins.get(self.name)
            if not isinstance(entry, PendingJoin) or not entry.arrivals:
                continue
            if entry.timer is not None:
                entry.timer.cancelled = True
            first, waited_ms = entry.first_at, (now - entry.opened_at) * 1000.0
            held = {"coalesce": self.name, **self._settings, "expected_branches": self.branches,
                    "branches_arrived": entry.arrived(),
                    "arrival_order": [{"branch": b, "token_id": ctx.text("token", t.id),
                                       "arrival_offset_ms": (at - first) * 1000.0}  # type: ignore[operator]
                                      for b, t, at in entry.arrivals],
                    "branches_lost": entry.lost, "waited_ms": waited_ms}
            context_json = canonical_json({reason: {"error": error}, "held_at_coalesce": held})
            error_json = canonical_json({"failure_reason": reason, "error": error, "coalesce": self.name,
                                         "waited_ms": waited_ms})
            for _, token, arrived_at in entry.arrivals:
                ctx.rec.node_states(ctx.new_state_id(), token.id, self.node_id, self.step, 0, StateStatus.FAILED,
                                    token.hash, None, None, context_json, (now - arrived_at) * 1000.0, error_json,
                                    None, arrived_at, now)
                contexts[token.id] = context_json
        return contexts

    # -- decisions --------------------------------------------------------------------------
    def _decide(self, rc: RowContext, entry: PendingJoin, verdict: Verdict, now: float) -> None:
        facts = DecisionFacts(self.ctx, entry, self.ctx.new_coalesce_event_id(), now)
        if verdict.merge and self.strategy == "select" and self.select_branch not in facts.arrived:
            verdict = Verdict(False, verdict.trigger, "select_branch_not_arrived")
        if entry.timer is not None:
            entry.timer.cancelled = True
        merge_or_fail = self._merge if verdict.merge else self._fail
        rc.joins[self.name] = merge_or_fail(rc, entry, verdict, facts)

    def _context(self, entry: PendingJoin, verdict: Verdict, facts: DecisionFacts) -> dict[str, Any]:
        """The decision's context, ready for :func:`canonical_json_prepared` (floats in JSON form)."""
        context: dict[str, Any] = {
            "coalesce": self.name,
            "event_id": facts.event_text,
            "outcome": CoalesceEventType.MERGED if verdict.merge else CoalesceEventType.FAILED,
            "trigger": verdict.trigger,
            **self._settings,
            "expected_branches": self.branches,
            "branches_arrived": facts.arrived,
            "arrival_order": [
                {"branch": b, "token_id": t, "arrival_offset_ms": json_number(o)}
                for b, t, o in zip(facts.arrived, facts.token_texts, facts.offsets, strict=True)
            ],
            "branches_lost": entry.lost,
            "wait_duration_ms": None if facts.wait_ms is None else json_number(facts.wait_ms),
        }
        if verdict.failure_reason is not None:
            context["failure_reason"] = verdict.failure_reason
        return context

    def _merge(self, rc: RowContext, entry: PendingJoin, verdict: Verdict, facts: DecisionFacts) -> Decision:
        ctx, now = self.ctx, facts.now
        rows = {b: t.row for b, t, _ in entry.arrivals}
        collisions: dict[str, dict[str, Any]] = {}
        if self.strategy == "union":
            merged, collisions = merge_union(self.branches, rows)
        elif self.strategy == "nested":
            merged = {b: rows[b] for b in self.branches if b in rows}
        else:
            merged = rows[self.select_branch]  # type: ignore[index]
        data, merged_hash = hash_row(merged)
        join_group_id = ctx.new_group_id()
        token = ctx.new_token(rc, merged, data, merged_hash, entry.outer, now, join_group_id=join_group_id,
                              step=self.step)
        merged_text = ctx.text("token", token.id)
        context = self._context(entry, verdict, facts)
        context.update(merged_token_id=merged_text, join_group_id=ctx.text("group", join_group_id),
                       merged_row_hash=merged_hash)
        if collisions:
            context["union_field_collisions"] = collisions
        if all(map(str.isascii, collisions)):
            context_json = canonical_json_prepared(context)
        else:  # non-ASCII field names need RFC 8785's UTF-16 key order
            context_json = canonical_json(context)
        rec = ctx.rec
        merged_into = _sha256(b'{"merged_into":"' + merged_text.encode() + b'"}').hexdigest()
        node_id, step = self.node_id, self.step
        for ordinal, (_, branch_token, arrived_at) in enumerate(entry.arrivals):
            rec.token_parents(token.id, branch_token.id, ordinal)
            rec.node_states(ctx.new_state_id(), branch_token.id, node_id, step, 0, StateStatus.COMPLETED,
                            branch_token.hash, merged_into, None, context_json, (now - arrived_at) * 1000.0, None, None,
                            arrived_at, now)
            ctx.finish(branch_token, Outcome.COALESCED, now, join_group_id=join_group_id, context_json=context_json)
        inputs_hash = stable_hash({b: t.hash for b, t, _ in entry.arrivals})
        rec.node_states(ctx.new_state_id(), token.id, node_id, step, 0, StateStatus.COMPLETED, inputs_hash, merged_hash,
                        None, context_json, facts.wait_ms, None, None, entry.opened_at, now)
        if ctx.store_boundary_payloads:
            ctx.store_payload(merged_hash, data)
        self._record_event(rc, entry, verdict, facts, context_json, join_group_id, token.id, merged_hash,
                           sorted(collisions))
        self.merges += 1
        receive, arg = self.next  # type: ignore[misc]
        outer = getattr(receive, "__self__", None)
        if isinstance(outer, CoalesceExecutor) and now < ctx.now():  # decided at a deadline the engine passed
            ctx.stack.append((outer.receive_at, token, (arg, now)))
        else:
            ctx.stack.append((receive, token, arg))
        return Decision(facts.event_id, now, entry.first_at, True, verdict.trigger, None, join_group_id, token.id)

    def _fail(self, rc: RowContext, entry: PendingJoin, verdict: Verdict, facts: DecisionFacts) -> Decision:
        ctx, now = self.ctx, facts.now
        context_json = canonical_json_prepared(self._context(entry, verdict, facts))
        reason = verdict.failure_reason or "failed"
        error_json = canonical_json({"failure_reason": reason, "policy": self.policy, "merge_strategy": self.strategy,
                                     "expected_branches": self.branches, "branches_arrived": facts.arrived,
                                     "branches_lost": sorted(entry.lost), "event_id": facts.event_text})
        grouping = error_hash(self._elspeth_reason(reason, entry))
        for _, token, arrived_at in entry.arrivals:
            ctx.rec.node_states(ctx.new_state_id(), token.id, self.node_id, self.step, 0, StateStatus.FAILED,
                                token.hash, None, None, context_json, (now - arrived_at) * 1000.0, error_json, None,
                                arrived_at, now)
            ctx.finish(token, Outcome.FAILED, now, error_hash=grouping, context_json=context_json)
        self._record_event(rc, entry, verdict, facts, context_json, None, None, None, [])
        self.failures += 1
        if entry.outer:
            outer_coalesce, outer_branch = entry.outer[-1]
            outer_coalesce.branch_lost(rc, outer_branch, entry.outer[:-1],
                                       {"reason": "coalesce_failed", "node": self.name, "detail": reason,
                                        "event_id": facts.event_text}, now)
        return Decision(facts.event_id, now, entry.first_at, False, verdict.trigger, reason, None, None)

    def _elspeth_reason(self, reason: str, entry: PendingJoin) -> str:
        """ELSPETH's failure string, so error_hash groups the same way in both systems."""
        if reason == "branch_lost":
            return "branch_lost:" + ",".join(sorted(entry.lost))
        if reason == "quorum_impossible":
            return f"quorum_impossible:need={self.quorum},max_possible={self.n - len(entry.lost)}"
        return reason

    def _record_event(self, rc: RowContext, entry: PendingJoin, verdict: Verdict, facts: DecisionFacts,
                      context_json: str, join_group_id: int | None, merged_token_id: int | None,
                      merged_hash: str | None, collisions: list[str]) -> None:
        self.ctx.rec.coalesce_events(
            facts.event_id, self.node_id, self.name, rc.row_id,
            CoalesceEventType.MERGED if verdict.merge else CoalesceEventType.FAILED, verdict.trigger,
            verdict.failure_reason, self.policy, self.strategy, self.quorum, self.timeout, self.select_branch,
            self.branches, facts.arrived, facts.token_texts, facts.offsets, list(entry.lost),
            [r["reason"] for r in entry.lost.values()], self.n, len(facts.arrived), len(entry.lost), entry.first_at,
            facts.now, facts.wait_ms, join_group_id, merged_token_id, merged_hash, collisions, None, None, None, None,
            context_json,
        )

    def _late(self, token: Token, branch: str, decision: Decision, now: float) -> None:
        """A branch token reaches the coalesce after its row's decision: a late arrival."""
        ctx = self.ctx
        late_by_ms = (now - decision.decided_at) * 1000.0
        event_id = ctx.new_coalesce_event_id()
        text = ctx.text
        decision_id = text("coalesce_event", decision.event_id)
        context = {
            "coalesce": self.name, "event_id": text("coalesce_event", event_id),
            "outcome": CoalesceEventType.LATE_ARRIVAL, "trigger": Trigger.LATE_ARRIVAL, **self._settings,
            "branch": branch, "token_id": text("token", token.id), "late_by_ms": json_number(late_by_ms),
            "decision": {
                "event_id": decision_id, "merged": decision.merged, "trigger": decision.trigger,
                "failure_reason": decision.failure_reason,
                "join_group_id": None if decision.join_group_id is None else text("group", decision.join_group_id),
                "merged_token_id": None if decision.merged_token_id is None else text("token",
                                                                                      decision.merged_token_id),
            },
        }
        context_json = canonical_json_prepared(context)
        if decision.merged:
            ctx.rec.node_states(ctx.new_state_id(), token.id, self.node_id, self.step, 0, StateStatus.COMPLETED,
                                token.hash, stable_hash({"late_arrival_after": decision_id}), None, context_json,
                                0.0, None, None, now, now)
            ctx.finish(token, Outcome.LATE_ARRIVAL, now, join_group_id=decision.join_group_id,
                       context_json=context_json)
        else:
            error_json = canonical_json({"failure_reason": "arrived_after_failure",
                                         "decision_failure_reason": decision.failure_reason, "event_id": decision_id})
            ctx.rec.node_states(ctx.new_state_id(), token.id, self.node_id, self.step, 0, StateStatus.FAILED,
                                token.hash, None, None, context_json, 0.0, error_json, None, now, now)
            ctx.finish(token, Outcome.LATE_ARRIVAL, now, error_hash=error_hash("late_arrival_after_failure"),
                       context_json=context_json)  # late, not a failure of its own (the decision failed)
        ctx.rec.coalesce_events(
            event_id, self.node_id, self.name, token.rc.row_id, CoalesceEventType.LATE_ARRIVAL, Trigger.LATE_ARRIVAL,
            decision.failure_reason, self.policy, self.strategy, self.quorum, self.timeout, self.select_branch,
            self.branches, [branch], [text("token", token.id)],
            [None if decision.first_at is None else (now - decision.first_at) * 1000.0], [], [], self.n, 1, 0,
            now, decision.decided_at,
            None, decision.join_group_id, decision.merged_token_id, None, None, decision.event_id, branch, token.id,
            late_by_ms, context_json,
        )
        self.late_arrivals += 1
