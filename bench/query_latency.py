"""Latency of the notebook helpers on a 1M-source-row audit store, cold and warm, against hand-written DuckDB.

    .venv/bin/python bench/query_latency.py                 # reuses or builds bench/_stores/throughput/rows_1000000
    .venv/bin/python bench/query_latency.py --rows 100000   # a smaller store
    .venv/bin/python bench/query_latency.py --store DIR     # any audit store folder of one run

The store is the one `bench/engine_throughput.py` writes (3-branch fork, require_all union coalesce,
full payloads); it is built first when missing. Each helper is timed on `open_audit(store folder)`:
``cold`` is its first call in a fresh process (no Parquet footers or segment index cached),
``warm`` the median of ``--repeat`` further calls (3 for answers over 1 s; lineage: each call a
different random row).
Each answer is also computed by a hand-written DuckDB query, on a fresh connection, over the run's
Parquet partition and over ``audit.duckdb``; ``ratio`` is helper warm / the fastest of those warm.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS_MS = {"open_audit": 1000.0, "lineage": 100.0, "merge_timing_summary": 500.0, "policy_outcomes": 500.0}
MAX_RATIO = 3.0

#: Hand-written answers; ``{t}`` is replaced by the table's source (Parquet partition or duckdb table).
BASELINES: dict[str, list[str]] = {
    "runs": ["SELECT r.run_id, r.status, (SELECT count(*) FROM {rows}) AS rows, (SELECT count(*) FROM {tokens}) AS "
             "tokens, (SELECT count(*) FILTER (WHERE event_type = 'merged') FROM {coalesce_events}) AS merged "
             "FROM {runs} r"],
    "run_summary": [
        "SELECT * FROM {runs}",
        "SELECT n.node_name, count(*), avg(s.duration_ms), quantile_cont(s.duration_ms, 0.5) FROM {node_states} s "
        "JOIN {nodes} n USING (node_id) GROUP BY ALL",
        "SELECT outcome, count(*) FROM {token_outcomes} WHERE is_terminal = 1 GROUP BY ALL",
        "SELECT coalesce_name, event_type, trigger, count(*), avg(wait_duration_ms) FROM {coalesce_events} "
        "GROUP BY ALL"],
    "outcomes": ["SELECT outcome, count(*) FROM {token_outcomes} WHERE is_terminal = 1 GROUP BY ALL ORDER BY 1"],
    "coalesce_events": ["SELECT * FROM {coalesce_events} WHERE event_type <> 'late_arrival' "
                        "ORDER BY decided_at, event_id"],
    "merge_timings": ["SELECT event_id, coalesce_name, unnest(expected_branches) AS branch, "
                      "unnest(arrival_offsets_ms) AS offset_ms, wait_duration_ms FROM {coalesce_events} "
                      "WHERE event_type <> 'late_arrival' ORDER BY decided_at, event_id"],
    "merge_timing_summary": [
        "WITH a AS (SELECT coalesce_name, unnest(branches_arrived) AS branch, unnest(arrival_offsets_ms) AS o, "
        "wait_duration_ms AS w FROM {coalesce_events} WHERE event_type <> 'late_arrival') "
        "SELECT coalesce_name, branch, count(*), avg(w), quantile_cont(w, [0.5, 0.9, 0.99]), max(w), avg(o), "
        "quantile_cont(o, [0.5, 0.9, 0.99]), max(o) FROM a GROUP BY ALL ORDER BY ALL"],
    "policy_outcomes": [
        "SELECT coalesce_name, trigger, event_type, failure_reason, count(*) FROM {coalesce_events} "
        "WHERE event_type <> 'late_arrival' GROUP BY ALL ORDER BY ALL",
        "SELECT coalesce_name, branch, reason, count(*) FROM (SELECT coalesce_name, unnest(branches_lost) AS branch, "
        "unnest(lost_reasons) AS reason FROM {coalesce_events}) GROUP BY ALL",
        "SELECT coalesce_name, late_branch, count(*), avg(late_by_ms), max(late_by_ms) FROM {coalesce_events} "
        "WHERE event_type = 'late_arrival' GROUP BY ALL"],
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
TABLES = ("runs", "rows", "tokens", "token_parents", "token_outcomes", "node_states", "nodes", "coalesce_events",
          "payloads")


def build_store(rows: int) -> Path:
    """The engine benchmark's store of ``rows`` rows (built by that benchmark's own code when missing)."""
    import engine_throughput

    store = engine_throughput.WORK / f"rows_{rows}" / "audit"
    if not (store / "audit.duckdb").exists():
        print(f"building a {rows:,}-row store with bench/engine_throughput.py ...", flush=True)
        subprocess.run([sys.executable, engine_throughput.__file__, "--rows", str(rows)], check=True)
    return store


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def warm(call: Callable[[int], Any], repeat: int) -> float:
    return statistics.median(timed(lambda i=i: call(i)) for i in range(repeat))


def measure(store: Path, repeat: int, seed: int) -> dict[str, Any]:
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
    for name, call in helpers.items():
        print(f"timing {name} ...", end=" ", file=sys.stderr, flush=True)
        cold = timed(lambda call=call: call(0))
        times = repeat if cold < 1000 else min(repeat, 3)  # whole-run results: fewer repeats, same median
        results[name] = {"cold": cold, "warm": warm(lambda i, call=call: call(i + 1), times)}
        print(f"cold {cold:.0f} ms, warm {results[name]['warm']:.0f} ms", file=sys.stderr, flush=True)
    audit.close()
    results["open_audit"]["warm"] = warm(lambda i: enb.open_audit(store).close(), repeat)

    partition = {t: f"read_parquet('{store}/parquet/{t}/run_id={run}/*.parquet')" for t in TABLES}
    sources = {"parquet": (duckdb.connect(), partition),
               "audit.duckdb": (duckdb.connect(str(store / "audit.duckdb"), read_only=True),
                                {t: f"(SELECT * FROM {t} WHERE run_id = '{run}')" for t in TABLES})}
    for name, queries in BASELINES.items():
        for label, (con, tables) in sources.items():
            sql = [q.format(**tables) for q in queries]

            def answer(i: int, con: Any = con, sql: list[str] = sql, label: str = label) -> None:
                row = by_index[picks[i % len(picks)]]
                for q in sql:
                    con.sql(q, params={"row": row} if "$row" in q else None).to_arrow_table()

            answer(0)  # warm-up: footers and pages, as the helper had them
            times = repeat if results[name]["warm"] < 1000 else min(repeat, 3)
            results[name][f"baseline {label}"] = warm(lambda i, answer=answer: answer(i + 1), times)
    return {"run_id": run, "rows": int(n_rows), "helpers": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--store", type=Path, help="an audit store folder (default: the engine bench's)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    store = args.store or build_store(args.rows)
    if args.child:
        print(json.dumps(measure(store, args.repeat, args.seed)))
        return
    out = subprocess.run([sys.executable, __file__, "--child", "--store", str(store), "--repeat", str(args.repeat),
                          "--seed", str(args.seed)], check=True, stdout=subprocess.PIPE, text=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    records = sum(p.stat().st_size for p in (store / "parquet").rglob("*.parquet"))
    print(f"store {store} run {m['run_id']}: {m['rows']:,} source rows, {records / 2**20:,.0f} MiB of Parquet")
    print(f"{'helper':<22} {'cold ms':>9} {'warm ms':>9} {'parquet ms':>11} {'duckdb ms':>10} {'ratio':>6}  target")
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
        print(f"{name:<22} {r['cold']:>9.1f} {r['warm']:>9.1f} {r.get('baseline parquet', float('nan')):>11.1f} "
              f"{r.get('baseline audit.duckdb', float('nan')):>10.1f} "
              f"{'' if ratio is None else f'{ratio:.2f}':>6}  {', '.join(verdict)}")
    print("targets met" if not failures else "targets missed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
