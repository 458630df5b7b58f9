"""Result objects of the ELSPETH importer: what was read, and what an import into a store did."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

#: Problems listed one by one before the rest are summarised in a single line.
MAX_LISTED_PROBLEMS = 25


@dataclass
class LandscapeImport:
    """ELSPETH runs converted to our audit tables (full schemas, ``run_id`` included)."""

    tables: dict[str, pa.Table]
    run_ids: list[str]
    problems: list[str] = field(default_factory=list)
    db_path: Path | None = None
    payload_dir: Path | None = None
    #: payload ref -> ``purged`` (file missing), ``mismatch`` (bytes do not hash to the ref) or ``invalid``.
    payload_issues: dict[str, str] = field(default_factory=dict)
    #: seconds spent reading SQLite, deriving our tables and loading payloads.
    timings: dict[str, float] = field(default_factory=dict)
    #: run id -> the problems that concern it: the database's and the conversion's, and its own payloads'.
    run_problems: dict[str, list[str]] = field(default_factory=dict)

    def problems_of(self, run_id: str) -> list[str]:
        """The problems a run keeps in ``runs.import_problems_json`` (every problem if not known per run)."""
        return self.run_problems.get(run_id, self.problems)

    @property
    def source_rows(self) -> int:
        return int(self.tables["rows"].num_rows)

    @property
    def records(self) -> int:
        return sum(int(t.num_rows) for t in self.tables.values())

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}={t.num_rows}" for name, t in self.tables.items() if t.num_rows)
        return (f"LandscapeImport({len(self.run_ids)} run(s) from {self.db_path}, {counts}; "
                f"{len(self.problems)} problem(s))")


@dataclass
class ImportReport:
    """What ``import_into_store`` wrote: runs, rows, time, and the non-fatal problems found."""

    db_path: Path
    audit_dir: Path
    run_ids: list[str]
    source_rows: int
    records: int
    seconds: float
    problems: list[str]
    duckdb_message: str = ""
    #: seconds per phase: reading SQLite, deriving tables and payloads, writing Parquet, updating audit.duckdb.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.source_rows / self.seconds if self.seconds > 0 else float("inf")

    def __repr__(self) -> str:
        lines = [
            f"ImportReport: {len(self.run_ids)} run(s) from {self.db_path.name} into {self.audit_dir}",
            f"  runs: {', '.join(self.run_ids) or '-'}",
            f"  {self.source_rows:,} source rows, {self.records:,} records in {self.seconds:.2f} s "
            f"({self.rows_per_s:,.0f} source rows/s)",
        ]
        if self.timings:
            lines.append("  phases: " + ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {seconds:.2f} s"
                                                   for name, seconds in self.timings.items()))
        lines.append(f"  problems: {len(self.problems)}")
        lines += [f"    - {p}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if self.duckdb_message:
            lines.append(f"  duckdb: {self.duckdb_message}")
        return "\n".join(lines)

    __str__ = __repr__


def capped(problems: list[str], what: str) -> list[str]:
    """``problems`` with everything past the first few folded into one summary line."""
    if len(problems) <= MAX_LISTED_PROBLEMS:
        return problems
    rest = len(problems) - MAX_LISTED_PROBLEMS
    return [*problems[:MAX_LISTED_PROBLEMS], f"... and {rest} more {what}"]
