"""Engine throughput with the full audit trail on (issue: >= 10,000 source rows/s at 100k rows).

The pipeline is ELSPETH's 3-branch `requireall_nested` sample with `merge: union`: a fork into
passthrough / truncate / field_mapper branches and a require_all coalesce into a JSONL sink.
Each size runs in a fresh subprocess so peak RSS is that run's own.

    .venv/bin/python bench/engine_throughput.py --rows 10000 100000 1000000

Prints, per size: source rows/s for the whole `run_pipeline` call and until the Parquet trail was
complete (before the end-of-run audit.duckdb update, timed separately), audit bytes per source row
for Parquet and for audit.duckdb, and peak RSS (the largest of the run's processes).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "engine" / "configs" / "elspeth_requireall_nested.yaml"
WORK = ROOT / "bench" / "_stores" / "throughput"
CATEGORIES = ["electronics", "garden", "grocery", "toys", "books"]


def make_input(path: Path, rows: int) -> None:
    """The sample's columns, `rows` rows, deterministic."""
    if path.exists() and sum(1 for _ in path.open()) == rows + 1:
        return
    rng = random.Random(rows)
    with path.open("w") as handle:
        handle.write("id,name,amount,category,note\n")
        for i in range(1, rows + 1):
            handle.write(f"{i},item-{i:07d},{rng.randint(100, 99999)},{rng.choice(CATEGORIES)},"
                         f"lorem ipsum dolor sit amet consectetur {rng.random()}\n")


def make_pipeline(folder: Path, input_path: Path) -> Path:
    settings = yaml.safe_load(SAMPLE.read_text())
    settings = copy.deepcopy(settings)
    settings["coalesce"][0]["merge"] = "union"
    settings["source"]["options"]["path"] = str(input_path)
    settings["sinks"]["output"]["options"]["path"] = str(folder / "output.jsonl")
    for key in ("landscape", "payload_store"):
        settings.pop(key, None)
    settings["sinks"]["output"].pop("on_write_failure", None)
    settings["audit"] = {"path": str(folder / "audit"), "payloads": "all"}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def measure(rows: int) -> dict[str, float]:
    """One run at `rows` rows, in this process (called in a child)."""
    from elspeth_nb.audit.store import AuditStore
    from elspeth_nb.engine.runner import run_pipeline

    folder = WORK / f"rows_{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    input_path = WORK / f"input_{rows}.csv"
    make_input(input_path, rows)
    pipeline = make_pipeline(folder, input_path)
    shutil.rmtree(folder / "audit", ignore_errors=True)
    started = time.perf_counter()
    result = run_pipeline(pipeline)
    seconds = time.perf_counter() - started
    store = AuditStore.open(folder / "audit")
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "trail_rows_per_s": rows / result.trail_s,
        "duckdb_s": result.duckdb_s,
        "workers": result.workers,
        "parquet_bytes_per_row": store.parquet_bytes(result.run_id) / rows,
        "duckdb_bytes_per_row": store.duckdb_path.stat().st_size / rows,
        "records": sum(result.counts.values()),
        "peak_rss_mib": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"{'rows':>9} {'workers':>7} {'seconds':>8} {'rows/s':>9} {'trail rows/s':>13} {'duckdb s':>9} "
          f"{'parquet B/row':>14} {'duckdb B/row':>13} {'records':>10} {'peak RSS MiB':>13}")
    for rows in args.rows:
        out = subprocess.run([sys.executable, __file__, "--child", str(rows)], check=True, capture_output=True,
                             text=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
        print(f"{m['rows']:>9,} {m['workers']:>7} {m['seconds']:>8.2f} {m['rows_per_s']:>9,.0f} "
              f"{m['trail_rows_per_s']:>13,.0f} {m['duckdb_s']:>9.2f} {m['parquet_bytes_per_row']:>14,.0f} "
              f"{m['duckdb_bytes_per_row']:>13,.0f} {m['records']:>10,} {m['peak_rss_mib']:>13,.0f}")
    print("rows/s: whole run_pipeline call; trail rows/s: until the Parquet trail was complete, "
          "before the end-of-run audit.duckdb update (duckdb s)")


if __name__ == "__main__":
    main()
