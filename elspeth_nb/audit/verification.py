"""Verify a run against its Merkle root and name the first table and record that no longer match.

The root is recomputed from the segment files as they are now. When a segment's bytes changed,
the stored record fingerprints locate what happened in it: a changed record, a missing or an
added one, or records that moved. A root saved earlier (``expected_root``) proves the run,
digests included, was not changed since it was saved.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from elspeth_nb.audit.integrity import (
    SegmentDigest,
    covers_run_row,
    fingerprints,
    ordered,
    run_root,
    unpack_fingerprints,
)
from elspeth_nb.audit.schema import DIGESTED_TABLES, PARTITION_COLUMN, TABLES
from elspeth_nb.audit.store import AuditStore, latest_run_rows, read_segment
from elspeth_nb.audit.writer import partition_dir


@dataclass(frozen=True)
class Finding:
    """One thing that no longer matches: where, which record (when it can be told), what."""

    table: str
    part_file: str | None
    record: str | None
    kind: str
    detail: str


@dataclass
class RunVerification:
    """The outcome of :func:`verify_run`."""

    run_id: str
    stored_root: str | None
    computed_root: str | None
    expected_root: str | None = None
    findings: list[Finding] = field(default_factory=list)
    segments: int = 0

    @property
    def ok(self) -> bool:
        roots_agree = self.stored_root is not None and self.computed_root == self.stored_root
        expected = self.expected_root is None or self.expected_root == self.computed_root
        return not self.findings and roots_agree and expected


def verify_run(store: AuditStore, run_id: str, expected_root: str | None = None) -> RunVerification:
    """Recompute the run's Merkle root from its segment files and locate every difference."""
    runs = latest_run_rows(store)
    row = runs.get(run_id)
    stored_root = row.get("merkle_root") if row is not None else None
    run = (run_id, row) if row is not None and covers_run_row(row) else None
    digests = ordered(store.segment_digests(run_id))
    result = RunVerification(run_id, stored_root, None, expected_root, segments=len(digests))  # type: ignore[arg-type]
    if not digests:
        if stored_root is not None:
            result.findings.append(Finding("segment_digests", None, None, "no_digests", "its segment digests are "
                                           "gone, yet it was sealed with a Merkle root (removed or tampered with)"))
        elif run is not None and run[1].get("status") in ("completed", "failed"):  # not one found dead later
            result.findings.append(Finding("runs", None, None, "seal_removed", "its Merkle root and segment digests "
                                           "are gone, yet a run that finished in this schema is always sealed"))
        else:
            result.findings.append(Finding("segment_digests", None, None, "no_digests",
                                           "the run has no segment digests (it is still running or was interrupted)"))
        result.findings += _alias_partitions(store, run_id) + _ambiguous_run_rows(store, run_id)
        return result
    stored_prints = _stored_fingerprints(store, run_id)
    written_as = {d.file_sha256: d for d in digests}
    recomputed = []
    for digest in digests:
        path = partition_dir(store.parquet_root, digest.table_name, run_id) / digest.part_file
        actual = _file_sha256(path)
        prints, prints_sha256 = stored_prints.get((digest.table_name, digest.part_file), (None, None))
        if digest.fingerprints_sha256 is not None and prints_sha256 != digest.fingerprints_sha256:
            result.findings.append(Finding("segment_digests", digest.part_file, None, "fingerprints_changed",
                                           f"the record fingerprints of {digest.table_name} no longer match their "
                                           "hash, so they cannot locate a changed record"))
            prints = None
        recomputed.append(SegmentDigest(digest.table_name, digest.part_file, digest.record_count, actual or "missing",
                                        prints_sha256 if digest.fingerprints_sha256 is not None else None))
        other = written_as.get(actual) if actual is not None else None
        if actual != digest.file_sha256 and other is not None:  # files swapped or copied over: say which
            result.findings.append(Finding(digest.table_name, digest.part_file, None, "segment_replaced",
                                           f"the file holds the bytes written as {other.table_name}/{other.part_file}"))
        elif actual != digest.file_sha256:
            result.findings.append(_locate(path, digest, prints))
    result.findings += _unlisted_segments(store, run_id, digests)
    result.findings += _alias_partitions(store, run_id) + _ambiguous_run_rows(store, run_id)
    result.computed_root = run_root(recomputed, run)
    if stored_root is not None and run_root(digests, run) != stored_root:
        what = "the segment digests and the run's own row (status, configuration, counts, error)" if run else \
            "the segment digests"
        result.findings.append(Finding("segment_digests", None, None, "digests_changed",
                                       f"{what} no longer give runs.merkle_root: one of them or the stored root "
                                       "was changed"))
    if expected_root is not None and result.computed_root != expected_root:
        result.findings.append(Finding("runs", None, None, "root_changed",
                                       f"the Merkle root is {result.computed_root}, not the expected {expected_root}"))
    return result


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _stored_fingerprints(store: AuditStore, run_id: str) -> dict[tuple[str, str], tuple[list[int], str]]:
    """(table, part file) -> (stored record fingerprints, SHA-256 of them as they are now)."""
    table = store.read_partition("segment_digests", run_id).select(["table_name", "part_file", "fingerprints"])
    return {(r["table_name"], r["part_file"]): (unpack_fingerprints(r["fingerprints"] or b""),
                                                hashlib.sha256(r["fingerprints"] or b"").hexdigest())
            for r in table.to_pylist()}


def _locate(path: Path, digest: SegmentDigest, stored: list[int] | None) -> Finding:
    """Which record of a changed segment no longer matches (or why that cannot be told)."""
    where = (digest.table_name, digest.part_file)
    if not path.is_file():
        return Finding(*where, None, "segment_missing", f"{path} is gone")
    try:
        records = pq.read_table(path, schema=TABLES[digest.table_name].file_schema)
    except (OSError, pa.ArrowException) as exc:
        return Finding(*where, None, "segment_unreadable", f"the file's bytes changed and it no longer reads: {exc}")
    if stored is None:
        return Finding(*where, None, "bytes_changed", "the file's bytes changed")
    actual = fingerprints(records).to_pylist()
    return _compare(records, digest, stored, actual)


def _compare(records: pa.Table, digest: SegmentDigest, stored: list[int], actual: list[int]) -> Finding:
    where = (digest.table_name, digest.part_file)
    first = next((i for i, (a, b) in enumerate(zip(stored, actual, strict=False)) if a != b), None)
    if first is None and len(actual) == len(stored):
        return Finding(*where, None, "bytes_changed", "the file's bytes changed but every record reads the same")
    if len(actual) < len(stored):
        position = first if first is not None else len(actual)
        return Finding(*where, f"position {position}", "record_missing",
                       f"{len(stored) - len(actual)} record(s) missing; the first at position {position}")
    if len(actual) > len(stored):
        position = first if first is not None else len(stored)
        return Finding(*where, _key(digest.table_name, records, position), "record_added",
                       f"{len(actual) - len(stored)} record(s) added; the first at position {position}")
    assert first is not None
    if sorted(stored) == sorted(actual):
        return Finding(*where, _key(digest.table_name, records, first), "records_moved",
                       f"records were reordered; the first moved record is at position {first}")
    return Finding(*where, _key(digest.table_name, records, first), "record_changed",
                   f"the record at position {first} changed")


def _key(table: str, records: pa.Table, position: int) -> str:
    """The record at ``position`` named by its table's key columns."""
    row = records.slice(position, 1).to_pylist()[0]
    return ", ".join(f"{k}={row[k]}" for k in TABLES[table].key if k in row) or f"position {position}"


def _unlisted_segments(store: AuditStore, run_id: str, digests: list[SegmentDigest]) -> list[Finding]:
    """Segment files on disk that the run never wrote (added afterwards)."""
    listed = {(d.table_name, d.part_file) for d in digests}
    found = []
    for table in DIGESTED_TABLES:
        directory = partition_dir(store.parquet_root, table, run_id)
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("part-*.parquet")):
            if (table, path.name) not in listed:
                found.append(Finding(table, path.name, None, "segment_added",
                                     "no segment digest of the run lists it: added after the run, or the "
                                     "segment_digests file that listed it was removed"))
    return found


def _alias_partitions(store: AuditStore, run_id: str) -> list[Finding]:
    """Partition folders that readers decode to ``run_id`` (``run_id=...%31``) but that are not its folder.

    Readers take the run id from the folder name, percent-decoded as Hive partitions are, so records
    in such a folder read as the run's own; the run itself never writes there.
    """
    found = []
    own = f"{PARTITION_COLUMN}={run_id}"
    for table in TABLES:
        directory = store.parquet_root / table
        if not directory.is_dir():
            continue
        for folder in sorted(directory.iterdir()):
            name = folder.name
            if name != own and name.startswith(f"{PARTITION_COLUMN}=") and \
                    unquote(name.split("=", 1)[1]) == run_id:
                for path in sorted(folder.glob("*.parquet")):
                    found.append(Finding(table, path.name, None, "segment_added",
                                         f"in folder {name}, which readers take for this run's, though the run "
                                         "never writes there"))
    return found


def _ambiguous_run_rows(store: AuditStore, run_id: str) -> list[Finding]:
    """More than one ``runs`` row at the run's latest revision: readers may show one the root does not attest."""
    directory = partition_dir(store.parquet_root, "runs", run_id)
    revisions = [int(r or 0) for f in sorted(directory.glob("part-*.parquet"))
                 for r in read_segment(f).column("revision").to_pylist()]
    if not revisions or revisions.count(max(revisions)) == 1:
        return []
    return [Finding("runs", None, None, "run_row_ambiguous",
                    f"{revisions.count(max(revisions))} runs rows claim revision {max(revisions)}, the run's latest: "
                    "one was added, and readers may show it instead of the sealed one")]
