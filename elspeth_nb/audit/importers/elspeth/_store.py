"""``import_into_store``: imported runs -> Parquet segments of an audit store, swapped in atomically per run.

A run's new segments are written under ``<store>/.import-staging/<run_id>.<nonce>/`` first. Once they
are complete (and fsynced) a ``READY`` marker is written, then each table's partition is swapped:
the old ``run_id=<id>`` folder is moved into the staging folder, the new one moved into place. A
crash before ``READY`` leaves the old run untouched (the staging folder is deleted on the next
import); a crash after it is rolled forward by the next import. Re-importing a run therefore
replaces it and never duplicates it; audit.duckdb is then brought up to date for those runs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from elspeth_nb.audit.importers.elspeth._arrow import with_import_problems
from elspeth_nb.audit.importers.elspeth._model import ImportReport, LandscapeImport
from elspeth_nb.audit.importers.elspeth._read import read_landscape
from elspeth_nb.audit.integrity import run_root
from elspeth_nb.audit.schema import PARTITION_COLUMN, TABLES
from elspeth_nb.audit.store import AuditStore, check_duckdb_update
from elspeth_nb.audit.writer import ParquetSegmentWriter, partition_dir
from elspeth_nb.errors import AuditStoreError

STAGING = ".import-staging"
READY = "READY"


def import_into_store(
    db_path: str | Path,
    audit_dir: str | Path,
    *,
    payloads: str | Path | None = None,
    run_ids: Sequence[str] | None = None,
    sync_duckdb: bool | str = True,
) -> ImportReport:
    """Import ELSPETH runs into the audit store at ``audit_dir``, replacing earlier imports of them.

    ``sync_duckdb``: True brings audit.duckdb up to date before returning; ``"background"`` leaves
    that to a detached process; False leaves the runs pending for ``elspeth-nb sync``. Until then
    readers answer from the Parquet segments, which are complete when this returns.
    """
    check_duckdb_update(sync_duckdb)
    started = time.perf_counter()
    imported = read_landscape(db_path, payloads=payloads, run_ids=run_ids)
    store = AuditStore.create(audit_dir)
    timings = {k: v for k, v in imported.timings.items() if k != "total_s"}
    writing = time.perf_counter()
    problems = list(imported.problems)
    with store.importing():
        recover_staging(store)
        for run_id in imported.run_ids:
            dropped = _payloads_dropped(store, imported, run_id)
            problems += dropped
            store.mark_pending(run_id)  # a re-import: from the swap on, audit.duckdb's rows of the run are stale
            try:
                with store.writing(run_id):
                    _replace_run(store, imported, run_id, [*imported.problems_of(run_id), *dropped])
            except BlockingIOError as exc:
                raise AuditStoreError(f"run {run_id} is being written to {store.root} by another process; "
                                      "import it again when that process has finished") from exc
    timings["write_parquet_s"] = time.perf_counter() - writing
    update = store.update_duckdb(imported.run_ids, sync_duckdb)
    if sync_duckdb is True:
        timings["sync_duckdb_s"] = update.seconds
    return ImportReport(
        db_path=Path(db_path), audit_dir=store.root, run_ids=list(imported.run_ids),
        source_rows=imported.source_rows, records=imported.records, seconds=time.perf_counter() - started,
        problems=problems, duckdb_message=update.message, timings=timings,
    )


def _payloads_dropped(store: AuditStore, imported: LandscapeImport, run_id: str) -> list[str]:
    """A re-import without payloads replaces a run that had them: say so (the run becomes hashes only)."""
    if _run_rows(imported.tables["payloads"], run_id).num_rows:
        return []
    before = sum(pq.read_metadata(f).num_rows
                 for f in partition_dir(store.parquet_root, "payloads", run_id).glob("part-*.parquet"))
    if not before:
        return []
    return [f"run {run_id}: re-imported without payloads, so the {before} payload(s) imported earlier are "
            "replaced by hashes only; import again with --payloads to keep them"]


def _replace_run(store: AuditStore, imported: LandscapeImport, run_id: str, problems: list[str]) -> None:
    """Stage the run's segments, mark them complete, then swap every table's partition.

    The run's row keeps ``problems``, the import's findings, so the store still shows them once the
    import report is gone.
    """
    staging = store.root / STAGING / f"{run_id}.{uuid.uuid4().hex[:12]}"
    batches = {name: _run_rows(imported.tables[name], run_id) for name in TABLES}
    staged = [name for name in TABLES if batches[name].num_rows or name == "segment_digests"]
    by_size = sorted((n for n in staged if n not in ("runs", "segment_digests")), key=lambda n: -batches[n].nbytes)
    with ThreadPoolExecutor(max_workers=2) as pool:  # pyarrow writes Parquet without the GIL
        list(pool.map(lambda lane: _write(staging, run_id, lane[1], batches, f"t{lane[0]}-"),
                      enumerate((by_size[0::2], by_size[1::2]))))
    _write_runs_with_root(staging, run_id, with_import_problems(batches["runs"], problems))
    marker = staging / f".{READY}.tmp"
    marker.write_text(json.dumps({"run_id": run_id, "staged": staged}))
    os.replace(marker, staging / READY)
    _fsync_dir(staging)
    _swap(store, staging)


def _write(staging: Path, run_id: str, names: list[str], batches: dict[str, pa.Table], prefix: str) -> None:
    """One writer per thread, each with its own tables and part-name prefix (its digests file too)."""
    writer = ParquetSegmentWriter(staging / "parquet", part_prefix=prefix)
    for name in names:
        writer.write_segment(TABLES[name], run_id, batches[name].select(TABLES[name].file_columns))
    writer.close()


def _write_runs_with_root(staging: Path, run_id: str, runs: pa.Table) -> None:
    """The imported run rows, carrying the Merkle root of the segments staged for the run and of its latest row."""
    latest = max(runs.to_pylist(), key=lambda row: int(row["revision"] or 0))
    root = run_root(AuditStore(staging).segment_digests(run_id), (run_id, latest))
    runs = runs.set_column(runs.schema.get_field_index("merkle_root"), "merkle_root",
                           pa.array([root] * runs.num_rows, pa.string()))
    writer = ParquetSegmentWriter(staging / "parquet", part_prefix="r-")
    writer.write_segment(TABLES["runs"], run_id, runs.select(TABLES["runs"].file_columns))
    writer.close()


def _run_rows(table: pa.Table, run_id: str) -> pa.Table:
    """The table's rows of ``run_id``; the table itself when every row is (no copy: a one-run import)."""
    mine = pc.equal(table.column(PARTITION_COLUMN), run_id)
    if pc.all(mine, skip_nulls=False).as_py() is True:
        return table
    return table.filter(mine)


def _swap(store: AuditStore, staging: Path) -> str:
    """Move each table's old partition aside and the staged one into place; safe to repeat after a crash.

    A table listed as staged is done once its staged folder is gone; a table with no new rows only
    needs its old partition (if any) moved away. Returns the run id.
    """
    plan = json.loads((staging / READY).read_text())
    run_id, staged_tables = plan["run_id"], set(plan["staged"])
    old_root = staging / "old"
    old_root.mkdir(exist_ok=True)
    for name in TABLES:
        final = partition_dir(store.parquet_root, name, run_id)
        staged = partition_dir(staging / "parquet", name, run_id)
        if name in staged_tables and not staged.exists():
            continue  # swapped before a crash
        if final.exists():
            os.replace(final, old_root / name)
        if staged.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
    shutil.rmtree(staging)
    return str(run_id)


def recover_staging(store: AuditStore) -> list[str]:
    """Finish swaps a crash interrupted (READY present) and drop incomplete stagings; returns run ids finished."""
    root = store.root / STAGING
    finished: list[str] = []
    if not root.is_dir():
        return finished
    for staging in sorted(root.iterdir()):
        if (staging / READY).exists():
            finished.append(_swap(store, staging))
        else:
            shutil.rmtree(staging, ignore_errors=True)
    return finished


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
