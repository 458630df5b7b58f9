"""Where the engine's CPU time per source row goes: the pipeline alone, and each stage of writing its trail.

Runs ``engine_throughput.py``'s pipeline (3-branch fork, require_all union coalesce, full payloads) in
one process, four ways, each in a fresh child process and repeated (the least CPU time is kept):

- **no trail**: the recorder drops every record (what the per-row engine costs on its own: CSV
  parsing, transforms, hashing every row, the coalesce, the JSONL sink);
- **buffered**: records are appended to the recorder's column lists, then dropped;
- **in Arrow**: the column lists are also converted to Arrow arrays, then dropped;
- **full trail**: ids and times finished, Parquet segments written, fingerprinted and digested.

The differences are the cost of each stage. The ceiling of a stage is the source rows per second
that two cores could reach if the run did only that much, with both busy throughout.

    .venv/bin/python bench/engine_floor.py --rows 30000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _machine import Conditions
from engine_throughput import WORK, fresh_run

RECORD_METHODS = ("rows", "tokens", "token_parents", "token_outcomes", "node_states", "routing_events", "payloads",
                  "coalesce_events")
VARIANTS = ("no trail", "buffered", "in Arrow", "full trail")
TARGET = 10_000


def _patch(variant: str) -> None:
    """Make the recorder stop after the stage ``variant`` names (a diagnostic: the run's trail is incomplete)."""
    from elspeth_nb.audit import recorder

    if variant == "no trail":
        for name in RECORD_METHODS:
            setattr(recorder.Recorder, name, lambda self, *args, **kwargs: None)
    elif variant == "buffered":
        def drop(self: recorder.Recorder, *args: object) -> None:
            for buffer in self._tables.values():
                for column in buffer.columns:
                    if isinstance(column, list):
                        column.clear()
                    else:
                        column.values, column.offsets = [], [0]

        recorder.Recorder.seal = drop  # type: ignore[method-assign]
        recorder.Recorder.flush = drop  # type: ignore[method-assign]
    elif variant == "in Arrow":
        recorder._BackgroundSegments.submit = lambda self, table, batches: None  # type: ignore[method-assign]


def measure(rows: int, variant: str, work: Path = WORK) -> dict[str, float]:
    """One run of ``variant`` in this process (called in a child): CPU µs per source row."""
    from elspeth_nb.engine.runner import run_pipeline

    _patch(variant)
    pipeline, _ = fresh_run(work, f"floor_{rows}", rows)
    conditions = Conditions().start()
    run_pipeline(pipeline, sync_duckdb=False, workers=1)
    conditions.stop()
    return {"cpu_us_per_row": 1e6 * conditions.cpu_s / rows, "steal_pct": conditions.steal_pct or 0.0,
            "others_pct": conditions.others_pct or 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=30_000, help="source rows per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant, interleaved; the least CPU is kept")
    parser.add_argument("--work", type=Path, default=WORK, help="folder for the input, output and trail")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.rows, args.child, args.work)))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeat):
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--work", str(args.work),
                                  "--child", variant], check=True, capture_output=True, text=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    cores = os.cpu_count() or 1
    print(f"{args.rows:,} source rows, one process, {cores} CPUs, least of {args.repeat} runs")
    print(f"{'stage':12s} {'CPU us/row':>11s} {'stage us/row':>13s} {'ceiling rows/s':>15s} {'steal %':>8s} "
          f"{'others %':>9s}")
    previous = 0.0
    for variant in VARIANTS:
        best = min(runs[variant], key=lambda r: r["cpu_us_per_row"])
        cost = best["cpu_us_per_row"]
        print(f"{variant:12s} {cost:11.0f} {cost - previous:13.0f} {cores * 1e6 / cost:15,.0f} "
              f"{best['steal_pct']:8.1f} {best['others_pct']:9.1f}")
        previous = cost
    print(f"ceiling: source rows/s with {cores} cores busy throughout doing that much per row "
          f"(target: {TARGET:,} rows/s with the full trail)")
    print(f"rerun: .venv/bin/python bench/engine_floor.py --rows {args.rows} --repeat {args.repeat}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
