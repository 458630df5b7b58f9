"""``read_landscape``: an ELSPETH Landscape SQLite file -> our audit tables as Arrow."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from elspeth_nb.audit.importers.elspeth import _derive, _sqlite
from elspeth_nb.audit.importers.elspeth._arrow import with_import_problems
from elspeth_nb.audit.importers.elspeth._model import LandscapeImport
from elspeth_nb.audit.importers.elspeth._payloads import MISMATCH, payload_table, read_refs, used_refs
from elspeth_nb.audit.importers.elspeth._payloads import payload_problems as payload_problems_of
from elspeth_nb.audit.schema import TABLES
from elspeth_nb.errors import AuditStoreError

#: ``runs.payload_mode`` of a run imported with its payload folder. ELSPETH keeps the source row only
#: (transform, coalesce and sink rows are hashes), which is neither our ``all`` (every node boundary)
#: nor ``boundaries`` (source, coalesce and sink rows).
SOURCE_PAYLOADS = "source"
#: ``runs.payload_mode`` of a run imported without its payload folder.
HASHES_ONLY = "hashes"


def read_landscape(
    db_path: str | Path,
    *,
    payloads: str | Path | None = None,
    run_ids: Sequence[str] | None = None,
) -> LandscapeImport:
    """Read ELSPETH runs (all, or ``run_ids``) read-only and convert them to our tables.

    ``payloads`` is ELSPETH's payload folder (``payload_store.base_path``); without it the
    import holds hashes only; a payload folder that is not there is an AuditStoreError. Non-fatal
    findings are listed in ``LandscapeImport.problems``.
    """
    db = Path(db_path)
    payload_dir = payload_folder(payloads)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    con, problems = _sqlite.open_checked(db)
    try:
        selected = _sqlite.select_runs(con, run_ids)
        problems += _sqlite.left_out(con, selected, all_runs=run_ids is None)
    finally:
        con.close()
    raw, found = _sqlite.read_tables(db, selected, all_runs=run_ids is None)
    problems += found
    timings["read_sqlite_s"] = time.perf_counter() - started
    tables, derive_problems, issues, pairs = _derive_with_payloads(db, raw, payload_dir)
    timings["derive_and_payloads_s"] = time.perf_counter() - started - timings["read_sqlite_s"]
    _derive.add_counts(tables, _mismatches_by_run(pairs, issues))
    timings["total_s"] = time.perf_counter() - started
    ordered = {name: tables[name] if name in tables else TABLES[name].schema.empty_table() for name in TABLES}
    shared = problems + derive_problems  # the database's and the conversion's: every run keeps them
    per_run = {run: list(shared) for run in selected}
    if payload_dir is not None:
        problems = shared + payload_problems_of(payload_dir, issues)
        refs = pairs.group_by("run_id").aggregate([("ref", "list")])
        for run, run_refs in zip(refs.column("run_id").to_pylist(), refs.column("ref_list").to_pylist(), strict=True):
            if run in per_run:
                per_run[run] += payload_problems_of(payload_dir, issues, set(run_refs))
    else:
        problems = shared
    ordered["runs"] = with_import_problems(ordered["runs"], per_run)
    return LandscapeImport(ordered, selected, problems, db.resolve(), payload_dir, issues, timings, per_run)


def _derive_with_payloads(db: Path, raw: dict[str, pa.Table], payload_dir: Path | None
                          ) -> tuple[dict[str, pa.Table], list[str], dict[str, str], pa.Table]:
    """Derive our tables while a second thread loads and verifies the payload files (DuckDB frees the GIL).

    Also returns the payload issues by ref and the (run_id, ref) pairs the runs use.
    """
    mode = SOURCE_PAYLOADS if payload_dir is not None else HASHES_ONLY
    with ThreadPoolExecutor(max_workers=1) as pool:
        loading = pool.submit(read_refs, payload_dir, used_refs(raw)) if payload_dir is not None else None
        tables, problems, pairs = _derive_all(db, raw, mode)
        loaded, issues = loading.result() if loading is not None else ({}, {})
    tables["payloads"] = payload_table(pairs, loaded)
    return tables, problems, issues, pairs


def _mismatches_by_run(pairs: pa.Table, issues: dict[str, str]) -> dict[str, list[str]]:
    """run id -> refs whose payload file did not hash to the ref: tampered, not purged; verify reports them."""
    wrong = [ref for ref, issue in issues.items() if issue == MISMATCH]
    if not wrong:
        return {}
    hit = pairs.filter(pc.is_in(pairs.column("ref"), pa.array(wrong, pa.string())))
    grouped = hit.group_by("run_id").aggregate([("ref", "list")])
    return dict(zip(grouped.column("run_id").to_pylist(), grouped.column("ref_list").to_pylist(), strict=True))


def _derive_all(db: Path, raw: dict[str, pa.Table], mode: str) -> tuple[dict[str, pa.Table], list[str], pa.Table]:
    """Our tables, the problems met, and the (run_id, ref) payload pairs, from one DuckDB connection."""
    duck = _derive.connect(raw)
    try:
        tables, problems = _derive.derive(duck, raw, producer=f"elspeth (imported from {db.name})", payload_mode=mode,
                                         pipeline_path=str(db.resolve()))
        return tables, problems, _derive.payload_refs(duck)
    except duckdb.Error as exc:  # a malformed value deep in the data: say which file, keep the cause
        raise AuditStoreError(f"{db} could not be converted: {exc}") from exc
    finally:
        duck.close()


def payload_folder(payloads: str | os.PathLike[str] | None) -> Path | None:
    """The payload folder asked for, resolved; one that is not there is an error, never a silent hashes-only read.

    A run whose payload files were purged keeps its folder; a missing folder is a wrong path (or one not
    copied), and reading on without it would answer every lineage with hashes only.
    """
    if payloads is None:
        return None
    hint = ("pass ELSPETH's payload folder (payload_store.base_path in its settings), or leave it out to read "
            "hashes only")
    if not str(payloads).strip():
        raise AuditStoreError(f"the payload folder is an empty path; {hint}")
    folder = Path(payloads).expanduser()
    if not folder.exists():
        raise AuditStoreError(f"payload folder {folder} does not exist; {hint}")
    if not folder.is_dir():
        raise AuditStoreError(f"payload folder {folder} is a file, not a folder; {hint}")
    return folder.resolve()
