"""Latency of the notebook helpers on a 1M-source-row audit store, cold and warm, against hand-written DuckDB.

    .venv/bin/python bench/query_latency.py                 # reuses or builds bench/_stores/throughput/rows_1000000
    .venv/bin/python bench/query_latency.py --rows 100000   # a smaller store
    .venv/bin/python bench/query_latency.py --store DIR     # any audit store folder of one run

The store is the one `bench/engine_throughput.py` writes (3-branch fork, require_all union coalesce,
full payloads); it is built first when missing. Each helper is timed on `open_audit(store folder)`:
``cold`` is its first call in a fresh process (no Parquet footers or segment index cached),
``warm`` the median of ``--repeat`` further calls (3 for answers over 1 s; lineage: each call a
different random row), ``idle`` the median of calls made 1.5 s apart (the audit has let go of
audit.duckdb by then, as between notebook cells, and opens it again).
Each answer is also computed by hand-written DuckDB queries, on a fresh connection, over the run's
Parquet partition and over ``audit.duckdb``; the benchmark fails unless they give the helper's
answer. ``ratio`` is helper warm / the fastest of those warm.
Targets (issue 3): lineage <= 100 ms, merge_timing_summary and policy_outcomes <= 500 ms,
open_audit <= 1 s, every ratio <= 3.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
from polars.testing import assert_frame_equal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import Conditions  # noqa: E402

TARGETS_MS = {"open_audit": 1000.0, "lineage": 100.0, "merge_timing_summary": 500.0, "policy_outcomes": 500.0}
MAX_RATIO = 3.0

#: Hand-written queries for the same answer as each helper; ``{t}`` is replaced by the table's source (the run's
#: Parquet partition or its rows in audit.duckdb). They are written for this run's data, as a user would: the
#: run has no late, lost or unresolved branch, so (like the helpers, which check) they skip those joins.
DECIDED = "event_type <> 'late_arrival'"
BASELINES: dict[str, list[str]] = {
    "runs": [
        "SELECT r.run_id, r.status, r.started_at, r.completed_at, epoch(r.completed_at) - epoch(r.started_at) "
        "AS duration_s, r.producer, r.pipeline_path, r.payload_mode, (SELECT count(*) FROM {rows}) AS rows, "
        "(SELECT count(*) FROM {tokens}) AS tokens, c.* "
        "FROM (SELECT * FROM {runs} QUALIFY row_number() OVER (ORDER BY revision DESC) = 1) r, "
        "(SELECT count(*) FILTER (WHERE event_type = 'merged') AS merged, "
        "count(*) FILTER (WHERE event_type = 'failed') AS coalesce_failed, "
        "count(*) FILTER (WHERE event_type = 'late_arrival') AS late_arrivals FROM {coalesce_events}) c"],
    "run_summary": [
        "SELECT r.status, r.merkle_root, (SELECT count(*) FROM {rows}) AS rows, (SELECT count(*) FROM {tokens}) "
        "AS tokens, (SELECT count(*) FROM {node_states}) AS node_states, (SELECT count(*) FROM {token_outcomes} "
        "WHERE is_terminal = 1 AND outcome = 'quarantined') AS quarantined, "
        "(SELECT count(*) FROM {validation_errors}) AS validation_errors, "
        "(SELECT count(*) FROM {transform_errors}) AS transform_errors, "
        "(SELECT count(*) FROM {artifacts}) AS artifacts "
        "FROM (SELECT * FROM {runs} QUALIFY row_number() OVER (ORDER BY revision DESC) = 1) r",
        "WITH s AS (SELECT node_id, min(step_index) AS first_step, count(*) AS states, "
        "count(*) FILTER (WHERE status = 'completed') AS completed, count(*) FILTER (WHERE status = 'failed') "
        "AS failed, avg(duration_ms) AS d_mean, quantile_cont(duration_ms, 0.95) AS d_p95 FROM {node_states} "
        "GROUP BY node_id), "
        f"w AS (SELECT node_id, avg(wait_duration_ms) AS mean_wait_ms, quantile_cont(wait_duration_ms, 0.95) "
        f"AS p95_wait_ms, max(wait_duration_ms) AS max_wait_ms FROM {{coalesce_events}} WHERE {DECIDED} "
        "GROUP BY node_id) "
        "SELECT n.node_name, n.node_type, n.plugin_name AS plugin, coalesce(n.sequence_in_pipeline, s.first_step) "
        "AS step, coalesce(s.states, 0) AS states, coalesce(s.completed, 0) AS completed, coalesce(s.failed, 0) "
        "AS failed, if(n.node_type <> 'coalesce', s.d_mean, NULL) AS mean_duration_ms, "
        "if(n.node_type <> 'coalesce', s.d_p95, NULL) AS p95_duration_ms, w.mean_wait_ms, w.p95_wait_ms, "
        "w.max_wait_ms FROM {nodes} n LEFT JOIN s USING (node_id) LEFT JOIN w USING (node_id) "
        "ORDER BY step NULLS LAST, node_name",
        "SELECT outcome, outcome IN ('failed', 'quarantined') AS is_failure, count(*) AS count FROM {token_outcomes} "
        "WHERE is_terminal = 1 GROUP BY ALL ORDER BY outcome",
        f"SELECT coalesce_name AS coalesce, any_value(policy) AS policy, any_value(merge_strategy) AS merge_strategy, "
        f"count(*) FILTER (WHERE {DECIDED}) AS decisions, count(*) FILTER (WHERE event_type = 'merged') AS merged, "
        f"count(*) FILTER (WHERE event_type = 'failed') AS failed, "
        f"count(*) FILTER (WHERE event_type = 'late_arrival') AS late_arrivals, "
        f"count(*) FILTER (WHERE {DECIDED} AND trigger = 'timeout') AS timeouts, "
        f"coalesce(sum(n_lost) FILTER (WHERE {DECIDED}), 0)::BIGINT AS lost_branches, "
        f"quantile_cont(wait_duration_ms, [0.5, 0.95]) FILTER (WHERE {DECIDED}) AS q "
        f"FROM {{coalesce_events}} GROUP BY ALL ORDER BY 1"],
    "outcomes": ["SELECT outcome, outcome IN ('failed', 'quarantined') AS is_failure, count(*) AS count "
                 "FROM {token_outcomes} WHERE is_terminal = 1 GROUP BY ALL ORDER BY outcome"],
    "coalesce_events": [f"SELECT * FROM {{coalesce_events}} WHERE {DECIDED} ORDER BY decided_at, event_id"],
    "merge_timings": [
        "SELECT event_id, coalesce_name AS coalesce, row_id, policy, merge_strategy, trigger, event_type, branch, "
        "if(pos IS NULL, 'missing', 'arrived') AS status, arrived_token_ids[pos] AS token_id, "
        "pos::INTEGER AS arrival_rank, arrival_offsets_ms[pos] AS arrival_offset_ms, wait_duration_ms, "
        "NULL::DOUBLE AS late_by_ms, NULL::VARCHAR AS lost_reason "
        "FROM (SELECT *, list_position(branches_arrived, branch) AS pos FROM "
        "(SELECT event_id, coalesce_name, row_id, policy, merge_strategy, trigger, event_type, decided_at, "
        "wait_duration_ms, branches_arrived, arrived_token_ids, arrival_offsets_ms, "
        "unnest(expected_branches) AS branch, generate_subscripts(expected_branches, 1) AS i "
        f"FROM {{coalesce_events}} WHERE {DECIDED})) ORDER BY decided_at, event_id, i"],
    "merge_timing_summary": [
        "WITH b AS (SELECT coalesce_name AS coalesce, wait_duration_ms AS w, unnest(expected_branches) AS branch, "
        f"branches_arrived, arrival_offsets_ms FROM {{coalesce_events}} WHERE {DECIDED}), "
        "o AS (SELECT *, arrival_offsets_ms[list_position(branches_arrived, branch)] AS o FROM b) "
        "SELECT coalesce, branch, count(*) AS decisions, avg(w) AS wait_mean_ms, "
        "quantile_cont(w, [0.5, 0.9, 0.99]) AS wq, max(w) AS wait_max_ms, count(o) AS arrivals, "
        "avg(o) AS arrival_mean_ms, quantile_cont(o, [0.5, 0.9, 0.99]) AS aq, max(o) AS arrival_max_ms, "
        "0 AS late, 0 AS lost, count(*) - count(o) AS missing FROM o GROUP BY ALL ORDER BY ALL"],
    "policy_outcomes": [
        f"WITH d AS (SELECT * FROM {{coalesce_events}} WHERE {DECIDED}) "
        "SELECT coalesce_name AS coalesce, 'trigger' AS kind, trigger AS key, NULL AS reason, count(*) AS count "
        "FROM d GROUP BY ALL UNION ALL "
        "SELECT coalesce_name, 'result', if(event_type = 'merged', 'merged', 'failed'), failure_reason, count(*) "
        "FROM d GROUP BY ALL ORDER BY ALL"],
    "lineage": [
        "SELECT * FROM {rows} WHERE row_id = $row",
        "SELECT * FROM {tokens} WHERE row_id = $row",
        "SELECT * FROM {coalesce_events} WHERE row_id = $row",
        "SELECT * FROM {token_parents} WHERE token_id IN (SELECT token_id FROM {tokens} WHERE row_id = $row)",
        "SELECT * FROM {token_outcomes} WHERE token_id IN (SELECT token_id FROM {tokens} WHERE row_id = $row)",
        "SELECT s.*, p.payload_json FROM {node_states} s LEFT JOIN {payloads} p ON p.payload_hash = s.output_hash "
        "WHERE s.token_id IN (SELECT token_id FROM {tokens} WHERE row_id = $row)",
        "SELECT * FROM {payloads} WHERE payload_hash = (SELECT source_data_ref FROM {rows} WHERE row_id = $row)"],
}
#: Which baseline query answers which part of the helper's result, to show they are the same answer.
#: (lineage's result is a tree, not a table: its queries read the same records, which its own tests compare.)
SAME_ANSWER: dict[str, list[tuple[int, Callable[[Any], Any]]]] = {
    "runs": [(0, lambda r: r)],
    "run_summary": [(0, lambda s: pl.DataFrame([dict(s.header)])), (1, lambda s: s.nodes), (2, lambda s: s.outcomes),
                    (3, lambda s: s.coalesce.with_columns(q=pl.concat_list("p50_wait_ms", "p95_wait_ms")))],
    "outcomes": [(0, lambda r: r)],
    "coalesce_events": [(0, lambda r: r)],
    "merge_timings": [(0, lambda r: r)],
    "merge_timing_summary": [(0, lambda r: r.with_columns(
        wq=pl.concat_list("wait_p50_ms", "wait_p90_ms", "wait_p99_ms"),
        aq=pl.concat_list("arrival_p50_ms", "arrival_p90_ms", "arrival_p99_ms")))],
    "policy_outcomes": [(0, lambda r: r.to_polars().filter(pl.col("kind").is_in(["trigger", "result"])))],
}
TABLES = ("runs", "rows", "tokens", "token_parents", "token_outcomes", "node_states", "nodes", "coalesce_events",
          "payloads", "validation_errors", "transform_errors", "artifacts")


def build_store(rows: int) -> Path:
    """The engine benchmark's store of ``rows`` rows (built by that benchmark's own code when missing)."""
    import engine_throughput

    store = engine_throughput.WORK / f"rows_{rows}" / "audit"
    if not (store / "audit.duckdb").exists():
        print(f"building a {rows:,}-row store with bench/engine_throughput.py ...", flush=True)
        subprocess.run([sys.executable, engine_throughput.__file__, "--rows", str(rows)], check=True)
    return store


#: Longer than the audit's hold on audit.duckdb after a query (``elspeth_nb.analysis._native.IDLE_S``).
IDLE_PAUSE_S = 1.5


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def warm(call: Callable[[int], Any], repeat: int) -> float:
    return statistics.median(timed(lambda i=i: call(i)) for i in range(repeat))


def same_answer(name: str, label: str, helper: pl.DataFrame, baseline: Any) -> None:
    """Fail unless the hand-written query gave what the helper gave (its columns, by name; floats to 1e-9)."""
    expected = pl.from_arrow(baseline)
    assert isinstance(expected, pl.DataFrame)
    try:
        assert_frame_equal(helper.select(expected.columns), expected, check_dtypes=False, rel_tol=1e-9)
    except (AssertionError, pl.exceptions.ColumnNotFoundError) as exc:
        raise SystemExit(f"the hand-written {name} query on {label} does not give the helper's answer: {exc}") from exc


def measure(store: Path, repeat: int, seed: int, only: list[str] | None) -> dict[str, Any]:
    """Every helper and its baselines, in this (fresh) process."""
    import duckdb

    import elspeth_nb as enb

    results: dict[str, Any] = {}
    started = time.perf_counter()
    audit = enb.open_audit(store)
    results["open_audit"] = {"cold": (time.perf_counter() - started) * 1000}
    run = audit.runs()["run_id"][0]
    n_rows = audit.sql("SELECT count(*) AS n FROM rows WHERE run_id = $run", {"run": run})["n"][0]
    rng = random.Random(seed)
    picks = [rng.randrange(n_rows) for _ in range(repeat + 1)]
    row_ids = audit.sql("SELECT row_index, row_id FROM rows WHERE run_id = $run AND row_index IN "
                        "(SELECT unnest($picks::BIGINT[]))", {"run": run, "picks": picks})
    by_index = dict(row_ids.iter_rows())

    helpers: dict[str, Callable[[int], Any]] = {
        "runs": lambda i: audit.runs(),
        "run_summary": lambda i: audit.run_summary(run),
        "outcomes": lambda i: audit.outcomes(run),
        "lineage": lambda i: audit.lineage(run, row_index=picks[i % len(picks)]),
        "coalesce_events": lambda i: audit.coalesce_events(run),
        "merge_timings": lambda i: audit.merge_timings(run),
        "merge_timing_summary": lambda i: audit.merge_timing_summary(run),
        "policy_outcomes": lambda i: audit.policy_outcomes(run),
        "check": lambda i: audit.check(run),
    }
    if only:
        helpers = {name: call for name, call in helpers.items() if name in only}
    answers: dict[str, Any] = {}
    for name, call in helpers.items():
        print(f"timing {name} ...", end=" ", file=sys.stderr, flush=True)
        cold = timed(lambda call=call, name=name: answers.__setitem__(name, call(0)))
        times = repeat if cold < 1000 else min(repeat, 3)  # whole-run results: fewer repeats, same median
        results[name] = {"cold": cold, "warm": warm(lambda i, call=call: call(i + 1), times)}
        if name != "check":  # a call after the audit.duckdb connection was let go (a notebook cell later)
            results[name]["idle"] = warm(lambda i, call=call: (time.sleep(IDLE_PAUSE_S), call(i + 1))[1],
                                         min(times, 3)) - IDLE_PAUSE_S * 1000
        print(f"cold {cold:.0f} ms, warm {results[name]['warm']:.0f} ms", file=sys.stderr, flush=True)
    audit.close()
    results["open_audit"]["warm"] = warm(lambda i: enb.open_audit(store).close(), repeat)

    def partition(table: str) -> str:
        """The run's segments of ``table``, or the empty schema file when the run wrote none."""
        folder = store / "parquet" / table / f"run_id={run}"
        return f"read_parquet('{folder if folder.is_dir() else folder.with_name('run_id=__schema__')}/*.parquet')"


    sources = {"parquet": (duckdb.connect(), {t: partition(t) for t in TABLES}),
               "audit.duckdb": (duckdb.connect(str(store / "audit.duckdb"), read_only=True),
                                {t: f"(SELECT * FROM {t} WHERE run_id = '{run}')" for t in TABLES})}
    for con, _ in sources.values():
        con.execute("SET TimeZone = 'UTC'")  # as the helpers read timestamps
    for name, queries in BASELINES.items():
        if name not in helpers:
            continue
        for label, (con, tables) in sources.items():
            sql = [q.format(**tables) for q in queries]

            def answer(i: int, con: Any = con, sql: list[str] = sql) -> list[Any]:
                row = by_index[picks[i % len(picks)]]
                return [con.sql(q, params={"row": row} if "$row" in q else None).to_arrow_table() for q in sql]

            found = answer(0)  # also the warm-up: footers and pages, as the helper had them
            for index, part in SAME_ANSWER.get(name, []):
                same_answer(name, label, part(answers[name]), found[index])
            times = repeat if results[name]["warm"] < 1000 else min(repeat, 3)
            results[name][f"baseline {label}"] = warm(lambda i, answer=answer: answer(i + 1), times)
    return {"run_id": run, "rows": int(n_rows), "helpers": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--store", type=Path, help="an audit store folder (default: the engine bench's)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--only", nargs="+", metavar="HELPER", help="time only these helpers (default: all)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    store = args.store or build_store(args.rows)
    if args.child:
        print(json.dumps(measure(store, args.repeat, args.seed, args.only)))
        return
    child = [sys.executable, __file__, "--child", "--store", str(store), "--repeat", str(args.repeat),
             "--seed", str(args.seed), *(["--only", *args.only] if args.only else [])]
    conditions = Conditions().start()
    out = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True).stdout
    conditions.stop()
    m = json.loads(out.strip().splitlines()[-1])
    records = sum(p.stat().st_size for p in (store / "parquet").rglob("*.parquet"))
    print(f"store {store} run {m['run_id']}: {m['rows']:,} source rows, {records / 2**20:,.0f} MiB of Parquet")
    print(f"{'helper':<22} {'cold ms':>9} {'warm ms':>9} {'idle ms':>9} {'parquet ms':>11} {'duckdb ms':>10} "
          f"{'ratio':>6}  target")
    failures = []
    for name, r in m["helpers"].items():
        baselines = [v for k, v in r.items() if k.startswith("baseline")]
        ratio = r["warm"] / min(baselines) if baselines else None
        target = TARGETS_MS.get(name)
        verdict = []
        if target is not None:
            verdict.append(f"<= {target:.0f} ms " + ("ok" if r["warm"] <= target else "MISSED"))
            if r["warm"] > target:
                failures.append(f"{name} warm {r['warm']:.0f} ms > {target:.0f} ms")
        if ratio is not None:
            verdict.append("<= 3x " + ("ok" if ratio <= MAX_RATIO else "MISSED"))
            if ratio > MAX_RATIO:
                failures.append(f"{name} {ratio:.1f}x the hand-written query")
        print(f"{name:<22} {r['cold']:>9.1f} {r['warm']:>9.1f} {r.get('idle', float('nan')):>9.1f} "
              f"{r.get('baseline parquet', float('nan')):>11.1f} "
              f"{r.get('baseline audit.duckdb', float('nan')):>10.1f} "
              f"{'' if ratio is None else f'{ratio:.2f}':>6}  {', '.join(verdict)}")
    print("targets met" if not failures else "targets missed: " + "; ".join(failures))
    print(f"while timing: {conditions.shares()} of the machine's CPU time")


if __name__ == "__main__":
    main()
