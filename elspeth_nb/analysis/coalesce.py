"""Coalesce analytics: decisions, per-branch merge timings and their percentiles, policy outcomes.

Everything is computed in DuckDB over ``coalesce_events``: lists are unnested there, never
looped over in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from elspeth_nb._arguments import require
from elspeth_nb.analysis.results import Displayable, html_block, html_table, text_table
from elspeth_nb.audit.store import quote_ident
from elspeth_nb.errors import NotFoundError

if TYPE_CHECKING:
    from elspeth_nb.analysis.audit import Audit

#: Columns ``merge_timing_summary`` may group by.
SUMMARY_GROUPS = ("coalesce", "branch", "policy", "merge_strategy", "trigger", "event_type")


def _coalesce_filter(self: Audit, run: str, coalesce: str | None) -> str:
    """SQL condition on ``coalesce_name`` (parameter ``$coalesce``); unknown names raise NotFoundError."""
    if coalesce is None:
        return ""
    if not isinstance(coalesce, str):
        raise TypeError(f"coalesce must be a coalesce name (str) or None, not {type(coalesce).__name__}")
    known = [r[0] for r in self._db.rows_for([run],
        "SELECT DISTINCT node_name FROM nodes WHERE run_id = $run AND node_type = 'coalesce' AND node_name IS NOT NULL "
        "UNION SELECT DISTINCT coalesce_name FROM coalesce_events WHERE run_id = $run ORDER BY 1", {"run": run})]
    if coalesce not in known:
        raise NotFoundError(f"Coalesce in run `{run}`:", coalesce, known)
    return " AND coalesce_name = $coalesce"


def _params(run: str, coalesce: str | None) -> dict[str, Any]:
    return {"run": run, "coalesce": coalesce} if coalesce is not None else {"run": run}


def coalesce_events(self: Audit, run_id: str = "latest", coalesce: str | None = None,
                    include_late: bool = False) -> pl.DataFrame:
    """One row per coalesce decision (merged or failed), typed, lists kept as lists; late arrivals if asked.

    >>> events = audit.coalesce_events()
    >>> sorted(set(events["event_type"]))
    ['merged']
    >>> events.select("trigger", "branches_arrived").row(0)
    ('all_arrived', ['a', 'b', 'c'])
    """
    require(include_late, bool, "include_late", "True or False")
    run = self._db.resolve_run(run_id)
    where = _coalesce_filter(self, run, coalesce)
    if not include_late:
        where += " AND event_type <> 'late_arrival'"
    return self._db.frame_for(
        [run], f"SELECT * FROM coalesce_events WHERE run_id = $run{where} "  # noqa: S608 - fixed fragments only
        f"ORDER BY decided_at, event_type = 'late_arrival', event_id", _params(run, coalesce))


_TIMINGS_SQL = """
WITH d AS (
    SELECT event_id, coalesce_name, row_id, policy, merge_strategy, trigger, event_type, wait_duration_ms, decided_at,
           expected_branches, branches_arrived, arrived_token_ids, arrival_offsets_ms, branches_lost, lost_reasons
    FROM coalesce_events WHERE run_id = $run AND event_type <> 'late_arrival'{where}
), e AS (
    SELECT *, unnest(expected_branches) AS branch FROM d
), e2 AS (
    SELECT * EXCLUDE (arrived_token_ids, arrival_offsets_ms), list_position(branches_arrived, branch) AS arrived_at,
           arrived_token_ids[arrived_at] AS arrived_token_id, arrival_offsets_ms[arrived_at] AS arrival_offset_ms,
           {lost_at} AS lost_at
    FROM e
){ctes}
SELECT e2.event_id, e2.coalesce_name AS coalesce, e2.row_id, e2.policy, e2.merge_strategy, e2.trigger,
       e2.event_type, e2.branch,
       CASE WHEN e2.arrived_at IS NOT NULL THEN 'arrived'
            WHEN {late_branch} IS NOT NULL THEN 'late'
            WHEN e2.lost_at IS NOT NULL THEN 'lost'
            ELSE 'missing' END AS status,
       coalesce(e2.arrived_token_id, {late_token}, {lost_token}, {after_token}) AS token_id,
       e2.arrived_at::INTEGER AS arrival_rank,
       coalesce(e2.arrival_offset_ms, {late_offset}) AS arrival_offset_ms,
       e2.wait_duration_ms,
       {late_by} AS late_by_ms,
       coalesce(e2.lost_reasons[e2.lost_at], CASE WHEN e2.arrived_at IS NULL AND {late_branch} IS NULL
                                                  THEN {after_reason} END) AS lost_reason
FROM e2{joins}
{order}"""


#: Branch tokens that left their branch early (lost_branch context), by row, coalesce and branch.
_AFTER_LOSS_CTE = """after_loss AS (
    SELECT t.row_id, o.token_id,
           json_extract_string(o.context_json, '$.lost_branch.coalesce') AS coalesce_name,
           json_extract_string(o.context_json, '$.lost_branch.branch') AS branch,
           json_extract_string(o.context_json, '$.lost_branch.reason') AS reason
    FROM token_outcomes o JOIN tokens t ON t.token_id = o.token_id AND t.run_id = o.run_id
    WHERE o.run_id = $run AND o.is_terminal = 1 AND json_exists(o.context_json, '$.lost_branch')
)"""

#: Branches a decision was taken without (neither arrived nor known lost) whose token then ended elsewhere:
#: ``merge_timings`` shows them as ``missing`` with a ``lost_reason``. CTEs ``lost_after(coalesce_name, branch,
#: reason)``; needed only when a decision had unresolved branches (see ``_TIMING_NEEDS_SQL``).
LOST_AFTER_DECISION_CTES = f"""{_AFTER_LOSS_CTE},
undecided AS (
    SELECT row_id, coalesce_name, branches_arrived, branches_lost FROM coalesce_events
    WHERE run_id = $run AND event_type <> 'late_arrival' AND (n_arrived + n_lost < n_expected) IS NOT FALSE
),
lost_after AS (
    SELECT a.coalesce_name, a.branch, a.reason FROM undecided d
    JOIN after_loss a ON a.row_id = d.row_id AND a.coalesce_name = d.coalesce_name
    WHERE NOT list_contains(coalesce(d.branches_arrived, []), a.branch)
      AND NOT list_contains(coalesce(d.branches_lost, []), a.branch)
)"""  # noqa: S608 - module constants only


def has_unresolved_decisions(self: Audit, run: str) -> bool:
    """Whether any decision of ``run`` was taken without knowing of every expected branch."""
    return bool(self._db.rows_for([run], _TIMING_NEEDS_SQL, {"run": run})[0][2])


@dataclass(frozen=True)
class _Join:
    """An optional part of the timings query: a CTE, its join, and what it fills in (NULL without it)."""

    cte: str
    join: str
    fills: dict[str, str]


#: Only the parts a run's decisions need are joined: most runs have no late, lost or unresolved branch.
_TIMING_JOINS = {
    "late": _Join(  # a branch that reached the coalesce after the decision
        """late AS (
    SELECT decision_event_id, late_branch, any_value(late_token_id) AS late_token_id, min(late_by_ms) AS late_by_ms,
           min(arrival_offsets_ms[1]) AS late_offset_ms
    FROM coalesce_events WHERE run_id = $run AND event_type = 'late_arrival' GROUP BY ALL
)""",
        "LEFT JOIN late ON late.decision_event_id = e2.event_id AND late.late_branch = e2.branch",
        {"late_branch": "late.late_branch", "late_token": "late.late_token_id", "late_by": "late.late_by_ms",
         "late_offset": "late.late_offset_ms"}),
    "lost": _Join(  # the token of a branch the decision knew was lost, from its context
        """lost_tokens AS (
    SELECT event_id, json_extract(context_json, '$.branches_lost') AS lost
    FROM coalesce_events WHERE run_id = $run AND event_type <> 'late_arrival' AND (n_lost > 0) IS NOT FALSE
)""",
        "LEFT JOIN lost_tokens lt ON lt.event_id = e2.event_id AND e2.lost_at IS NOT NULL",
        {"lost_token": "(lt.lost -> e2.branch) ->> 'token_id'", "lost_at": "list_position(branches_lost, branch)"}),
    "unresolved": _Join(  # a branch token that ended elsewhere once the decision was taken without it
        _AFTER_LOSS_CTE,
        "LEFT JOIN after_loss a "
        "ON a.row_id = e2.row_id AND a.coalesce_name = e2.coalesce_name AND a.branch = e2.branch",
        {"after_token": "a.token_id", "after_reason": "a.reason"}),
}
_TIMING_NULLS = {"late_branch": "NULL::VARCHAR", "late_token": "NULL::VARCHAR", "late_by": "NULL::DOUBLE",
                 "late_offset": "NULL::DOUBLE",
                 "lost_token": "NULL::VARCHAR", "lost_at": "NULL::INTEGER", "after_token": "NULL::VARCHAR",
                 "after_reason": "NULL::VARCHAR"}
#: Which optional parts the run needs (a NULL count reads as needed). Reads four small columns.
_TIMING_NEEDS_SQL = """
SELECT coalesce(bool_or(event_type = 'late_arrival'), false) AS late,
       coalesce(bool_or(event_type <> 'late_arrival' AND (n_lost > 0) IS NOT FALSE), false) AS lost,
       coalesce(bool_or(event_type <> 'late_arrival' AND (n_arrived + n_lost < n_expected) IS NOT FALSE), false)
           AS unresolved
FROM coalesce_events WHERE run_id = $run
"""


def _timings_sql(self: Audit, run: str, where: str, *, ordered: bool = True) -> str:
    """The per-branch timings query of ``run`` (parameter ``$run``), with only the joins its decisions need."""
    needs = self._db.rows_for([run], _TIMING_NEEDS_SQL, {"run": run})[0]
    parts = [part for part, needed in zip(("late", "lost", "unresolved"), needs, strict=True) if needed]
    fills = dict(_TIMING_NULLS)
    for part in parts:
        fills.update(_TIMING_JOINS[part].fills)
    return _TIMINGS_SQL.format(
        where=where, ctes="".join(f", {_TIMING_JOINS[p].cte}" for p in parts),
        joins="".join(f"\n{_TIMING_JOINS[p].join}" for p in parts),
        order="ORDER BY e2.decided_at, e2.event_id, list_position(e2.expected_branches, e2.branch)" if ordered else "",
        **fills)


def merge_timings(self: Audit, run_id: str = "latest", coalesce: str | None = None) -> pl.DataFrame:
    """One row per (coalesce decision, expected branch): how and when each branch got there.

    ``status`` is ``arrived`` (with its 1-based ``arrival_rank`` and ``arrival_offset_ms`` after
    the first arrival), ``late`` (reached the coalesce ``late_by_ms`` after the decision, and
    ``arrival_offset_ms`` after the first arrival),
    ``lost`` (the decision knew it would never come: ``lost_reason``) or ``missing`` (had not
    come when the decision was taken; ``lost_reason`` says why when the branch token ended
    elsewhere afterwards). ``wait_duration_ms`` is the decision's wait, repeated per branch.

    >>> timings = audit.merge_timings()
    >>> timings.select("branch", "status", "arrival_rank").head(3).rows()
    [('a', 'arrived', 1), ('b', 'arrived', 2), ('c', 'arrived', 3)]
    """
    run = self._db.resolve_run(run_id)
    where = _coalesce_filter(self, run, coalesce)
    return self._db.frame_for([run], _timings_sql(self, run, where), _params(run, coalesce))


_QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def _stats(column: str, prefix: str, where: str = "") -> str:
    """mean, the quantiles as one list (one sort, however many quantiles), max, of the rows ``where`` says (all by
    default); ``_spread`` unpacks them."""
    c = quote_ident(column)
    levels = ", ".join(str(q) for _, q in _QUANTILES)
    only = f" FILTER (WHERE {where})" if where else ""
    return (f"avg({c}){only} AS {prefix}_mean_ms, quantile_cont({c}, [{levels}]){only} AS {prefix}_q, "
            f"max({c}){only} AS {prefix}_max_ms")


def _spread(prefix: str) -> str:
    """The columns of ``_stats`` in order, the quantile list unpacked into p50/p90/p99."""
    quantiles = ", ".join(f"{prefix}_q[{i}] AS {prefix}_{name}_ms" for i, (name, _) in enumerate(_QUANTILES, 1))
    return f"{prefix}_mean_ms, {quantiles}, {prefix}_max_ms"


def merge_timing_summary(self: Audit, run_id: str = "latest",
                         by: str | Sequence[str] = ("coalesce", "branch")) -> pl.DataFrame:
    """Count, mean, p50, p90, p99 and max of decision waits and branch arrival offsets, per group.

    ``by`` is ``("coalesce", "branch")`` (default), ``("coalesce",)``, ``("coalesce", "policy")``
    or any combination of coalesce, branch, policy, merge_strategy, trigger, event_type.
    Wait statistics count each decision once per group (``decisions``); arrival statistics
    cover the branches that arrived (``arrivals``); ``late``, ``lost`` and ``missing`` count
    branches. Percentiles are DuckDB's ``quantile_cont`` (linear interpolation).

    >>> audit.merge_timing_summary(by=("coalesce",)).select("coalesce", "decisions", "arrivals").rows()
    [('merge3', 4, 12)]
    """
    require(by, (str, Sequence), "by", f"a column name or a sequence of names from {', '.join(SUMMARY_GROUPS)}")
    groups = (by,) if isinstance(by, str) else tuple(by)
    unknown = [g for g in groups if g not in SUMMARY_GROUPS]
    if not groups or unknown or len(set(groups)) != len(groups):
        raise ValueError(f"by must be distinct names from {', '.join(SUMMARY_GROUPS)}; got {by!r}")
    run = self._db.resolve_run(run_id)
    keys = ", ".join(quote_ident(g) for g in groups)
    timings = _timings_sql(self, run, "", ordered=False)
    # every name formatted into the SQL below comes from SUMMARY_GROUPS or this module (S608)
    arrived = "status = 'arrived'"  # a late branch has an arrival offset too, but it arrived after the decision
    branches = (f"count(*) FILTER (WHERE {arrived}) AS arrivals, {_stats('arrival_offset_ms', 'arrival', arrived)}, "
                "count(*) FILTER (WHERE status = 'late') AS late, count(*) FILTER (WHERE status = 'lost') AS lost, "
                "count(*) FILTER (WHERE status = 'missing') AS missing")
    if "branch" in groups:  # one row per decision and branch: each decision is in a group once, one pass
        grouped = (f"SELECT {keys}, count(*) AS decisions, {_stats('wait_duration_ms', 'wait')}, {branches} "  # noqa: S608
                   f"FROM ({timings}) GROUP BY ALL")
    else:  # waits from the decisions themselves, arrivals from their branches
        grouped = f"""
        WITH w AS (SELECT {keys}, count(*) AS decisions, {_stats("wait_duration_ms", "wait")}
                   FROM (SELECT coalesce_name AS coalesce, policy, merge_strategy, trigger, event_type, wait_duration_ms
                         FROM coalesce_events WHERE run_id = $run AND event_type <> 'late_arrival') GROUP BY ALL),
             a AS (SELECT {keys}, {branches} FROM ({timings}) GROUP BY ALL)
        SELECT * FROM w JOIN a USING ({keys})
        """  # noqa: S608
    sql = (f"SELECT {keys}, decisions, {_spread('wait')}, arrivals, {_spread('arrival')}, late, lost, missing "  # noqa: S608
           f"FROM ({grouped}) ORDER BY {keys}")
    return self._db.frame_for([run], sql, {"run": run})


#: Triggers and results in one scan (grouping sets); lost branches from decisions that lost one and, where
#: a decision went ahead without a branch, from that branch's token ending elsewhere afterwards.
_POLICY_SQL = """
WITH {after_ctes}d AS (SELECT coalesce_name, trigger, event_type, failure_reason FROM coalesce_events
           WHERE run_id = $run AND event_type <> 'late_arrival'),
g AS (SELECT coalesce_name AS coalesce, trigger, if(event_type = 'merged', 'merged', 'failed') AS result,
             failure_reason, grouping(trigger) AS by_result, count(*) AS count
      FROM d GROUP BY GROUPING SETS ((coalesce_name, trigger), (coalesce_name, result, failure_reason))),
lost AS (SELECT coalesce_name, unnest(branches_lost) AS branch, unnest(lost_reasons) AS reason FROM coalesce_events
         WHERE run_id = $run AND event_type <> 'late_arrival' AND (n_lost > 0) IS NOT FALSE),
l AS (SELECT * FROM coalesce_events WHERE run_id = $run AND event_type = 'late_arrival')
SELECT coalesce, if(by_result = 1, 'result', 'trigger') AS kind, if(by_result = 1, result, trigger) AS key,
       if(by_result = 1, failure_reason, NULL) AS reason, count, NULL::DOUBLE AS mean_late_by_ms,
       NULL::DOUBLE AS max_late_by_ms
FROM g
UNION ALL BY NAME
SELECT coalesce_name AS coalesce, 'lost_branch' AS kind, branch AS key, reason, count(*) AS count
FROM lost GROUP BY ALL
UNION ALL BY NAME{after_select}
SELECT coalesce_name AS coalesce, 'late_arrival' AS kind, late_branch AS key,
       CASE WHEN failure_reason IS NULL THEN 'after_merge' ELSE 'after_failure' END AS reason, count(*) AS count,
       avg(late_by_ms) AS mean_late_by_ms, max(late_by_ms) AS max_late_by_ms
FROM l GROUP BY ALL
ORDER BY coalesce, kind, key, reason NULLS FIRST
"""


@dataclass(frozen=True)
class PolicyOutcomes(Displayable):
    """Per coalesce: decisions by trigger, merges vs failures by reason, lost branches, late arrivals."""

    run_id: str
    tidy: pl.DataFrame

    def _kind(self, kind: str, key: str, reason: str | None = None, late: bool = False) -> pl.DataFrame:
        cols = ["coalesce", pl.col("key").alias(key)]
        if reason:
            cols.append(pl.col("reason").alias(reason))
        cols.append("count")
        if late:
            cols += ["mean_late_by_ms", "max_late_by_ms"]
        return self.tidy.filter(pl.col("kind") == kind).select(cols)

    @property
    def by_trigger(self) -> pl.DataFrame:
        """coalesce, trigger, count of decisions."""
        return self._kind("trigger", "trigger")

    @property
    def results(self) -> pl.DataFrame:
        """coalesce, result (merged | failed), failure_reason, count."""
        return self._kind("result", "result", "failure_reason")

    @property
    def lost_branches(self) -> pl.DataFrame:
        """coalesce, branch, reason, lost (``before_decision`` | ``after_decision``), count.

        ``before_decision``: the decision knew the branch would never come. ``after_decision``: the
        decision went ahead without it (quorum, first, best_effort, timeout) and its token ended
        elsewhere afterwards, for ``reason``.
        """
        when = pl.when(pl.col("kind") == "lost_branch").then(pl.lit("before_decision")).otherwise(
            pl.lit("after_decision"))
        return (self.tidy.filter(pl.col("kind").is_in(["lost_branch", "lost_after_decision"]))
                .select("coalesce", pl.col("key").alias("branch"), "reason", when.alias("lost"), "count"))

    @property
    def late_arrivals(self) -> pl.DataFrame:
        """coalesce, branch, after (after_merge | after_failure), count, mean/max late_by_ms."""
        return self._kind("late_arrival", "branch", "after", late=True)

    def to_polars(self) -> pl.DataFrame:
        """Tidy: coalesce, kind (trigger | result | lost_branch | lost_after_decision | late_arrival), key, reason,
        count, late stats."""
        return self.tidy

    def _sections(self) -> list[tuple[str, pl.DataFrame]]:
        return [("Decisions by trigger", self.by_trigger), ("Merges and failures", self.results),
                ("Lost branches", self.lost_branches), ("Late arrivals", self.late_arrivals)]

    def __repr__(self) -> str:
        lines = [f"Policy outcomes of run {self.run_id}"]
        for title, frame in self._sections():
            lines += [f"{title}:", text_table(frame, indent="  ")]
        return "\n".join(lines)

    def to_html(self) -> str:
        return html_block(f"Policy outcomes of run {self.run_id}",
                          *(html_table(frame, title) for title, frame in self._sections()))


def policy_outcomes(self: Audit, run_id: str = "latest") -> PolicyOutcomes:
    """How each coalesce's policy played out: triggers, merges vs failures, lost branches, late arrivals.

    >>> outcomes = audit.policy_outcomes()
    >>> outcomes.by_trigger.rows()
    [('merge3', 'all_arrived', 4)]
    >>> sorted(set(outcomes.to_polars()["kind"]))
    ['result', 'trigger']
    """
    run = self._db.resolve_run(run_id)
    after = has_unresolved_decisions(self, run)
    sql = _POLICY_SQL.format(
        after_ctes=f"{LOST_AFTER_DECISION_CTES},\n" if after else "",
        after_select="""
SELECT coalesce_name AS coalesce, 'lost_after_decision' AS kind, branch AS key, reason, count(*) AS count
FROM lost_after GROUP BY ALL
UNION ALL BY NAME""" if after else "")
    return PolicyOutcomes(run, self._db.frame_for([run], sql, {"run": run}))
