"""Tokens, per-row bookkeeping and the engine context every executor records through.

A :class:`Token` is one instance of a source row on one path. It carries its row, the row's
canonical bytes and hash (computed once per distinct row object) and its *duties*: the stack of
(coalesce, branch) it is expected to deliver, innermost last. A token that ends anywhere but at
its coalesce reports itself lost to that coalesce, which is how branch loss is noticed.

Inside the engine every id is an integer from a per-kind counter; the recorder turns them into
text when it writes (:func:`elspeth_nb.audit.recorder.format_id`), and so does :meth:`EngineContext.text`
for the ids that appear inside JSON contexts.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from elspeth_nb.audit.hashing import canonical_bytes, canonical_json, error_hash
from elspeth_nb.audit.recorder import ID_BASE, Recorder, id_prefix
from elspeth_nb.audit.schema import Outcome
from elspeth_nb.engine.clock import Clock

if TYPE_CHECKING:
    from elspeth_nb.engine.coalesce import CoalesceExecutor

Row = dict[str, Any]
Duty = tuple["CoalesceExecutor", str]
_sha256 = hashlib.sha256


class RowContext:
    """Per source row: live token count and the row's coalesce joins (pending or decided)."""

    __slots__ = ("index", "joins", "live", "row_id")

    def __init__(self, row_id: int, index: int) -> None:
        self.row_id = row_id
        self.index = index
        self.live = 0
        self.joins: dict[str, Any] = {}


class Token:
    __slots__ = ("data", "duties", "hash", "id", "rc", "row")

    def __init__(self, token_id: int, rc: RowContext, row: Row, data: bytes, row_hash: str,
                 duties: tuple[Duty, ...]) -> None:
        self.id = token_id
        self.rc = rc
        self.row = row
        self.data = data
        self.hash = row_hash
        self.duties = duties


def hash_row(row: Any) -> tuple[bytes, str]:
    """Canonical bytes and SHA-256 of a row (raises CanonicalizationError for NaN and friends)."""
    data = canonical_bytes(row)
    return data, _sha256(data).hexdigest()


class Timer:
    __slots__ = ("args", "callback", "cancelled", "due")

    def __init__(self, due: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.due = due
        self.callback = callback
        self.args = args
        self.cancelled = False


class EngineContext:
    """Shared state of one run: recorder, clock, id counters, work stack, timers, open rows."""

    def __init__(self, run_id: str, recorder: Recorder, clock: Clock, payload_mode: str, id_offset: int = 0) -> None:
        self.run_id = run_id
        self.rec = recorder
        self.clock = clock
        self.now = clock.now
        self.payload_mode = payload_mode
        self.store_all_payloads = payload_mode == "all"
        self.store_boundary_payloads = payload_mode in ("all", "boundaries")
        self.stack: list[tuple[Callable[[Token, Any], None], Token, Any]] = []
        self.timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = itertools.count()
        self.open_rows: set[RowContext] = set()
        #: coalesces of the run, so a failing run can record the tokens they hold (see ``abandon``)
        self.coalesces: list[CoalesceExecutor] = []
        #: tokens without a terminal outcome yet, by id: a failing run ends them (see ``abandon``)
        self.live_tokens: dict[int, Token] = {}
        self.outcome_counts: dict[str, int] = {}
        self.new_row_id = itertools.count(id_offset).__next__
        self.new_token_id = itertools.count(id_offset).__next__
        self.new_state_id = itertools.count(id_offset).__next__
        self.new_outcome_id = itertools.count(id_offset).__next__
        self.new_group_id = itertools.count(id_offset).__next__
        self.new_event_id = itertools.count(id_offset).__next__
        self.new_coalesce_event_id = itertools.count(id_offset).__next__
        self.new_edge_id = itertools.count(id_offset).__next__
        self.new_call_id = itertools.count(id_offset).__next__
        self.new_operation_id = itertools.count(id_offset).__next__
        self.new_artifact_id = itertools.count(id_offset).__next__
        self.new_error_id = itertools.count(id_offset).__next__
        self._prefixes = {kind: id_prefix(run_id, kind) for kind in ("token", "group", "coalesce_event", "row")}

    def text(self, kind: str, number: int) -> str:
        """An id as it is written to the store (for ids inside JSON contexts)."""
        return f"{self._prefixes[kind]}{ID_BASE + number}"

    # -- tokens --------------------------------------------------------------------------
    def new_token(self, rc: RowContext, row: Row, data: bytes, row_hash: str, duties: tuple[Duty, ...],
                  at: float, *, fork_group_id: int | None = None, join_group_id: int | None = None,
                  branch_name: str | None = None, step: int | None = None) -> Token:
        token = Token(self.new_token_id(), rc, row, data, row_hash, duties)
        rc.live += 1
        self.live_tokens[token.id] = token
        self.rec.tokens(token.id, rc.row_id, fork_group_id, join_group_id, None, branch_name, step, at)
        return token

    def finish(self, token: Token, outcome: str, at: float, *, sink_name: str | None = None,
               error_hash: str | None = None, context_json: str | None = None, fork_group_id: int | None = None,
               join_group_id: int | None = None, expected_branches_json: str | None = None) -> None:
        """Record the token's one terminal outcome and release it."""
        self.rec.token_outcomes(self.new_outcome_id(), token.id, outcome, 1, at, sink_name, None, fork_group_id,
                                join_group_id, None, error_hash, context_json, expected_branches_json)
        counts = self.outcome_counts
        counts[outcome] = counts.get(outcome, 0) + 1
        del self.live_tokens[token.id]
        rc = token.rc
        rc.live -= 1
        if rc.live == 0:
            self.open_rows.discard(rc)
            rc.joins = {}

    def abandon(self, error: str, reason: str = "run_failed") -> int:
        """End every token still in flight as ``failed`` because the run stopped with ``error``; returns how many.

        Held at a coalesce, waiting on a call or queued: each gets its one terminal outcome, whose context
        says why the run stopped (``reason``: ``run_failed`` or ``run_interrupted``), so a stopped run's trail
        accounts for every token it created. A token held at a coalesce also gets its state there, which
        shows when it arrived and what its join held.
        """
        if not self.live_tokens:
            return 0
        now, context = self.now(), canonical_json({reason: {"error": error}})
        held: dict[int, str] = {}
        for coalesce in self.coalesces:
            held.update(coalesce.abandon_held(error, now, reason))
        grouping = error_hash(reason)
        abandoned = list(self.live_tokens.values())
        for token in abandoned:
            self.finish(token, Outcome.FAILED, now, error_hash=grouping, context_json=held.get(token.id, context))
        return len(abandoned)

    def lose(self, token: Token, reason: dict[str, Any], at: float) -> None:
        """Tell the token's innermost coalesce that this branch will never arrive."""
        if token.duties:
            coalesce, branch = token.duties[-1]
            reason = {**reason, "token_id": self.text("token", token.id)}
            coalesce.branch_lost(token.rc, branch, token.duties[:-1], reason, at)

    @staticmethod
    def loss_context(token: Token, reason: dict[str, Any]) -> str | None:
        """Outcome context for a token that leaves its branch early (None when it had no duty)."""
        if not token.duties:
            return None
        coalesce, branch = token.duties[-1]
        return canonical_bytes({"lost_branch": {"coalesce": coalesce.name, "branch": branch, **reason}}).decode()

    def store_payload(self, row_hash: str, data: bytes) -> None:
        self.rec.payloads(row_hash, data.decode("utf-8"))

    # -- timers ----------------------------------------------------------------------------------
    def call_at(self, due: float, callback: Callable[..., None], *args: Any) -> Timer:
        """Schedule ``callback(*args)`` at engine time ``due``; the returned timer can be cancelled."""
        timer = Timer(due, callback, args)
        heapq.heappush(self.timers, (due, next(self._timer_seq), timer))
        return timer

    def next_due(self) -> float | None:
        """When the earliest live timer is due (cancelled timers are dropped on the way)."""
        timers = self.timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def fire_due_timer(self) -> bool:
        """Run the earliest timer if it is due (one at a time, so its work runs before the next)."""
        due = self.next_due()
        if due is None or due > self.now():
            return False
        timer = heapq.heappop(self.timers)[2]
        timer.callback(*timer.args)
        return True
