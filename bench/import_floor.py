"""The least work any import of an ELSPETH Landscape must do on this machine, timed piece by piece.

An import reads every Landscape table, verifies every source-row payload file (read it, SHA-256 it)
and writes the imported records as Parquet. This script times each of those three alone, with the
fastest means at hand and no derivation in between, on the same replicated Landscape as
``import_throughput.py``:

- **read**: ``SELECT *`` of every table through the ADBC SQLite driver into Arrow, two tables at a time;
- **payloads**: open, read and SHA-256 every source row's payload file (one thread: the fastest here);
- **parquet**: write the records an import produced (loaded into memory first, not timed) with the
  store's writer settings, two tables at a time.

The ceiling is the source rows per second an import could reach if it did nothing else and kept
both cores busy throughout: ``rows / (CPU seconds of the three pieces / cores)``. It is an upper
bound; the real import also derives coalesce events, lineage links and the audit.duckdb copy.

    .venv/bin/python bench/import_floor.py --rows 100000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from import_throughput import SAMPLE, STORES, build_landscape  # noqa: E402

from elspeth_nb.audit.importers.elspeth import import_into_store  # noqa: E402
from elspeth_nb.audit.importers.elspeth._sqlite import _READ_ORDER, sqlite_uri  # noqa: E402
from elspeth_nb.audit.schema import TABLES  # noqa: E402
from elspeth_nb.audit.writer import ROW_GROUP_ROWS, dictionary_columns, statistics_columns  # noqa: E402

TARGET = 20_000
THREADS = 2


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(work: Callable[[], int]) -> tuple[float, float, int]:
    """(wall s, CPU s of this process, what ``work()`` returned)."""
    wall, cpu = time.perf_counter(), _cpu_s()
    counted = work()
    return time.perf_counter() - wall, _cpu_s() - cpu, counted


def read_tables(db: Path) -> int:
    """Every Landscape table, all columns, into Arrow: records read."""
    import adbc_driver_sqlite.dbapi as adbc

    uri = sqlite_uri(db)

    def one(table: str) -> int:
        with adbc.connect(uri) as con, con.cursor() as cursor:
            cursor.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": "65536"})
            cursor.execute(f'SELECT * FROM "{table}"')
            return int(cursor.fetch_arrow_table().num_rows)

    with ThreadPoolExecutor(THREADS) as pool:
        return sum(pool.map(one, _READ_ORDER))


def verify_payloads(payload_dir: Path, refs: list[str]) -> int:
    """Read and SHA-256 every payload file named by ``refs``: files whose bytes match their ref.

    One thread: two threads took 3x the wall time here (the kernel's file lookups contend).
    """
    base, matched = str(payload_dir), 0
    for ref in refs:
        with open(f"{base}/{ref[:2]}/{ref}", "rb") as handle:
            matched += hashlib.sha256(handle.read()).hexdigest() == ref
    return matched


def imported_tables(db: Path, payload_dir: Path, work: Path) -> dict[str, pa.Table]:
    """The records one real import writes, per table, read back into memory (not timed)."""
    store = work / "audit"
    import_into_store(db, store, payloads=payload_dir, sync_duckdb=False)
    tables = {}
    for name, table in TABLES.items():
        folder = store / "parquet" / name
        if folder.is_dir():
            tables[name] = ds.dataset(folder, format="parquet", schema=table.file_schema).to_table()
    return tables


def write_parquet(tables: dict[str, pa.Table]) -> int:
    """Write each table once as the store's writer does (zstd 1, its dictionaries and statistics): bytes written."""
    def one(name: str) -> int:
        sink = pa.BufferOutputStream()
        pq.write_table(tables[name], sink, compression="zstd", compression_level=1, row_group_size=ROW_GROUP_ROWS,
                       use_dictionary=dictionary_columns(TABLES[name]),
                       write_statistics=statistics_columns(TABLES[name]), store_schema=False)
        return int(sink.getvalue().size)

    with ThreadPoolExecutor(THREADS) as pool:
        return sum(pool.map(one, sorted(tables, key=lambda n: -tables[n].num_rows)))


def measure(rows: int, repeat: int, stores: Path = STORES) -> dict[str, tuple[float, float, int]]:
    """Piece -> (wall s, CPU s, what it counted: records read, payload files verified, Parquet bytes)."""
    db, payload_dir = build_landscape(rows, SAMPLE, stores)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        refs = [r for (r,) in con.execute(
            "SELECT DISTINCT source_data_ref FROM rows WHERE source_data_ref IS NOT NULL")]
    work = Path(tempfile.mkdtemp(dir=stores))
    try:
        tables = imported_tables(db, payload_dir, work)
        pieces: dict[str, Callable[[], int]] = {
            "read every Landscape table (ADBC)": lambda: read_tables(db),
            f"read + SHA-256 {len(refs):,} payload files": lambda: verify_payloads(payload_dir, refs),
            f"write {sum(t.num_rows for t in tables.values()):,} records as Parquet": lambda: write_parquet(tables),
        }
        return {label: min((_timed(piece) for _ in range(repeat)), key=lambda t: t[1])
                for label, piece in pieces.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="source rows of the replicated Landscape")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions of each piece; the least CPU is kept")
    parser.add_argument("--stores", type=Path, default=STORES, help="where the replicated Landscape is cached")
    args = parser.parse_args(argv)
    args.stores.mkdir(parents=True, exist_ok=True)
    figures = measure(args.rows, args.repeat, args.stores)
    cores = os.cpu_count() or 1
    print(f"{args.rows:,} source rows, {cores} CPUs, best of {args.repeat}")
    print(f"{'piece':48s} {'wall s':>8s} {'CPU s':>8s} {'CPU us/row':>11s}")
    for label, (wall, cpu, _) in figures.items():
        print(f"{label:48s} {wall:8.2f} {cpu:8.2f} {1e6 * cpu / args.rows:11.0f}")
    total_wall = sum(wall for wall, _, _ in figures.values())
    total_cpu = sum(cpu for _, cpu, _ in figures.values())
    print(f"{'sum':48s} {total_wall:8.2f} {total_cpu:8.2f} {1e6 * total_cpu / args.rows:11.0f}")
    ceiling = args.rows / (total_cpu / cores)
    verdict = "above" if ceiling >= TARGET else "BELOW"
    print(f"ceiling with {cores} cores busy throughout: {ceiling:,.0f} source rows/s "
          f"({verdict} the {TARGET:,} target); sequential pieces: {args.rows / total_wall:,.0f} rows/s")
    print(f"rerun: .venv/bin/python bench/import_floor.py --rows {args.rows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
