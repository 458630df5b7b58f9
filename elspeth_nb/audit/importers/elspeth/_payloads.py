"""ELSPETH's content-addressed payload store: ``<dir>/<ref[:2]>/<ref>`` holds bytes whose SHA-256 is ``ref``.

Every ref is re-verified on load. A missing file means the payload was purged (ELSPETH keeps the ref
when it purges), a file whose bytes hash to something else is reported and left out.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from elspeth_nb.audit.importers.elspeth._model import capped
from elspeth_nb.audit.schema import PARTITION_COLUMN, TABLES

_REF = re.compile(r"^[0-9a-f]{64}$")
_sha256 = hashlib.sha256
PURGED, MISMATCH, INVALID = "purged", "mismatch", "invalid"


def payload_path(payload_dir: Path, ref: str) -> Path:
    """Where ELSPETH's filesystem payload store keeps ``ref``."""
    return payload_dir / ref[:2] / ref


def used_refs(raw: dict[str, pa.Table]) -> list[str]:
    """Every distinct payload ref of the raw Landscape tables (rows, routing events, operations, calls)."""
    columns = {"rows": ("source_data_ref",), "routing_events": ("reason_ref",),
               "operations": ("input_data_ref", "output_data_ref"), "calls": ("request_ref", "response_ref")}
    found: set[str] = set()
    for table, names in columns.items():
        for name in names:
            found.update(v for v in pc.unique(raw[table].column(name)).to_pylist() if v is not None)
    return sorted(found)


def read_refs(payload_dir: Path, refs: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(ref -> verified text, ref -> issue). One plain loop: a thread pool only adds GIL contention here."""
    loaded: dict[str, str] = {}
    issues: dict[str, str] = {}
    base = str(payload_dir)
    for ref in refs:
        text, issue = _load(base, ref)
        if issue is None:
            loaded[ref] = text  # type: ignore[assignment]
        else:
            issues[ref] = issue
    return loaded, issues


def payload_table(pairs: pa.Table, loaded: dict[str, str]) -> pa.Table:
    """The ``payloads`` table: one row per (run_id, ref) pair whose payload was loaded and verified."""
    refs = pairs.column("ref").to_pylist()
    kept = pairs.filter(pa.array([ref in loaded for ref in refs], pa.bool_()))
    hashes = kept.column("ref").to_pylist()
    return pa.Table.from_arrays(
        [pa.array(hashes, pa.string()), pa.array([loaded[h] for h in hashes], pa.string()),
         kept.column(PARTITION_COLUMN).cast(pa.string())],
        schema=TABLES["payloads"].schema,
    )


def payload_problems(payload_dir: Path, issues: dict[str, str], refs: set[str] | None = None) -> list[str]:
    """One line per payload that did not load (of ``refs`` only, when given), the first few listed."""
    return capped([_problem(payload_dir, ref, issue) for ref, issue in sorted(issues.items())
                   if refs is None or ref in refs], "payload problems")


def _load(base: str, ref: str) -> tuple[str | None, str | None]:
    """(text, issue): the verified text, or why it is not there."""
    if not _REF.match(ref):
        return None, INVALID
    try:
        with open(f"{base}/{ref[:2]}/{ref}", "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None, PURGED
    except OSError:
        return None, INVALID
    if _sha256(data).hexdigest() != ref:
        return None, MISMATCH
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, INVALID


def _problem(payload_dir: Path, ref: str, issue: str) -> str:
    if issue == PURGED:
        return f"payload {ref} is purged or missing (no file {payload_path(payload_dir, ref)})"
    if issue == MISMATCH:
        return f"payload {ref} hash mismatch: the bytes of {payload_path(payload_dir, ref)} do not hash to its ref"
    return f"payload ref {ref!r} is invalid or unreadable (not a 64-hex ref, or not UTF-8 text)"
