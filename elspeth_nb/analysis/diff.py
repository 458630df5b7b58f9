"""What changed between two runs: config, nodes, outcome counts, coalesce decisions, wait percentiles."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING, Any

import polars as pl

from elspeth_nb.analysis.integrity import UNFINISHED
from elspeth_nb.analysis.results import Displayable, html_block, html_table, text_table
from elspeth_nb.audit.schema import RunStatus

if TYPE_CHECKING:
    from elspeth_nb.analysis.audit import Audit

_NODES_SQL = """
WITH a AS (SELECT node_name, node_type, plugin_name, config_hash FROM nodes WHERE run_id = $a),
     b AS (SELECT node_name, node_type, plugin_name, config_hash FROM nodes WHERE run_id = $b)
SELECT coalesce(a.node_name, b.node_name) AS node_name,
       CASE WHEN a.node_name IS NULL THEN 'added' WHEN b.node_name IS NULL THEN 'removed' ELSE 'changed' END AS change,
       coalesce(a.node_type, b.node_type) AS node_type, a.plugin_name AS plugin_a, b.plugin_name AS plugin_b,
       a.config_hash AS config_hash_a, b.config_hash AS config_hash_b
FROM a FULL OUTER JOIN b ON a.node_name = b.node_name
WHERE a.node_name IS NULL OR b.node_name IS NULL OR a.config_hash IS DISTINCT FROM b.config_hash
   OR a.plugin_name IS DISTINCT FROM b.plugin_name
ORDER BY change, node_name
"""

_OUTCOMES_SQL = """
WITH c AS (SELECT run_id, outcome, count(*) AS n FROM token_outcomes
           WHERE run_id IN ($a, $b) AND is_terminal = 1 GROUP BY ALL)
SELECT outcome, coalesce(sum(n) FILTER (WHERE run_id = $a), 0)::BIGINT AS a,
       coalesce(sum(n) FILTER (WHERE run_id = $b), 0)::BIGINT AS b, b - a AS delta
FROM c GROUP BY outcome ORDER BY outcome
"""

_DECISIONS_SQL = """
WITH c AS (SELECT run_id, coalesce_name AS coalesce, event_type, trigger, failure_reason, count(*) AS n
           FROM coalesce_events WHERE run_id IN ($a, $b) GROUP BY ALL)
SELECT coalesce, event_type, trigger, failure_reason, coalesce(sum(n) FILTER (WHERE run_id = $a), 0)::BIGINT AS a,
       coalesce(sum(n) FILTER (WHERE run_id = $b), 0)::BIGINT AS b, b - a AS delta
FROM c GROUP BY ALL ORDER BY coalesce, event_type, trigger, failure_reason NULLS FIRST
"""

_TIMINGS_SQL = """
WITH s AS (
    SELECT run_id, coalesce_name AS coalesce, count(*)::DOUBLE AS decisions, avg(wait_duration_ms) AS mean,
           quantile_cont(wait_duration_ms, 0.5) AS p50, quantile_cont(wait_duration_ms, 0.9) AS p90,
           quantile_cont(wait_duration_ms, 0.99) AS p99, max(wait_duration_ms) AS max
    FROM coalesce_events WHERE run_id IN ($a, $b) AND event_type <> 'late_arrival' GROUP BY ALL
), long AS (UNPIVOT s ON decisions, mean, p50, p90, p99, max INTO NAME stat VALUE value)
SELECT coalesce, stat,  -- a run with no decision at a coalesce took 0 decisions there (its waits stay NULL)
       ifnull(any_value(value) FILTER (WHERE run_id = $a), CASE WHEN stat = 'decisions' THEN 0 END) AS a,
       ifnull(any_value(value) FILTER (WHERE run_id = $b), CASE WHEN stat = 'decisions' THEN 0 END) AS b,
       b - a AS delta
FROM long GROUP BY coalesce, stat
ORDER BY coalesce, list_position(['decisions', 'mean', 'p50', 'p90', 'p99', 'max'], stat)
"""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``a.b[0].c -> value``; lists of named items by name: ``transforms[b_call].plugin``.

    >>> _flatten({"transforms": [{"name": "t1", "options": {"x": 1}}], "sinks": {"out": {"plugin": "csv"}}})
    {'transforms[t1].name': 't1', 'transforms[t1].options.x': 1, 'sinks.out.plugin': 'csv'}
    """
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, _key_path(prefix, str(key))))
        return out or {prefix: {}}
    if isinstance(value, list) and value and any(isinstance(v, dict | list) for v in value):
        names = [v.get("name") if isinstance(v, dict) else None for v in value]
        by_name = all(isinstance(n, str) for n in names) and len(set(names)) == len(names)
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{names[i] if by_name else i}]"))
        return out
    return {prefix: value}


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key_path(prefix: str, key: str) -> str:
    """``prefix.key``, or ``prefix["a.b"]`` for a key that a dot would make ambiguous (``a.b`` vs ``a`` -> ``b``).

    >>> _key_path("options", "a.b"), _key_path("options", "b"), _key_path("", "audit")
    ('options["a.b"]', 'options.b', 'audit')
    """
    if _PLAIN_KEY.fullmatch(key):
        return f"{prefix}.{key}" if prefix else key
    return f"{prefix}[{json.dumps(key)}]"


def _config_diff(settings_a: str | None, settings_b: str | None) -> pl.DataFrame:
    a = {k: json.dumps(v, sort_keys=True) for k, v in _flatten(json.loads(settings_a)).items()} if settings_a else {}
    b = {k: json.dumps(v, sort_keys=True) for k, v in _flatten(json.loads(settings_b)).items()} if settings_b else {}
    rows = []
    for key in sorted(a.keys() | b.keys()):  # compared as JSON text: 1 and true, 0 and false differ
        if a.get(key) == b.get(key):
            continue
        change = "added" if key not in a else "removed" if key not in b else "changed"
        rows.append({"key": key, "change": change, "a": a.get(key), "b": b.get(key)})
    return pl.DataFrame(rows, schema={"key": pl.String, "change": pl.String, "a": pl.String, "b": pl.String})


_RUNS_SCHEMA = {"side": pl.String, "run_id": pl.String, "status": pl.String, "producer": pl.String,
                "error_message": pl.String}


@dataclass(frozen=True)
class RunDiff(Displayable):
    """Differences between run ``a`` and run ``b`` (deltas are b - a)."""

    a: str
    b: str
    #: side (a, b), run_id, status, producer, error_message: what each side's counts stand for
    runs: pl.DataFrame
    config: pl.DataFrame
    nodes: pl.DataFrame
    outcomes: pl.DataFrame
    decisions: pl.DataFrame
    timings: pl.DataFrame

    @property
    def same_config(self) -> bool:
        return self.config.height == 0 and self.nodes.height == 0

    @property
    def notes(self) -> list[str]:
        """Why some differences may not be changes: an unfinished or failed side, or two producers."""
        found = []
        for side, run_id, status, _, error in self.runs.iter_rows():
            if status in UNFINISHED:
                found.append(f"run {side} ({run_id}) is {status}: its counts stop where its trail does")
            elif status != RunStatus.COMPLETED:
                found.append(f"run {side} ({run_id}) is {status}{f' ({error})' if error else ''}: "
                             "its counts cover only what it did before it stopped")
        producers = {str(p or "").split(" ")[0] for p in self.runs["producer"]}
        if len(producers) > 1:
            found.append(f"the runs were written by different producers ({', '.join(sorted(producers))}): config "
                         "and node differences include each producer's own defaults and node names")
        return found

    def _sections(self) -> list[tuple[str, pl.DataFrame]]:
        return [("Config (settings)", self.config), ("Nodes", self.nodes), ("Outcome counts", self.outcomes),
                ("Coalesce decisions", self.decisions), ("Wait time (ms)", self.timings)]

    def to_polars(self) -> pl.DataFrame:
        """Tidy: section, key, a, b (as text) and the numeric delta where there is one."""
        def tidy(section: str, frame: pl.DataFrame, keys: list[str], a: str, b: str,
                 delta: str | None) -> pl.DataFrame:
            key = pl.concat_str([pl.col(k).cast(pl.String).fill_null("-") for k in keys], separator=" / ")
            return frame.select(pl.lit(section).alias("section"), key.alias("key"),
                                pl.col(a).cast(pl.String).alias("a"), pl.col(b).cast(pl.String).alias("b"),
                                (pl.col(delta).cast(pl.Float64) if delta else pl.lit(None, pl.Float64)).alias("delta"))

        sides = {side: values for side, *values in self.runs.select("side", "status", "producer").iter_rows()}
        runs = pl.DataFrame({"key": ["status", "producer"], "a": sides["a"], "b": sides["b"]})
        return pl.concat([
            tidy("runs", runs, ["key"], "a", "b", None),
            tidy("config", self.config, ["key"], "a", "b", None),
            tidy("nodes", self.nodes, ["node_name", "change"], "config_hash_a", "config_hash_b", None),
            tidy("outcomes", self.outcomes, ["outcome"], "a", "b", "delta"),
            tidy("decisions", self.decisions, ["coalesce", "event_type", "trigger", "failure_reason"], "a", "b",
                 "delta"),
            tidy("timings", self.timings, ["coalesce", "stat"], "a", "b", "delta"),
        ])

    def __repr__(self) -> str:
        lines = [f"Run diff {self.a} -> {self.b}", *(f"  note: {n}" for n in self.notes)]
        if self.runs.height:
            lines += ["Runs:", text_table(self.runs, indent="  ")]
        for title, frame in self._sections():
            lines += [f"{title}:", text_table(frame, indent="  ") if frame.height else "  (no difference)"]
        return "\n".join(lines)

    def to_html(self) -> str:
        notes = "".join(f"<p><b>Note:</b> {escape(n)}</p>" for n in self.notes)
        return html_block(f"Run diff {self.a} → {self.b}", notes, html_table(self.runs, "Runs"),
                          *(html_table(f, t, 100) for t, f in self._sections()))


def diff_runs(self: Audit, a: str, b: str = "latest") -> RunDiff:
    """What changed from run ``a`` to run ``b``: settings, nodes, outcome counts, decisions, wait percentiles.

    >>> diff = audit.diff_runs("latest", "latest")
    >>> diff.same_config, diff.outcomes["delta"].to_list()
    (True, [0, 0, 0])
    """
    db = self._db
    run_a, run_b = db.resolve_run(a), db.resolve_run(b)
    params = {"a": run_a, "b": run_b}
    pair = [run_a, run_b]
    headers = {r[0]: r for r in db.rows("SELECT run_id, status, producer, error_message, settings_json FROM runs "
                                         "WHERE run_id IN ($a, $b)", params)}
    runs = pl.DataFrame([(side, *headers[run][:4]) for side, run in (("a", run_a), ("b", run_b))],
                        schema=_RUNS_SCHEMA, orient="row")
    return RunDiff(
        a=run_a, b=run_b, runs=runs,
        config=_config_diff(headers[run_a][4], headers[run_b][4]),
        nodes=db.frame_for(pair, _NODES_SQL, params),
        outcomes=db.frame_for(pair, _OUTCOMES_SQL, params),
        decisions=db.frame_for(pair, _DECISIONS_SQL, params),
        timings=db.frame_for(pair, _TIMINGS_SQL, params),
    )
