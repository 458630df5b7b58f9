"""Runs: the list of runs, one run's summary, and its terminal outcome counts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import polars as pl

from elspeth_nb._arguments import require
from elspeth_nb.analysis._connection import INTERNAL, NEWEST_FIRST
from elspeth_nb.analysis.coalesce import LOST_AFTER_DECISION_CTES, has_unresolved_decisions
from elspeth_nb.analysis.results import Displayable, format_value, html_block, html_pairs, html_table, text_table
from elspeth_nb.audit.schema import CoalesceEventType, Outcome, RunStatus

if TYPE_CHECKING:
    from elspeth_nb.analysis.audit import Audit

#: Terminal outcomes that mean the row's data did not get where it was going. ``late_arrival`` is not one.
FAILURE_OUTCOMES = (Outcome.FAILED, Outcome.QUARANTINED)
OUTCOME_GROUPINGS = ("outcome", "node", "sink", "branch")

_RUN_LIST_SQL = f"""
SELECT r.run_id, r.status, r.started_at, r.completed_at, epoch(r.completed_at) - epoch(r.started_at) AS duration_s,
       r.producer, r.pipeline_path, r.payload_mode
FROM runs r LEFT JOIN {INTERNAL}.run_order o USING (run_id)
ORDER BY {NEWEST_FIRST}
"""  # noqa: S608 - constants only

#: Coalesce counts of the runs in ``$runs``, one row per run that has decisions.
_RUN_DECISIONS_SQL = f"""
SELECT run_id, count(*) FILTER (WHERE event_type = '{CoalesceEventType.MERGED}') AS merged,
       count(*) FILTER (WHERE event_type = '{CoalesceEventType.FAILED}') AS coalesce_failed,
       count(*) FILTER (WHERE event_type = '{CoalesceEventType.LATE_ARRIVAL}') AS late_arrivals
FROM coalesce_events WHERE list_contains($runs::VARCHAR[], run_id) GROUP BY run_id
"""  # noqa: S608 - constants only
_COUNT_COLUMNS = ("rows", "tokens", "merged", "coalesce_failed", "late_arrivals")


def runs(self: Audit) -> pl.DataFrame:
    """Every run in the audit, newest first, with its size and coalesce counts.

    Columns: run_id, status, started_at, completed_at, duration_s, producer, pipeline_path,
    payload_mode, rows (source rows), tokens, merged, coalesce_failed, late_arrivals.

    >>> audit.runs().columns[:3]
    ['run_id', 'status', 'started_at']
    """
    db = self._db
    db.update_liveness()
    listed = db.frame(_RUN_LIST_SQL)
    ids = listed["run_id"].to_list()
    sizes = pl.DataFrame({"run_id": ids, "rows": list(map(db.record_counts("rows", ids).get, ids)),
                          "tokens": list(map(db.record_counts("tokens", ids).get, ids))},
                         schema={"run_id": pl.String, "rows": pl.Int64, "tokens": pl.Int64})
    decisions = db.frame_by_run(ids, _RUN_DECISIONS_SQL)
    return (listed.join(sizes, on="run_id", how="left", maintain_order="left")
            .join(decisions, on="run_id", how="left", maintain_order="left")
            .with_columns(pl.col(c).fill_null(0).cast(pl.Int64) for c in _COUNT_COLUMNS))


_HEADER_SQL = """
SELECT run_id, status, started_at, completed_at, epoch(completed_at) - epoch(started_at) AS duration_s,
       config_hash, canonical_version, reproducibility_grade, producer, pipeline_path, payload_mode, schema_version,
       revision, error_message, merkle_root
FROM runs WHERE run_id = $run
"""
#: Header counts that are record counts of a table, in header order (``quarantined`` comes after node_states).
_HEADER_COUNTS = ("rows", "tokens", "node_states", "validation_errors", "transform_errors", "artifacts")
#: Whether some token of the run has no terminal outcome (a run stopped mid-row left it where it was).
_UNFINISHED_SQL = """
SELECT EXISTS (SELECT 1 FROM tokens t WHERE t.run_id = $run AND NOT EXISTS (
    SELECT 1 FROM token_outcomes o WHERE o.run_id = t.run_id AND o.token_id = t.token_id AND o.is_terminal = 1))
"""

_QUARANTINED_SQL = """
SELECT count(*) FROM token_outcomes WHERE run_id = $run AND is_terminal = 1 AND outcome = 'quarantined'
"""

#: Per node: states aggregated first (one pass over node_states), then joined to the few nodes.
_NODES_SQL = """
WITH s AS (SELECT node_id, min(step_index) AS first_step, count(*) AS states,
                  count(*) FILTER (WHERE status = 'completed') AS completed,
                  count(*) FILTER (WHERE status = 'failed') AS failed,
                  avg(duration_ms) AS mean_duration_ms, quantile_cont(duration_ms, 0.95) AS p95_duration_ms
           FROM node_states WHERE run_id = $run GROUP BY node_id),
     w AS (SELECT node_id, avg(wait_duration_ms) FILTER (WHERE event_type <> 'late_arrival') AS mean_wait_ms,
                  quantile_cont(wait_duration_ms, 0.95) FILTER (WHERE event_type <> 'late_arrival') AS p95_wait_ms,
                  max(wait_duration_ms) FILTER (WHERE event_type <> 'late_arrival') AS max_wait_ms,
                  count(*) FILTER (WHERE event_type = 'late_arrival') AS late_arrivals
           FROM coalesce_events WHERE run_id = $run GROUP BY node_id)
SELECT n.node_name, n.node_type, n.plugin_name AS plugin, coalesce(n.sequence_in_pipeline, s.first_step) AS step,
       coalesce(s.states, 0) AS states, coalesce(s.completed, 0) AS completed, coalesce(s.failed, 0) AS failed,
       CASE WHEN n.node_type = 'coalesce' THEN coalesce(w.late_arrivals, 0) END AS late_arrivals,
       CASE WHEN n.node_type <> 'coalesce' THEN s.mean_duration_ms END AS mean_duration_ms,
       CASE WHEN n.node_type <> 'coalesce' THEN s.p95_duration_ms END AS p95_duration_ms,
       w.mean_wait_ms, w.p95_wait_ms, w.max_wait_ms
FROM nodes n LEFT JOIN s USING (node_id) LEFT JOIN w USING (node_id)
WHERE n.run_id = $run
ORDER BY step NULLS LAST, n.node_name
"""

_COALESCE_SQL = """
SELECT coalesce_name AS coalesce, any_value(policy) AS policy, any_value(merge_strategy) AS merge_strategy,
       count(*) FILTER (WHERE event_type <> 'late_arrival') AS decisions,
       count(*) FILTER (WHERE event_type = 'merged') AS merged,
       count(*) FILTER (WHERE event_type = 'failed') AS failed,
       count(*) FILTER (WHERE event_type = 'late_arrival') AS late_arrivals,
       count(*) FILTER (WHERE event_type <> 'late_arrival' AND trigger = 'timeout') AS timeouts,
       coalesce(sum(n_lost) FILTER (WHERE event_type <> 'late_arrival'), 0)::BIGINT AS lost_branches,
       quantile_cont(wait_duration_ms, 0.5) FILTER (WHERE event_type <> 'late_arrival') AS p50_wait_ms,
       quantile_cont(wait_duration_ms, 0.95) FILTER (WHERE event_type <> 'late_arrival') AS p95_wait_ms
FROM coalesce_events WHERE run_id = $run
GROUP BY coalesce_name ORDER BY coalesce_name
"""

#: Joins still waiting at a coalesce when the run stopped: their arrived tokens' failed states there carry
#: ``held_at_coalesce`` (no decision was made, so coalesce_events has no row for them).
_HELD_SQL = """
SELECT n.node_name AS coalesce,
       any_value(s.context_after_json->'$.held_at_coalesce'->>'policy') AS policy,
       any_value(s.context_after_json->'$.held_at_coalesce'->>'merge_strategy') AS merge_strategy,
       count(DISTINCT t.row_id) AS held_when_run_stopped
FROM node_states s
JOIN nodes n ON n.run_id = s.run_id AND n.node_id = s.node_id
JOIN tokens t ON t.run_id = s.run_id AND t.token_id = s.token_id
WHERE s.run_id = $run AND s.status = 'failed' AND n.node_type = 'coalesce'
  AND json_exists(s.context_after_json, '$.held_at_coalesce')
GROUP BY n.node_name
"""

_LOST_AFTER_SQL = (f"WITH {LOST_AFTER_DECISION_CTES} "  # noqa: S608 - module constants only
                   "SELECT coalesce_name AS coalesce, count(*) AS lost_after_decision FROM lost_after GROUP BY ALL")


@dataclass(frozen=True)
class RunSummary(Displayable):
    """One run at a glance: header, per-node table, outcome counts, per-coalesce counts.

    ``nodes`` reports coalesce waits (``mean_wait_ms``/``p95_wait_ms``, from the decisions)
    apart from processing time (``mean_duration_ms``/``p95_duration_ms``, other nodes only), and a
    coalesce's ``late_arrivals`` among its states: ELSPETH records their states as ``failed``, we as
    ``completed``, so they explain a coalesce's failed count in an imported run.
    """

    run_id: str
    header: Mapping[str, Any]
    nodes: pl.DataFrame
    outcomes: pl.DataFrame
    coalesce: pl.DataFrame

    @property
    def status(self) -> str:
        return str(self.header["status"])

    def to_polars(self) -> pl.DataFrame:
        """The per-node table."""
        return self.nodes

    def _title(self) -> str:
        h = self.header
        duration = format_value(h.get("duration_s"))
        return f"Run {self.run_id}: {h['status']}, {h['rows']} source rows, {h['tokens']} tokens, {duration} s"

    def __repr__(self) -> str:
        h = self.header
        keys = ("started_at", "completed_at", "producer", "pipeline_path", "payload_mode", "config_hash",
                "quarantined", "validation_errors", "transform_errors", "error_message")
        lines = [self._title()]
        lines += [f"  {k}: {format_value(h.get(k), width=80)}" for k in keys if h.get(k) is not None]
        lines += ["", "Nodes:", text_table(self.nodes, indent="  "), "", "Outcomes:",
                  text_table(self.outcomes, indent="  ")]
        if self.coalesce.height:
            lines += ["", "Coalesce:", text_table(self.coalesce, indent="  ")]
        return "\n".join(lines)

    def to_html(self) -> str:
        return html_block(self._title(), html_pairs(self.header.items()), html_table(self.nodes, "Nodes", 100),
                          html_table(self.outcomes, "Outcomes"), html_table(self.coalesce, "Coalesce"))


def run_summary(self: Audit, run_id: str = "latest") -> RunSummary:
    """Header, per-node states and timings, outcome counts and coalesce counts of one run.

    >>> summary = audit.run_summary()
    >>> summary.status
    'completed'
    >>> summary.nodes.columns[:4]
    ['node_name', 'node_type', 'plugin', 'step']
    """
    db = self._db
    run = db.resolve_run(run_id)
    params = {"run": run}
    header = db.frame(_HEADER_SQL, params).row(0, named=True)
    for table in _HEADER_COUNTS:
        header[table] = db.record_counts(table, [run]).get(run, 0)
        if table == "node_states":
            header["quarantined"] = db.rows_for([run], _QUARANTINED_SQL, params)[0][0]
    return RunSummary(run, MappingProxyType(header), db.frame_for([run], _NODES_SQL, params), outcomes(self, run),
                      _coalesce_counts(self, run, str(header["status"])))


def _coalesce_counts(self: Audit, run: str, status: str) -> pl.DataFrame:
    """Per coalesce counts; ``lost_branches`` includes the ``lost_after_decision`` ones (see policy_outcomes).

    A run that stopped before completing also counts the joins each coalesce still held then
    (``held_when_run_stopped``); a coalesce that held joins but decided none is listed too. A run still
    running, or interrupted without ending its tokens in flight (a second Ctrl-C, or an interrupt raised
    inside a plugin), records nothing for its open joins: there the count is null, not 0.
    """
    counts = self._db.frame_for([run], _COALESCE_SQL, {"run": run})
    after = pl.DataFrame(schema={"coalesce": pl.String, "lost_after_decision": pl.Int64})
    if has_unresolved_decisions(self, run):
        after = self._db.frame_for([run], _LOST_AFTER_SQL, {"run": run})
    lost_after = pl.col("lost_after_decision").fill_null(0)
    counts = (counts.join(after, on="coalesce", how="left")
              .with_columns((pl.col("lost_branches") + lost_after).alias("lost_branches"), lost_after)
              .select(*counts.columns[:counts.columns.index("lost_branches") + 1], "lost_after_decision",
                      *counts.columns[counts.columns.index("lost_branches") + 1:]))
    if status == RunStatus.COMPLETED:
        return counts
    if status == RunStatus.RUNNING or (
            status == RunStatus.INTERRUPTED and self._db.rows_for([run], _UNFINISHED_SQL, {"run": run})[0][0]):
        return counts.with_columns(pl.lit(None, pl.Int64).alias("held_when_run_stopped"))  # nothing records them
    held = self._db.frame_for([run], _HELD_SQL, {"run": run})
    tallies = [c for c, dtype in counts.schema.items() if dtype.is_integer()]
    return (counts.join(held, on="coalesce", how="full", coalesce=True)
            .with_columns(pl.coalesce(f"{c}", f"{c}_right").alias(c) for c in ("policy", "merge_strategy"))
            .drop("policy_right", "merge_strategy_right")
            .with_columns(pl.col(*tallies, "held_when_run_stopped").fill_null(0))
            .sort("coalesce"))


_LAST_NODE = """
SELECT s.token_id, n.node_name, n.node_type FROM node_states s
LEFT JOIN nodes n ON n.node_id = s.node_id AND n.run_id = s.run_id
WHERE s.run_id = $run
QUALIFY row_number() OVER (PARTITION BY s.token_id ORDER BY s.step_index DESC, s.started_at DESC) = 1
"""

_OUTCOME_SQL = {
    "outcome": ("o.outcome", "", "o.outcome"),
    "sink": ("o.sink_name AS sink, o.outcome", "", "o.sink_name NULLS LAST, o.outcome"),
    "branch": ("t.branch_name AS branch, o.outcome",
               "LEFT JOIN tokens t ON t.token_id = o.token_id AND t.run_id = o.run_id",
               "t.branch_name NULLS FIRST, o.outcome"),
    "node": ("last.node_name AS node, last.node_type, o.outcome", f"LEFT JOIN ({_LAST_NODE}) last USING (token_id)",
             "last.node_name NULLS LAST, o.outcome"),
}


def outcomes(self: Audit, run_id: str = "latest", by: str = "outcome") -> pl.DataFrame:
    """Counts of terminal token outcomes, by ``outcome``, ``node`` (where the token ended), ``sink`` or ``branch``.

    ``is_failure`` is true for ``failed`` and ``quarantined``; ``late_arrival`` is its own outcome
    (a branch that reached its coalesce after the decision) and not a failure.

    >>> audit.outcomes().columns
    ['outcome', 'is_failure', 'count']
    >>> audit.outcomes(by="sink").columns
    ['sink', 'outcome', 'is_failure', 'count']
    """
    require(by, str, "by", f"one of {', '.join(OUTCOME_GROUPINGS)}")
    if by not in _OUTCOME_SQL:
        raise ValueError(f"by must be one of {', '.join(OUTCOME_GROUPINGS)}, not {by!r}")
    run = self._db.resolve_run(run_id)
    select, join, order = _OUTCOME_SQL[by]
    failures = ", ".join(f"'{o}'" for o in FAILURE_OUTCOMES)
    sql = (f"SELECT {select}, o.outcome IN ({failures}) AS is_failure, count(*) AS count "  # noqa: S608
           f"FROM token_outcomes o {join} WHERE o.run_id = $run AND o.is_terminal = 1 "
           f"GROUP BY ALL ORDER BY {order}")
    return self._db.frame_for([run], sql, {"run": run})
