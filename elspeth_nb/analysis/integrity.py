"""Integrity: the invariants of a sound trail (``check``).

Each invariant is one SQL query returning ``table, record_id, detail`` per violation; ``check``
runs them all for one run. Hash verification is in :mod:`elspeth_nb.analysis.verify`.

A run still being written lands its tables at different moments (each table's segment is
written when it fills up or the flush interval passes), so a record can be visible while the
records it points at are not yet. For such a run ``check`` applies in full only the invariants
that one visible record can break, limits the others to that part, and skips the rest; the
result says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from elspeth_nb.analysis.results import Displayable, html_block, html_table, text_table, verdict_html
from elspeth_nb.audit.schema import TABLES, RunStatus

if TYPE_CHECKING:
    from elspeth_nb.analysis.audit import Audit

#: How much of an invariant is checked: all of it, the part that holds at any instant of a run still being
#: written, none of it until the run is finished, or none at all (the producer records differently).
FULL, LIMITED, SKIPPED, NOT_APPLICABLE = "full", "limited", "skipped", "not applicable"


@dataclass(frozen=True)
class Invariant:
    """One invariant: what it promises, the SQL finding its violations, and what of it holds while a run is written.

    ``while_running`` is FULL (no record can wait for another), LIMITED (the SQL keeps, when ``$live``
    is true, only violations that records written so far cannot outgrow) or SKIPPED; ``note`` says
    what a limited or skipped invariant leaves out while the run is written, and why.
    """

    description: str
    sql: str
    while_running: str = FULL
    note: str = ""


#: Tables whose records a run counts exactly as they are stored (not runs revisions, deduplicated payloads or
#: digests written after the counts), and the query of how many the store holds for run ``$run``.
_COUNTED_TABLES = [t for t in TABLES if t not in ("runs", "payloads", "segment_digests")]
_COUNTED = ", ".join(f"'{t}'" for t in _COUNTED_TABLES)
_HELD_COUNTS = " UNION ALL ".join(
    f"SELECT '{t}' AS tbl, count(*) AS n FROM {t} WHERE run_id = $run"  # noqa: S608 - schema table names only
    for t in _COUNTED_TABLES)

#: name -> the invariant; SQL selecting ``table, record_id, detail`` of each violation of run ``$run``
INVARIANTS: dict[str, Invariant] = {
    "one_terminal_outcome": Invariant(
        "every token has at most one terminal outcome",
        """SELECT 'token_outcomes' AS "table", token_id AS record_id,
                  count(*) || ' terminal outcomes: ' || string_agg(outcome, ', ' ORDER BY recorded_at) AS detail
           FROM token_outcomes WHERE run_id = $run AND is_terminal = 1 GROUP BY token_id HAVING count(*) > 1""",
    ),
    "token_has_outcome": Invariant(
        "every token of a finished run has a terminal outcome",
        """SELECT 'tokens' AS "table", t.token_id AS record_id,
                   'no terminal outcome (branch ' || coalesce(t.branch_name, '-') || ')' AS detail
            FROM tokens t
            WHERE t.run_id = $run
              AND NOT EXISTS (SELECT 1 FROM token_outcomes o
                              WHERE o.run_id = $run AND o.token_id = t.token_id AND o.is_terminal = 1)""",
        SKIPPED, "tokens in flight have no outcome yet",
    ),
    "parent_links_iff_group": Invariant(
        "a token has parent links exactly when it has a fork, join or expand group",
        """SELECT 'tokens' AS "table", t.token_id AS record_id,
                  CASE WHEN p.n IS NULL THEN 'has a fork/join/expand group but no parent links'
                       ELSE 'has ' || p.n || ' parent link(s) but no fork/join/expand group' END AS detail
           FROM tokens t LEFT JOIN (SELECT token_id, count(*) AS n FROM token_parents WHERE run_id = $run
                                    GROUP BY token_id) p ON p.token_id = t.token_id
           WHERE t.run_id = $run
             AND (p.n IS NOT NULL) <> (coalesce(t.fork_group_id, t.join_group_id, t.expand_group_id) IS NOT NULL)
             AND (NOT $live OR p.n IS NOT NULL)""",
        LIMITED, "only tokens with parent links but no group: a token's links may land after the token",
    ),
    "parent_exists": Invariant(
        "every parent link points at a token of the same run",
        """SELECT 'token_parents' AS "table", p.token_id AS record_id,
                  'parent ' || p.parent_token_id || ' (ordinal ' || p.ordinal || ') is not a token of the run'
                  AS detail
           FROM token_parents p WHERE p.run_id = $run AND NOT EXISTS (
               SELECT 1 FROM tokens t WHERE t.run_id = $run AND t.token_id = p.parent_token_id)""",
        SKIPPED, "a parent's token record may land after the links to it",
    ),
    "fork_child_accounted": Invariant(
        "every fork child reaches a coalesce decision (arrival, late arrival or lost branch), a sink, "
        "or a terminal failure",
        """WITH named AS (
                SELECT unnest(arrived_token_ids) AS token_id FROM coalesce_events WHERE run_id = $run
                UNION SELECT late_token_id FROM coalesce_events WHERE run_id = $run AND late_token_id IS NOT NULL)
            SELECT 'tokens' AS "table", t.token_id AS record_id,
                   'fork child of branch ' || coalesce(t.branch_name, '-') || ' ended ' ||
                   coalesce(o.outcome, 'without an outcome') ||
                   CASE WHEN o.outcome IN ('coalesced', 'late_arrival') THEN ' but no coalesce event names it'
                        ELSE ' without a sink' END AS detail
            FROM tokens t
            LEFT JOIN token_outcomes o ON o.run_id = $run AND o.token_id = t.token_id AND o.is_terminal = 1
            WHERE t.run_id = $run AND t.fork_group_id IS NOT NULL
              AND (NOT $live OR o.outcome NOT IN ('coalesced', 'late_arrival'))
              AND NOT (coalesce(o.outcome IN ('coalesced', 'late_arrival')
                                AND t.token_id IN (SELECT token_id FROM named), false)
                       OR o.sink_name IS NOT NULL
                       OR coalesce(o.outcome IN ('failed', 'quarantined', 'forked', 'diverted', 'expanded',
                                                 'consumed_in_batch'), false))""",
        LIMITED, "only fork children whose terminal outcome is written and is neither coalesced nor a late arrival: "
                 "the coalesce event naming a child, and a child's outcome, may land later",
    ),
    "coalesce_tokens_consistent": Invariant(
        "coalesce decisions name real tokens: arrivals with a state at the coalesce node, arrival order as in "
        "the context, the merged token's parents in arrival order and its join group",
        """WITH e AS (SELECT * FROM coalesce_events WHERE run_id = $run),
            arrived AS (SELECT event_id, node_id, unnest(arrived_token_ids) AS token_id
                        FROM e WHERE event_type <> 'late_arrival'
                        UNION ALL
                        SELECT event_id, node_id, late_token_id FROM e WHERE event_type = 'late_arrival'),
            parents AS (SELECT token_id, list(parent_token_id ORDER BY ordinal) AS parents FROM token_parents
                        WHERE run_id = $run GROUP BY token_id)
            SELECT 'coalesce_events' AS "table", a.event_id AS record_id,
                   'token ' || coalesce(a.token_id, 'NULL') || CASE
                       WHEN NOT EXISTS (SELECT 1 FROM tokens t WHERE t.run_id = $run AND t.token_id = a.token_id)
                           THEN ' is not a token of the run'
                       ELSE ' has no state at the coalesce node' END AS detail
            FROM arrived a WHERE NOT $live AND NOT EXISTS (
                SELECT 1 FROM node_states s WHERE s.run_id = $run AND s.token_id = a.token_id AND s.node_id = a.node_id)
            UNION ALL
            SELECT 'coalesce_events', e.event_id, 'arrival_order in context_json differs from arrived_token_ids'
            FROM e WHERE e.event_type <> 'late_arrival'
              AND coalesce(json_extract_string(e.context_json, '$.arrival_order[*].token_id'), [])
                  IS DISTINCT FROM coalesce(e.arrived_token_ids, [])
            UNION ALL
            SELECT 'coalesce_events', e.event_id,
                   CASE WHEN t.token_id IS NULL THEN 'merged token ' || coalesce(e.merged_token_id, 'NULL') ||
                                                     ' is not a token of the run'
                        WHEN t.join_group_id IS DISTINCT FROM e.join_group_id
                            THEN 'merged token ' || e.merged_token_id || ' has join group ' ||
                                 coalesce(t.join_group_id, 'NULL') || ', the decision says ' ||
                                 coalesce(e.join_group_id, 'NULL')
                        ELSE 'merged token ' || e.merged_token_id || ' has parents ' ||
                             coalesce(p.parents::VARCHAR, '[]') || ', arrival order is ' ||
                             e.arrived_token_ids::VARCHAR END
            FROM e LEFT JOIN tokens t ON t.run_id = $run AND t.token_id = e.merged_token_id
            LEFT JOIN parents p ON p.token_id = e.merged_token_id
            WHERE e.event_type = 'merged'
              AND ((NOT $live AND (t.token_id IS NULL OR p.parents IS DISTINCT FROM e.arrived_token_ids))
                   OR (t.token_id IS NOT NULL AND t.join_group_id IS DISTINCT FROM e.join_group_id))""",
        LIMITED, "only each decision's own arrival order and, once the merged token is written, its join group: "
                 "arrived tokens, their states and the merged token's parents may land after the decision",
    ),
    "coalesce_state_context": Invariant(
        "the coalesce-node state of every token a decision names carries the decision's exact context, and the "
        "merged token has its own coalesce state whose output_hash is the merged row hash (elspeth-nb runs)",
        """WITH e AS (SELECT * FROM coalesce_events WHERE run_id = $run),
            named AS (SELECT event_id, node_id, context_json, unnest(arrived_token_ids) AS token_id, false AS merged
                      FROM e WHERE event_type <> 'late_arrival'
                      UNION ALL
                      SELECT event_id, node_id, context_json, late_token_id, false FROM e
                      WHERE event_type = 'late_arrival'
                      UNION ALL
                      SELECT event_id, node_id, context_json, merged_token_id, true FROM e WHERE event_type = 'merged')
            SELECT 'coalesce_events' AS "table", n.event_id AS record_id,
                   CASE WHEN n.merged THEN 'merged token ' ELSE 'token ' END || coalesce(n.token_id, 'NULL') ||
                   ' has no coalesce state with the decision''s context' ||
                   CASE WHEN n.merged THEN ' and the merged row hash' ELSE '' END AS detail
            FROM named n JOIN e ON e.event_id = n.event_id
            WHERE NOT EXISTS (
                SELECT 1 FROM node_states s WHERE s.run_id = $run AND s.token_id = n.token_id
                  AND s.node_id = n.node_id AND s.context_after_json = n.context_json
                  AND (NOT n.merged OR s.output_hash IS NOT DISTINCT FROM e.merged_row_hash))""",
        SKIPPED, "coalesce states may land after the decision naming them",
    ),
    "no_open_states": Invariant(
        "a finished run has no open or pending node states",
        """SELECT 'node_states' AS "table", state_id AS record_id,
                   'state is ' || status || CASE WHEN completed_at IS NULL THEN ' with no completed_at' ELSE '' END
                   AS detail
            FROM node_states WHERE run_id = $run AND (status IN ('open', 'pending') OR completed_at IS NULL)""",
        SKIPPED, "states of tokens in flight are still open",
    ),
    "coalesced_has_join_group": Invariant(
        "every coalesced outcome carries its join_group_id",
        """SELECT 'token_outcomes' AS "table", outcome_id AS record_id,
                  'coalesced outcome of token ' || token_id || ' has no join_group_id' AS detail
           FROM token_outcomes WHERE run_id = $run AND outcome = 'coalesced' AND join_group_id IS NULL""",
    ),
    "outcome_required_fields": Invariant(
        "each outcome carries what ELSPETH's own rules require of it: completed and routed a sink_name, forked a "
        "fork_group_id, failed and quarantined an error_hash",
        """SELECT 'token_outcomes' AS "table", outcome_id AS record_id,
                  outcome || ' outcome of token ' || token_id || ' has no ' ||
                  CASE WHEN outcome IN ('completed', 'routed') THEN 'sink_name'
                       WHEN outcome = 'forked' THEN 'fork_group_id' ELSE 'error_hash' END AS detail
           FROM token_outcomes WHERE run_id = $run AND (
               (outcome IN ('completed', 'routed') AND sink_name IS NULL)
               OR (outcome = 'forked' AND fork_group_id IS NULL)
               OR (outcome IN ('failed', 'quarantined') AND error_hash IS NULL))""",
    ),
    "one_group_per_token": Invariant(
        "a token belongs to at most one of a fork, a join and an expansion group",
        """SELECT 'tokens' AS "table", token_id AS record_id,
                  'token has ' || concat_ws(' and ', CASE WHEN fork_group_id IS NOT NULL THEN 'a fork_group_id' END,
                                            CASE WHEN join_group_id IS NOT NULL THEN 'a join_group_id' END,
                                            CASE WHEN expand_group_id IS NOT NULL THEN 'an expand_group_id' END)
                  AS detail
           FROM tokens WHERE run_id = $run AND (fork_group_id IS NOT NULL)::INT + (join_group_id IS NOT NULL)::INT
                                               + (expand_group_id IS NOT NULL)::INT > 1""",
    ),
    "sink_output_hash": Invariant(
        "every row a sink wrote has a completed sink state with its output_hash",
        """SELECT 'node_states' AS "table", s.state_id AS record_id,
                  'completed sink state of token ' || s.token_id || ' has no output_hash' AS detail
           FROM node_states s JOIN nodes n ON n.node_id = s.node_id AND n.run_id = s.run_id
           WHERE s.run_id = $run AND n.node_type = 'sink' AND s.status = 'completed' AND s.output_hash IS NULL
           UNION ALL
           SELECT 'token_outcomes', o.outcome_id,
                  'token ' || o.token_id || ' ended ' || o.outcome || ' at sink ' || o.sink_name ||
                  ' without a completed state there'
           FROM token_outcomes o
           WHERE NOT $live AND o.run_id = $run AND o.is_terminal = 1 AND o.sink_name IS NOT NULL
             AND o.outcome IN ('completed', 'routed') AND NOT EXISTS (
                 SELECT 1 FROM node_states s JOIN nodes n ON n.node_id = s.node_id AND n.run_id = s.run_id
                 WHERE s.run_id = $run AND s.token_id = o.token_id AND n.node_type = 'sink'
                   AND n.node_name = o.sink_name AND s.status = 'completed')""",
        LIMITED, "only completed sink states without an output_hash: the sink state of an outcome may land later",
    ),
    "record_counts_match": Invariant(
        "a finished run holds, table by table, as many records as its runs row says it wrote (a lost or added "
        "segment shows here; runs, payloads and segment_digests are counted differently and left out)",
        f"""WITH declared AS (
                SELECT k AS tbl, CAST(json_extract(counts_json, '$.records."' || k || '"') AS BIGINT) AS n
                FROM runs, unnest(json_keys(counts_json, '$.records')) AS u(k)
                WHERE run_id = $run AND json_exists(counts_json, '$.records')),
            held AS ({_HELD_COUNTS})
            SELECT d.tbl AS "table", $run AS record_id,
                   d.tbl || ': the run recorded ' || d.n || ' record(s), the store holds ' || coalesce(h.n, 0)
                   AS detail
            FROM declared d LEFT JOIN held h USING (tbl)
            WHERE d.tbl IN ({_COUNTED}) AND d.n IS DISTINCT FROM coalesce(h.n, 0)""",  # noqa: S608 - table names
        SKIPPED, "the run's record counts are written when it ends",
    ),
}

#: Invariants of how elspeth-nb's engine records coalesces; ELSPETH writes its own CoalesceMetadata in the
#: branch states and gives the merged token no coalesce state, so imported runs skip them.
NATIVE_ONLY = frozenset({"coalesce_state_context"})
NATIVE_PRODUCER = "elspeth-nb"

_VIOLATION_SCHEMA = {"invariant": pl.String, "table": pl.String, "record_id": pl.String, "detail": pl.String}
_INVARIANT_SCHEMA = {"invariant": pl.String, "description": pl.String, "applied": pl.Boolean, "scope": pl.String,
                     "violations": pl.Int64, "note": pl.String}


@dataclass(frozen=True)
class CheckResult(Displayable):
    """Invariant violations of one run; ``ok`` when there are none.

    ``invariants`` has one row per invariant with its ``scope``: ``full``, ``limited`` or ``skipped``
    (a run still being written, or interrupted: ``note`` says what is left out), or ``not applicable`` (the producer
    records it differently). ``to_polars()`` is ``violations``, plus, while the run is still being
    written, one row per limited or skipped invariant with no table or record id and a detail that
    says so, so the frame alone is never taken for a full check.
    """

    run_id: str
    status: str
    violations: pl.DataFrame
    invariants: pl.DataFrame

    @property
    def ok(self) -> bool:
        return self.violations.height == 0

    @property
    def partial(self) -> bool:
        """True when the run was still being written or was interrupted: some invariants were limited or skipped."""
        return self.status in UNFINISHED

    def _reason(self) -> str:
        if self.status == RunStatus.RUNNING:
            return "the run is still being written"
        return "the run was interrupted, so its trail ends where it stopped"

    def _left_out_title(self) -> str:
        why = "while the run is written" if self.status == RunStatus.RUNNING else "because the run was interrupted"
        return f"Limited or skipped {why}"

    def _scoped(self, scope: str) -> pl.DataFrame:
        return self.invariants.filter(pl.col("scope") == scope)

    def _partial_rows(self) -> pl.DataFrame:
        """One row per limited or skipped invariant, in the violations' columns, saying what was not checked."""
        left_out = self.invariants.filter(pl.col("scope").is_in([LIMITED, SKIPPED]))
        return left_out.select(
            "invariant", pl.lit(None, pl.String).alias("table"), pl.lit(None, pl.String).alias("record_id"),
            (pl.lit("not a violation: ") + pl.col("scope") + pl.lit(f" because {self._reason()}; ")
             + pl.col("note")).alias("detail"))

    def to_polars(self) -> pl.DataFrame:
        return pl.concat([self.violations, self._partial_rows()]) if self.partial else self.violations

    def _partial_note(self) -> str:
        full, limited, skipped = (self._scoped(s).height for s in (FULL, LIMITED, SKIPPED))
        until = " until it finishes" if self.status == RunStatus.RUNNING else ""
        return (f"{self._reason()}, so this check is partial: {full} invariants checked in full, "
                f"{limited} limited, {skipped} skipped{until}")

    def _verdict(self) -> str:
        n = int(self.invariants["applied"].sum())
        where = f"Check of run {self.run_id} ({self.status})"
        if self.partial:
            found = "no violation so far" if self.ok else f"{self.violations.height} violation(s) so far"
            return f"{where}: {found}; {self._partial_note()}"
        skipped = self._scoped(NOT_APPLICABLE).height
        note = f" ({skipped} not applicable to this producer)" if skipped else ""
        if self.ok:
            return f"{where}: OK, all {n} invariants hold{note}"
        broken = int((self.invariants["violations"] > 0).sum())
        return f"{where}: {self.violations.height} violation(s) of {broken} of {n} invariants"

    def _left_out(self) -> pl.DataFrame:
        return self.invariants.filter(pl.col("scope").is_in([LIMITED, SKIPPED])).select("invariant", "scope", "note")

    def __repr__(self) -> str:
        lines = [self._verdict(), text_table(self.invariants.select("invariant", "scope", "violations"), indent="  ")]
        if self.partial:
            lines += [f"{self._left_out_title()}:",
                      *(f"  {name} ({scope}): {note}" for name, scope, note in self._left_out().iter_rows())]
        if not self.ok:
            lines += ["Violations:", text_table(self.violations, max_rows=50, indent="  ")]
        return "\n".join(lines)

    def to_html(self) -> str:
        parts = [verdict_html(self.ok, self._verdict())]
        if self.partial:
            parts.append(html_table(self._left_out(), self._left_out_title()))
        parts.append(html_table(self.invariants, "Invariants"))
        if not self.ok:
            parts.append(html_table(self.violations, "Violations", 200))
        return html_block(f"Check of run {self.run_id}", *parts)


#: Runs whose trail may lack its last records: still being written, or cut off by an interruption.
UNFINISHED = frozenset({RunStatus.RUNNING, RunStatus.INTERRUPTED})


def _scope(name: str, invariant: Invariant, native: bool, live: bool) -> str:
    """How much of ``invariant`` applies to a run of this producer, finished or still being written."""
    if name in NATIVE_ONLY and not native:
        return NOT_APPLICABLE
    return invariant.while_running if live else FULL


def check(self: Audit, run_id: str = "latest") -> CheckResult:
    """Check the invariants of a sound trail; ``.violations`` lists each breach (empty when sound).

    A run still being written, or interrupted (its last buffered records were lost with the process), is
    checked only as far as the records on disk allow (``.partial``; ``.invariants`` says which invariants
    were limited or skipped).

    >>> result = audit.check()
    >>> result.ok, result.partial, result.violations.columns
    (True, False, ['invariant', 'table', 'record_id', 'detail'])
    """
    db = self._db
    run = db.resolve_run(run_id)
    status, producer = db.rows("SELECT status, producer FROM runs WHERE run_id = $run", {"run": run})[0]
    native = str(producer or "").startswith(NATIVE_PRODUCER)
    live = status in UNFINISHED
    frames = []
    counts = []
    for name, invariant in INVARIANTS.items():
        scope = _scope(name, invariant, native, live)
        note = invariant.note if scope in (LIMITED, SKIPPED) else ""
        found = pl.DataFrame(schema=_VIOLATION_SCHEMA)
        if scope in (FULL, LIMITED):
            params = {"run": run, "name": name, **({"live": live} if invariant.while_running == LIMITED else {})}
            found = db.frame(f"SELECT $name AS invariant, * FROM ({invariant.sql}) ORDER BY record_id",  # noqa: S608
                             params).select(pl.col(c).cast(t) for c, t in _VIOLATION_SCHEMA.items())
        frames.append(found)
        counts.append({"invariant": name, "description": invariant.description, "applied": scope in (FULL, LIMITED),
                       "scope": scope, "violations": found.height, "note": note})
    return CheckResult(run, status, pl.concat(frames), pl.DataFrame(counts, schema=_INVARIANT_SCHEMA))
