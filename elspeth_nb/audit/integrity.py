"""Tamper evidence: segment digests, the run's Merkle root, and locating what changed.

Every Parquet segment of a run (all tables but ``runs``) is hashed as written (SHA-256 of the file
bytes) and fingerprinted record by record (64-bit, in file order). The run's Merkle root is built
over the segment digests, RFC 6962 style (leaf ``0x00 || data``, node ``0x01 || left || right``),
and stored in ``runs.merkle_root``. A root that still matches proves the segments are the bytes
written then; when it does not, the fingerprints name the first record that no longer matches.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from elspeth_nb.audit.hashing import canonical_bytes
from elspeth_nb.audit.schema import DIGESTED_TABLES, RUNS, TABLES

#: The ``runs`` columns the run's own Merkle leaf covers: all but the root itself and the timestamps.
RUN_ROW_ATTESTED = tuple(f.name for f in RUNS.file_schema
                         if f.name != "merkle_root" and not pa.types.is_timestamp(f.type))

_local = threading.local()


def fingerprints(records: pa.Table) -> pa.Array:
    """A 64-bit fingerprint per record (DuckDB ``hash`` of all its columns), as int64, in record order.

    DuckDB rather than polars: this runs inside forked worker processes, where a polars thread pool
    inherited from the parent deadlocks. One in-memory connection per thread (and per process).
    """
    if records.num_rows == 0:
        return pa.array([], pa.int64())
    columns = ", ".join('"' + f.name.replace('"', '""') + '"' + ("::VARCHAR" if pa.types.is_dictionary(f.type) else "")
                        for f in records.schema)
    con = _connection()
    con.register("enb_records", records)
    try:
        hashed = con.sql(f"SELECT hash({columns}) AS h FROM enb_records").to_arrow_table()  # noqa: S608
    finally:
        con.unregister("enb_records")
    return hashed.column("h").combine_chunks().view(pa.int64())


def _connection() -> Any:
    import duckdb

    pid = os.getpid()
    if getattr(_local, "pid", None) != pid:  # a forked child must not reuse its parent's connection
        _local.con = duckdb.connect()
        _local.con.execute("SET threads = 1")
        _local.pid = pid
    return _local.con


def pack_fingerprints(values: pa.Array) -> bytes:
    """Fingerprints as stored: little-endian int64s, 8 bytes per record (one value per segment)."""
    data: bytes = values.buffers()[1].to_pybytes()
    return data[values.offset * 8:(values.offset + len(values)) * 8]


def unpack_fingerprints(packed: bytes) -> list[int]:
    return [int.from_bytes(packed[i:i + 8], "little", signed=True) for i in range(0, len(packed), 8)]


def segment_leaf(table: str, part_file: str, record_count: int, file_sha256: str,
                 fingerprints_sha256: str | None = None) -> bytes:
    """The Merkle leaf of one segment: what it is, how many records, which bytes (and, since schema 2, which
    record fingerprints: a forged fingerprint would otherwise name the wrong record as changed)."""
    leaf = f"{table}\x00{part_file}\x00{record_count}\x00{file_sha256}"
    return (leaf if fingerprints_sha256 is None else f"{leaf}\x00{fingerprints_sha256}").encode()


#: Schema version from which a run's root covers its own ``runs`` row and its record fingerprints.
ROOT_COVERS_RUN_ROW = 2


def run_leaf(run_id: str, row: Mapping[str, Any]) -> bytes:
    """The Merkle leaf of the run's own row: every column but the root itself and the times, canonical JSON.

    Status, configuration, counts and errors are thus as tamper-evident as the records. Times are left out:
    the row is written after the root, and its times are only known once converted to the stored form.
    """
    fields = {name: row.get(name) for name in RUN_ROW_ATTESTED}
    return b"runs\x00" + canonical_bytes({"run_id": run_id, **fields})


def merkle_root(leaves: Sequence[bytes]) -> str:
    """RFC 6962 Merkle Tree Hash of ``leaves`` (hex).

    >>> merkle_root([]) == hashlib.sha256(b"").hexdigest()
    True
    >>> merkle_root([b"a"]) == hashlib.sha256(b"\\x00a").hexdigest()
    True
    """
    if not leaves:
        return hashlib.sha256(b"").hexdigest()
    return _tree([hashlib.sha256(b"\x00" + leaf).digest() for leaf in leaves]).hex()


def _tree(hashes: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes: split at the largest power of two below n, hash the two subtrees."""
    if len(hashes) == 1:
        return hashes[0]
    split = 1 << ((len(hashes) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _tree(hashes[:split]) + _tree(hashes[split:])).digest()


@dataclass(frozen=True)
class SegmentDigest:
    """One segment's entry in ``segment_digests``."""

    table_name: str
    part_file: str
    record_count: int
    file_sha256: str
    fingerprints_sha256: str | None = None

    @property
    def leaf(self) -> bytes:
        return segment_leaf(self.table_name, self.part_file, self.record_count, self.file_sha256,
                            self.fingerprints_sha256)


def ordered(digests: Iterable[SegmentDigest]) -> list[SegmentDigest]:
    """Digests in canonical order: schema table order, then part file name."""
    order = {name: i for i, name in enumerate(TABLES)}
    return sorted(digests, key=lambda d: (order.get(d.table_name, len(order)), d.part_file))


def run_root(digests: Iterable[SegmentDigest], run: tuple[str, Mapping[str, Any]] | None = None) -> str:
    """The run's Merkle root over its segment digests, and over its own row (``run``: id, row) from schema 2."""
    leaves = [d.leaf for d in ordered(digests)]
    if run is not None:
        leaves.append(run_leaf(*run))
    return merkle_root(leaves)


def covers_run_row(row: Mapping[str, Any] | None) -> bool:
    """Whether the root of the run whose latest ``runs`` row is ``row`` covers that row (schema 2 and later)."""
    return row is not None and int(row.get("schema_version") or 1) >= ROOT_COVERS_RUN_ROW


__all__ = [
    "DIGESTED_TABLES", "ROOT_COVERS_RUN_ROW", "RUN_ROW_ATTESTED", "SegmentDigest", "covers_run_row", "fingerprints",
    "merkle_root", "ordered", "pack_fingerprints", "run_leaf", "run_root", "segment_leaf", "unpack_fingerprints",
]
