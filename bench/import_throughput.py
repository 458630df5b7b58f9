"""Import throughput of ELSPETH Landscape files: ``read_landscape`` and ``import_into_store`` (with the
audit.duckdb update, and without it: ``sync_duckdb=False`` leaves it to ``elspeth-nb sync``).

Builds (and caches under ``bench/_stores/``) a Landscape of at least ``--rows`` source rows by
replicating a sample run's rows with fresh ids: rows, tokens, token_parents, token_outcomes,
node_states, routing_events, transform_errors and calls are copied with every id remapped
consistently (foreign keys hold), each copy's source rows get distinct content (``id`` shifted) so
every row has its own payload file, and the hashes of the copied states follow their rows.

    .venv/bin/python bench/import_throughput.py --rows 10000 [--rows 100000] [--sample DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import Conditions  # noqa: E402

from elspeth_nb.audit.hashing import canonical_bytes  # noqa: E402
from elspeth_nb.audit.importers.elspeth import import_into_store, read_landscape  # noqa: E402

SAMPLE = ROOT / "tests" / "data" / "elspeth" / "quorum2_nested_timeout5_lossy"
STORES = ROOT / "bench" / "_stores"

# table -> column -> how to rewrite it in copy k ("id": fresh id, "hash": the copy's row hash, "index": row_index)
REMAP: dict[str, dict[str, str]] = {
    "rows": {"row_id": "id", "row_index": "index", "source_data_hash": "hash", "source_data_ref": "hash"},
    "tokens": {"token_id": "id", "row_id": "id", "fork_group_id": "id", "join_group_id": "id", "expand_group_id": "id"},
    "token_parents": {"token_id": "id", "parent_token_id": "id"},
    "token_outcomes": {"outcome_id": "id", "token_id": "id", "fork_group_id": "id", "join_group_id": "id",
                       "expand_group_id": "id", "batch_id": "id"},
    "node_states": {"state_id": "id", "token_id": "id", "input_hash": "hash", "output_hash": "hash"},
    "routing_events": {"event_id": "id", "state_id": "id", "routing_group_id": "id"},
    "transform_errors": {"error_id": "id", "token_id": "id"},
    "calls": {"call_id": "id", "state_id": "id"},
}


# a second run in the same file: every table of the run, ids fresh, run_id replaced (see add_run_copy)
RUN_REMAP: dict[str, dict[str, str]] = {
    **{t: {c: h for c, h in m.items() if h == "id"} for t, m in REMAP.items()},
    "runs": {}, "nodes": {}, "edges": {"edge_id": "id"}, "operations": {"operation_id": "id"},
    "artifacts": {"artifact_id": "id", "produced_by_state_id": "id"},
    "validation_errors": {"error_id": "id"},
}
RUN_REMAP["routing_events"]["edge_id"] = "id"
RUN_REMAP["calls"]["operation_id"] = "id"


def fresh(value: str | None, k: int | str) -> str | None:
    """A new id for ``value`` in copy ``k``, same length and prefix (``out_``, ``terr_``...)."""
    if value is None:
        return None
    prefix = value[: value.index("_") + 1] if "_" in value else ""
    digest = hashlib.sha256(f"{k}:{value}".encode()).hexdigest()
    return prefix + digest[: max(len(value) - len(prefix), 12)]


def build_landscape(rows: int, sample: Path = SAMPLE, stores: Path = STORES) -> tuple[Path, Path]:
    """The cached Landscape of >= ``rows`` source rows (db path, payload folder); built if missing."""
    target = stores / f"landscape_{sample.name}_{rows}"
    db, payloads = target / "audit.db", target / "payloads"
    if db.exists() and (target / "DONE").exists():
        return db, payloads
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copyfile(sample / "audit.db", db)
    shutil.copytree(sample / "payloads", payloads, copy_function=shutil.copyfile)
    for folder in [payloads, *payloads.iterdir()]:
        folder.chmod(0o755)
    shutil.copyfile(sample / "output.jsonl", target / "output.jsonl")
    con = sqlite3.connect(db)
    con.create_function("fresh", 2, fresh, deterministic=True)
    con.execute("ATTACH DATABASE ? AS src", (f"file:{sample / 'audit.db'}?mode=ro&immutable=1",))
    base = con.execute("SELECT count(*) FROM src.rows").fetchone()[0]
    for k in range(1, -(-rows // base)):
        _copy(con, k, base, payloads, sample / "payloads")
    con.commit()
    con.execute("DETACH DATABASE src")
    con.execute("PRAGMA journal_mode = DELETE")  # no -wal beside the file: it reads as immutable
    con.close()
    (target / "DONE").write_text("ok\n")
    return db, payloads


def _copy(con: sqlite3.Connection, k: int, base: int, payloads: Path, source_payloads: Path) -> None:
    con.execute("CREATE TEMP TABLE IF NOT EXISTS hashmap (old TEXT PRIMARY KEY, new TEXT)")
    con.execute("DELETE FROM temp.hashmap")
    pairs = []
    for (ref,) in con.execute("SELECT source_data_ref FROM src.rows"):
        row = json.loads((source_payloads / ref[:2] / ref).read_bytes())
        row["id"] = row.get("id", 0) + k * base
        data = canonical_bytes(row)
        new = hashlib.sha256(data).hexdigest()
        (payloads / new[:2]).mkdir(exist_ok=True)
        (payloads / new[:2] / new).write_bytes(data)
        pairs.append((ref, new))
    con.executemany("INSERT INTO temp.hashmap VALUES (?, ?)", pairs)
    for table, remap in REMAP.items():
        _insert_copy(con, table, remap, k, k * base)


def _insert_copy(con: sqlite3.Connection, table: str, remap: dict[str, str], k: int | str, shift: int,
                 run_id: str | None = None) -> None:
    """INSERT a copy of ``src.<table>`` with its columns rewritten as ``remap`` says."""
    cols = [r[1] for r in con.execute(f"PRAGMA src.table_info({table})")]
    exprs = []
    for c in cols:
        how = remap.get(c)
        if c == "run_id" and run_id is not None:
            exprs.append(f"'{run_id}'")
        elif how == "id":
            exprs.append(f"fresh({c}, '{k}')")
        elif how == "index":
            exprs.append(f"{c} + {shift}")
        elif how == "hash":
            exprs.append(f"coalesce((SELECT new FROM temp.hashmap WHERE old = t.{c}), t.{c})")
        else:
            exprs.append(c)
    con.execute(f"INSERT INTO main.{table} ({', '.join(cols)}) SELECT {', '.join(exprs)} FROM src.{table} t")


def add_run_copy(db: Path, run_id: str) -> None:
    """Append a copy of the file's (single) run under ``run_id``, every id fresh: a two-run Landscape."""
    snapshot = db.with_name(db.name + ".snapshot")
    shutil.copy(db, snapshot)
    con = sqlite3.connect(db)
    con.create_function("fresh", 2, fresh, deterministic=True)
    con.execute("ATTACH DATABASE ? AS src", (f"file:{snapshot}?mode=ro&immutable=1",))
    for table, remap in RUN_REMAP.items():
        _insert_copy(con, table, remap, run_id, 0, run_id=run_id)
    con.commit()
    con.execute("DETACH DATABASE src")
    con.execute("PRAGMA journal_mode = DELETE")
    con.close()
    snapshot.unlink()


def _best(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def bench(rows: int, sample: Path, repeat: int) -> dict[str, float]:
    """Build/reuse the Landscape, then time read_landscape and import_into_store (best of ``repeat``)."""
    t0 = time.perf_counter()
    db, payloads = build_landscape(rows, sample)
    built = time.perf_counter() - t0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    n_rows = con.execute("SELECT count(*) FROM rows").fetchone()[0]
    n_records = sum(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in REMAP)
    con.close()
    read_s, imported = _best(lambda: read_landscape(db, payloads=payloads), repeat)
    hashes_s, _ = _best(lambda: read_landscape(db), repeat)
    conditions = Conditions().start()
    with tempfile.TemporaryDirectory(dir=STORES) as tmp:
        store_s, report = _best(lambda: import_into_store(db, Path(tmp) / "audit", payloads=payloads), repeat)
    conditions.stop()
    with tempfile.TemporaryDirectory(dir=STORES) as tmp:  # Parquet complete, audit.duckdb left for `sync`
        parquet_s, _ = _best(lambda: import_into_store(db, Path(tmp) / "audit", payloads=payloads,
                                                       sync_duckdb=False), repeat)
    out = {
        "source_rows": n_rows, "landscape_records": n_records, "build_or_cache_s": round(built, 2),
        "read_landscape_s": round(read_s, 3), "read_landscape_rows_per_s": round(n_rows / read_s),
        "read_landscape_hashes_only_rows_per_s": round(n_rows / hashes_s),
        "import_into_store_s": round(store_s, 3), "import_into_store_rows_per_s": round(n_rows / store_s),
        "import_without_duckdb_s": round(parquet_s, 3), "import_without_duckdb_rows_per_s": round(n_rows / parquet_s),
        "import_phases_s_last_run": {k: round(v, 2) for k, v in report.timings.items()},  # type: ignore[attr-defined]
        "imported_records": sum(t.num_rows for t in imported.tables.values()),  # type: ignore[attr-defined]
        "problems": len(imported.problems),  # type: ignore[attr-defined]
        "import_into_store_cpu_us_per_row": round(1e6 * conditions.cpu_s / repeat / n_rows),
        "cpu_steal_pct_during_import": None if conditions.steal_pct is None else round(conditions.steal_pct, 1),
        "other_processes_cpu_pct_during_import": None if conditions.others_pct is None
        else round(conditions.others_pct, 1),
    }
    print(report)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", action="extend", help="source rows (>= 10000 for the target)")
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="ELSPETH sample folder to replicate")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions; the best is reported")
    args = parser.parse_args(argv)
    STORES.mkdir(parents=True, exist_ok=True)
    target = 20_000
    for rows in args.rows or [10_000]:
        result = bench(rows, args.sample, args.repeat)
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        for key in ("read_landscape_rows_per_s", "import_into_store_rows_per_s", "import_without_duckdb_rows_per_s"):
            verdict = "meets" if result[key] >= target else "BELOW"
            print(f"{key}: {result[key]:,} source rows/s ({verdict} the {target:,} rows/s target)")
    sizes = " ".join(str(r) for r in args.rows or [10_000])
    print(f"rerun: .venv/bin/python bench/import_throughput.py --rows {sizes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
