"""Engine throughput with the full audit trail on (issue: >= 10,000 source rows/s at 100k rows).

The pipeline is ELSPETH's 3-branch `requireall_nested` sample with `merge: union`: a fork into
passthrough / truncate / field_mapper branches and a require_all coalesce into a JSONL sink.
Each size runs in a fresh subprocess so peak RSS is that run's own.

    .venv/bin/python bench/engine_throughput.py --rows 10000 100000 1000000

Prints, per size: source rows/s until the Parquet trail is complete, the end-of-run audit.duckdb
update (run next in a process of its own, so each phase's peak RSS is its own), source rows/s for
both, audit bytes per source row for Parquet and for audit.duckdb, and peak RSS of each phase.
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
from _machine import Conditions

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


def fresh_run(work: Path, folder_name: str, rows: int) -> tuple[Path, Path]:
    """(pipeline file, folder) of a run at ``rows`` rows in ``work/folder_name``, its earlier trail removed."""
    folder = work / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    input_path = work / f"input_{rows}.csv"
    make_input(input_path, rows)
    pipeline = make_pipeline(folder, input_path)
    shutil.rmtree(folder / "audit", ignore_errors=True)
    return pipeline, folder


def _peak_rss_mib() -> float:
    """Largest resident set of this process and of the children it waited for (fork workers)."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def measure(rows: int) -> dict[str, float]:
    """One run at `rows` rows with the Parquet trail, in this process (called in a child)."""
    from elspeth_nb.audit.store import AuditStore
    from elspeth_nb.engine.runner import run_pipeline

    pipeline, folder = fresh_run(WORK, f"rows_{rows}", rows)
    conditions = Conditions().start()
    started = time.perf_counter()
    result = run_pipeline(pipeline, sync_duckdb=False)
    seconds = time.perf_counter() - started
    conditions.stop()
    store = AuditStore.open(folder / "audit")
    return {
        "rows": rows,
        "run_id": result.run_id,
        "seconds": seconds,
        "trail_rows_per_s": rows / result.trail_s,
        "workers": result.workers,
        "parquet_bytes_per_row": store.parquet_bytes(result.run_id) / rows,
        "records": sum(result.counts.values()),
        "peak_rss_mib": _peak_rss_mib(),
        "cpu_us_per_row": 1e6 * conditions.cpu_s / rows,
        "steal_pct": conditions.steal_pct,
        "others_pct": conditions.others_pct,
    }


def load_duckdb(rows: int, run_id: str) -> dict[str, float]:
    """The end-of-run audit.duckdb update of that run, in this process (called in a child)."""
    from elspeth_nb.audit.store import AuditStore

    store = AuditStore.open(WORK / f"rows_{rows}" / "audit")
    result = store.sync_duckdb([run_id])
    if not result.ok:
        raise SystemExit(result.message)
    return {"duckdb_s": result.seconds, "duckdb_bytes_per_row": store.duckdb_path.stat().st_size / rows,
            "duckdb_peak_rss_mib": _peak_rss_mib()}


def _child(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_duckdb(args.child, args.load) if args.load else measure(args.child)))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"{'rows':>9} {'workers':>7} {'run s':>8} {'rows/s':>9} {'duckdb s':>9} {'total rows/s':>13} "
          f"{'parquet B/row':>14} {'duckdb B/row':>13} {'records':>10} {'RSS run MiB':>12} {'RSS duckdb MiB':>15} "
          f"{'CPU us/row':>11} {'steal %':>8} {'others %':>9}")
    for rows in args.rows:
        m = _child("--child", str(rows))
        m |= _child("--child", str(rows), "--load", str(m["run_id"]))
        total = rows / (m["seconds"] + m["duckdb_s"])
        print(f"{m['rows']:>9,} {m['workers']:>7} {m['seconds']:>8.2f} {m['trail_rows_per_s']:>9,.0f} "
              f"{m['duckdb_s']:>9.2f} {total:>13,.0f} {m['parquet_bytes_per_row']:>14,.0f} "
              f"{m['duckdb_bytes_per_row']:>13,.0f} {m['records']:>10,} {m['peak_rss_mib']:>12,.0f} "
              f"{m['duckdb_peak_rss_mib']:>15,.0f} {m['cpu_us_per_row']:>11,.0f} {_pct(m['steal_pct']):>8} "
              f"{_pct(m['others_pct']):>9}")
    print("rows/s: source rows per second until the Parquet trail is complete (run_pipeline with "
          "sync_duckdb=False); duckdb s: the end-of-run audit.duckdb update, run next in its own process "
          "(what run_pipeline does by default, or in the background with sync_duckdb='background'); "
          "total rows/s counts both. RSS: peak resident set of each phase's processes. CPU us/row: user + "
          "system time of the run's processes per source row; steal %: the machine's CPU time taken by the "
          "hypervisor during the run; others %: the machine's CPU time other processes used meanwhile (wall-clock "
          "figures drop as either rises).")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    main()
