"""Integrity: the invariants of a sound trail (``check``).

Each invariant is one SQL query returning ``table, record_id, detail`` per violation; ``check``
runs them all for one run. Hash verification is in :mod:`elspeth_nb.analysis.verify`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from elspeth_nb.analysis.results import Displayable, html_block, html_table, text_table, verdict_html

if TYPE_CHECKING:
    from elspeth_nb.analysis.audit import Audit


#: name -> (what it promises, SQL selecting table, record_id, detail of each violation)
INVARIANTS: dict[str, tuple[str, str]] = {
    "one_terminal_outcome": (
        "every token has at most one terminal outcome",
        """SELECT 'token_outcomes' AS "table", token_id AS record_id,
                  count(*) || ' terminal outcomes: ' || string_agg(outcome, ', ' ORDER BY recorded_at) AS detail
           FROM token_outcomes WHERE run_id = $run AND is_terminal = 1 GROUP BY token_id HAVING count(*) > 1""",
    ),
    "token_has_outcome": (
        "every token of a finished run has a terminal outcome",
        """SELECT 'tokens' AS "table", t.token_id AS record_id,
                   'no terminal outcome (branch ' || coalesce(t.branch_name, '-') || ')' AS detail
            FROM tokens t
            WHERE t.run_id = $run AND (SELECT status FROM runs WHERE run_id = $run) <> 'running'
              AND NOT EXISTS (SELECT 1 FROM token_outcomes o
                              WHERE o.run_id = $run AND o.token_id = t.token_id AND o.is_terminal = 1)""",
    ),
    "parent_links_iff_group": (
        "a token has parent links exactly when it has a fork, join or expand group",
        """SELECT 'tokens' AS "table", t.token_id AS record_id,
                  CASE WHEN p.n IS NULL THEN 'has a fork/join/expand group but no parent links'
                       ELSE 'has ' || p.n || ' parent link(s) but no fork/join/expand group' END AS detail
           FROM tokens t LEFT JOIN (SELECT token_id, count(*) AS n FROM token_parents WHERE run_id = $run
                                    GROUP BY token_id) p ON p.token_id = t.token_id
           WHERE t.run_id = $run
             AND (p.n IS NOT NULL) <> (coalesce(t.fork_group_id, t.join_group_id, t.expand_group_id) IS NOT NULL)""",
    ),
    "parent_exists": (
        "every parent link points at a token of the same run",
        """SELECT 'token_parents' AS "table", p.token_id AS record_id,
                  'parent ' || p.parent_token_id || ' (ordinal ' || p.ordinal || ') is not a token of the run'
                  AS detail
           FROM token_parents p WHERE p.run_id = $run AND NOT EXISTS (
               SELECT 1 FROM tokens t WHERE t.run_id = $run AND t.token_id = p.parent_token_id)""",
    ),
    "fork_child_accounted": (
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
              AND (o.outcome IS NOT NULL OR (SELECT status FROM runs WHERE run_id = $run) <> 'running')
              AND NOT (coalesce(o.outcome IN ('coalesced', 'late_arrival')
                                AND t.token_id IN (SELECT token_id FROM named), false)
                       OR o.sink_name IS NOT NULL
                       OR coalesce(o.outcome IN ('failed', 'quarantined', 'forked', 'diverted', 'expanded',
                                                 'consumed_in_batch'), false))""",
    ),
    "coalesce_tokens_consistent": (
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
            FROM arrived a WHERE NOT EXISTS (
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
            WHERE e.event_type = 'merged' AND (t.token_id IS NULL OR t.join_group_id IS DISTINCT FROM e.join_group_id
                                               OR p.parents IS DISTINCT FROM e.arrived_token_ids)""",
    ),
    "coalesce_state_context": (
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
    ),
    "no_open_states": (
        "a finished run has no open or pending node states",
        """SELECT 'node_states' AS "table", state_id AS record_id,
                   'state is ' || status || CASE WHEN completed_at IS NULL THEN ' with no completed_at' ELSE '' END
                   AS detail
            FROM node_states WHERE run_id = $run AND (SELECT status FROM runs WHERE run_id = $run) <> 'running'
              AND (status IN ('open', 'pending') OR completed_at IS NULL)""",
    ),
    "coalesced_has_join_group": (
        "every coalesced outcome carries its join_group_id",
        """SELECT 'token_outcomes' AS "table", outcome_id AS record_id,
                  'coalesced outcome of token ' || token_id || ' has no join_group_id' AS detail
           FROM token_outcomes WHERE run_id = $run AND outcome = 'coalesced' AND join_group_id IS NULL""",
    ),
    "sink_output_hash": (
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
           WHERE o.run_id = $run AND o.is_terminal = 1 AND o.sink_name IS NOT NULL
             AND o.outcome IN ('completed', 'routed') AND NOT EXISTS (
                 SELECT 1 FROM node_states s JOIN nodes n ON n.node_id = s.node_id AND n.run_id = s.run_id
                 WHERE s.run_id = $run AND s.token_id = o.token_id AND n.node_type = 'sink'
                   AND n.node_name = o.sink_name AND s.status = 'completed')""",
    ),
}

#: Invariants of how elspeth-nb's engine records coalesces; ELSPETH writes its own CoalesceMetadata in the
#: branch states and gives the merged token no coalesce state, so imported runs skip them.
NATIVE_ONLY = frozenset({"coalesce_state_context"})
NATIVE_PRODUCER = "elspeth-nb"

_VIOLATION_SCHEMA = {"invariant": pl.String, "table": pl.String, "record_id": pl.String, "detail": pl.String}


@dataclass(frozen=True)
class CheckResult(Displayable):
    """Invariant violations of one run; ``ok`` when there are none."""

    run_id: str
    status: str
    violations: pl.DataFrame
    invariants: pl.DataFrame

    @property
    def ok(self) -> bool:
        return self.violations.height == 0

    def to_polars(self) -> pl.DataFrame:
        return self.violations

    def _verdict(self) -> str:
        n = int(self.invariants["applied"].sum())
        skipped = self.invariants.height - n
        note = f" ({skipped} not applicable to this producer)" if skipped else ""
        if self.ok:
            return f"Check of run {self.run_id} ({self.status}): OK, all {n} invariants hold{note}"
        broken = int((self.invariants["violations"] > 0).sum())
        return (f"Check of run {self.run_id} ({self.status}): {self.violations.height} violation(s) of "
                f"{broken} of {n} invariants")

    def __repr__(self) -> str:
        lines = [self._verdict(), text_table(self.invariants.select("invariant", "applied", "violations"), indent="  ")]
        if not self.ok:
            lines += ["Violations:", text_table(self.violations, max_rows=50, indent="  ")]
        return "\n".join(lines)

    def to_html(self) -> str:
        parts = [verdict_html(self.ok, self._verdict()), html_table(self.invariants, "Invariants")]
        if not self.ok:
            parts.append(html_table(self.violations, "Violations", 200))
        return html_block(f"Check of run {self.run_id}", *parts)


def check(self: Audit, run_id: str = "latest") -> CheckResult:
    """Check the invariants of a sound trail; ``.violations`` lists each breach (empty when sound).

    >>> result = audit.check()
    >>> result.ok, result.violations.columns
    (True, ['invariant', 'table', 'record_id', 'detail'])
    """
    db = self._db
    run = db.resolve_run(run_id)
    status, producer = db.rows("SELECT status, producer FROM runs WHERE run_id = $run", {"run": run})[0]
    native = str(producer or "").startswith(NATIVE_PRODUCER)
    frames = []
    counts = []
    for name, (description, sql) in INVARIANTS.items():
        if name in NATIVE_ONLY and not native:
            counts.append({"invariant": name, "description": description, "applied": False, "violations": 0})
            continue
        found = db.frame(f"SELECT $name AS invariant, * FROM ({sql}) ORDER BY record_id",  # noqa: S608 - constants
                         {"run": run, "name": name})
        frames.append(found.select(pl.col(c).cast(t) for c, t in _VIOLATION_SCHEMA.items()))
        counts.append({"invariant": name, "description": description, "applied": True, "violations": found.height})
    return CheckResult(run, status, pl.concat(frames),
                       pl.DataFrame(counts, schema={"invariant": pl.String, "description": pl.String,
                                                    "applied": pl.Boolean, "violations": pl.Int64}))
