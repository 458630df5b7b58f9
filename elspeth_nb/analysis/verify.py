"""Hash verification of one run: payloads, source rows, sink files, and the run's Merkle root.

Payload and source-row hashes are recomputed in DuckDB (``sha256``); every sink file listed in
``artifacts`` is read and compared with its content hash, size and, for JSON lines, line by line
with the sink states' output hashes. For a store, the run's Merkle root is recomputed from its
segment files by :func:`elspeth_nb.audit.verification.verify_run`, which names the first record
that no longer matches.

A segment that cannot be read is a finding too (``segment_unreadable``): one left out when the
audit was opened, or one a check could not read (the checks that needed it are named); its bytes
no longer match its digest, so the Merkle verification names it as well.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import polars as pl

from elspeth_nb._arguments import require
from elspeth_nb.analysis._connection import DUCKDB, RUN_REVISIONS
from elspeth_nb.analysis.results import Displayable, html_block, html_table, text_table, verdict_html
from elspeth_nb.audit.hashing import stable_hash
from elspeth_nb.audit.importers.elspeth._verify import run_folder
from elspeth_nb.audit.schema import TABLES, RunStatus, Table
from elspeth_nb.audit.store import quote_ident
from elspeth_nb.audit.verification import verify_run
from elspeth_nb.audit.writer import partition_dir
from elspeth_nb.errors import AuditStoreError, CanonicalizationError

if TYPE_CHECKING:
    from elspeth_nb.analysis.audit import Audit

_MISMATCH_SCHEMA = {"check": pl.String, "table": pl.String, "record_id": pl.String, "expected": pl.String,
                    "actual": pl.String, "detail": pl.String}

_PAYLOAD_SQL = """
SELECT 'payload_hash' AS "check", 'payloads' AS "table", payload_hash AS record_id, payload_hash AS expected,
       sha256(payload_json) AS actual, 'sha256 of payload_json differs from payload_hash' AS detail
FROM payloads WHERE run_id = $run AND sha256(payload_json) <> payload_hash
"""

#: Payload files of an ELSPETH run whose bytes did not hash to their ref when it was read: left out of
#: ``payloads`` (so they read like purged ones) but listed in the run's counts, so the tampering stays visible.
_IMPORT_MISMATCH_SQL = """
SELECT 'payload_hash' AS "check", 'payloads' AS "table", ref AS record_id, ref AS expected, NULL AS actual,
       'ELSPETH''s payload file for this ref does not hash to it (tampered or damaged; left out)' AS detail
FROM (SELECT unnest(CAST(json_extract(counts_json, '$.payload_mismatches') AS VARCHAR[])) AS ref
      FROM runs WHERE run_id = $run AND json_exists(counts_json, '$.payload_mismatches'))
"""

#: Source rows whose stored payload does not hash to source_data_hash (a row whose payload is not in
#: the store, purged or imported without its payload folder, cannot be checked and is only counted).
_SOURCE_SQL = """
SELECT 'source_row_hash' AS "check", 'rows' AS "table", r.row_id AS record_id, r.source_data_hash AS expected,
       sha256(p.payload_json) AS actual, 'sha256 of the stored source row differs from source_data_hash' AS detail
FROM rows r
JOIN (SELECT payload_hash, payload_json FROM payloads WHERE run_id = $run) p ON p.payload_hash = r.source_data_ref
WHERE r.run_id = $run AND sha256(p.payload_json) <> r.source_data_hash
"""

_SOURCE_COUNTS_SQL = """
SELECT count(*) FILTER (WHERE p.payload_hash IS NOT NULL), count(*) FILTER (WHERE p.payload_hash IS NULL)
FROM rows r
LEFT JOIN (SELECT DISTINCT payload_hash FROM payloads WHERE run_id = $run) p ON p.payload_hash = r.source_data_ref
WHERE r.run_id = $run AND r.source_data_ref IS NOT NULL
"""

_ARTIFACTS_SQL = """
SELECT a.artifact_id, a.sink_node_id, n.node_name, n.plugin_name, json_extract_string(n.config_json, '$.format')
       AS format, a.path_or_uri, a.content_hash, a.size_bytes, a.row_count
FROM artifacts a LEFT JOIN nodes n ON n.node_id = a.sink_node_id AND n.run_id = a.run_id
WHERE a.run_id = $run ORDER BY a.created_at, a.artifact_id
"""

_SINK_HASHES_SQL = """
SELECT output_hash, count(*) AS n FROM node_states
WHERE run_id = $run AND node_id = $node AND status = 'completed' AND output_hash IS NOT NULL GROUP BY 1
"""


#: ``VerifyResult.merkle`` of a run that has no Merkle root because it is not finished, by run status.
UNSEALED = {RunStatus.RUNNING: "not sealed: run still being written",
            RunStatus.INTERRUPTED: "not sealed: run interrupted"}


@dataclass(frozen=True)
class VerifyResult(Displayable):
    """Hash mismatches of one run; ``ok`` when every recomputed hash agrees with a sealed trail.

    ``merkle`` says what became of the run's Merkle root: ``verified`` (recomputed from the
    segment files, equal to the stored root and to ``expected_root`` when one was given),
    ``mismatch`` (also when the run's segments or digests no longer read), ``not recorded`` (a finished
    run written before tamper evidence), ``unavailable`` (an audit.duckdb outside its store, or an
    ELSPETH Landscape: no segment files to hash), or ``not sealed: run still being written`` /
    ``not sealed: run interrupted``: the run has no root yet, so nothing proves its trail complete
    and ``ok`` is False.
    """

    run_id: str
    mismatches: pl.DataFrame
    checked: Mapping[str, int]
    merkle: str = "unavailable"
    merkle_root: str | None = None

    @property
    def sealed(self) -> bool:
        """False for a run still being written or interrupted: it has no Merkle root to verify."""
        return self.merkle not in UNSEALED.values()

    @property
    def ok(self) -> bool:
        return self.mismatches.height == 0 and self.sealed

    def to_polars(self) -> pl.DataFrame:
        return self.mismatches

    def _verdict(self) -> str:
        counted = ", ".join(f"{v} {k}" for k, v in self.checked.items())
        root = f"; Merkle root {self.merkle}" + (f" {self.merkle_root}" if self.merkle_root else "")
        if not self.sealed:
            return (f"Verify run {self.run_id}: INCOMPLETE, {self.merkle}; {self.mismatches.height} mismatch(es) "
                    f"in what could be checked so far ({counted})")
        if self.ok:
            return f"Verify run {self.run_id}: OK ({counted}){root}"
        return f"Verify run {self.run_id}: {self.mismatches.height} mismatch(es) ({counted}){root}"

    def __repr__(self) -> str:
        if not self.mismatches.height:
            return self._verdict()
        return self._verdict() + "\n" + text_table(self.mismatches, max_rows=50, indent="  ")

    def to_html(self) -> str:
        parts = [verdict_html(self.ok, self._verdict())]
        if self.mismatches.height:
            parts.append(html_table(self.mismatches, "Mismatches", 200))
        return html_block(f"Verification of run {self.run_id}", *parts)


def _artifact_bases(self: Audit, run: str) -> list[Path]:
    """Where a run's relative sink paths start, most likely first: its pipeline file's folder (for an ELSPETH run,
    the folder ELSPETH ran in, found from its database's path and landscape URL, then the database's own folder,
    where copies keep the files), else the audit's own folder."""
    found = self._db.rows("SELECT pipeline_path, settings_json, producer FROM runs WHERE run_id = $run", {"run": run})
    if not found or not found[0][0]:
        return [self._db.path.parent]
    path, settings, producer = found[0]
    if str(producer or "").startswith("elspeth (") and str(path).endswith(".db"):
        return [run_folder(path, settings), Path(path).parent]
    return [Path(path).parent]


def _local_path(uri: str, base: Path) -> Path | None:
    """The local file a ``path_or_uri`` names; relative paths (ELSPETH writes ``file://output.jsonl``)
    are taken relative to ``base``."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc and parsed.netloc != "localhost":
            return base / unquote(parsed.netloc + parsed.path)
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # http://, s3://: not a local file
        return None
    path = Path(uri)
    return path if path.is_absolute() else base / path


def _is_jsonl(artifact: dict[str, Any], path: Path) -> bool:
    return artifact["plugin_name"] == "jsonl" or artifact["format"] == "jsonl" or path.suffix == ".jsonl"


def _verify_artifact(self: Audit, run: str, artifact: dict[str, Any], bases: list[Path],
                     out: list[dict[str, Any]], checked: Counter[str]) -> None:
    record = artifact["artifact_id"]

    def mismatch(check_name: str, expected: Any, actual: Any, detail: str) -> None:
        out.append({"check": check_name, "table": "artifacts", "record_id": record, "expected": _text(expected),
                    "actual": _text(actual), "detail": detail})

    candidates = [_local_path(artifact["path_or_uri"], base) for base in bases]
    path = next((p for p in candidates if p is not None and p.exists()), candidates[0])
    if path is None:
        mismatch("artifact_file", artifact["path_or_uri"], None, "not a local file: cannot be verified here")
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        mismatch("artifact_file", str(path), None, f"cannot read the sink file: {exc.strerror or exc}")
        return
    checked["artifacts"] += 1
    digest = hashlib.sha256(data).hexdigest()
    if digest != artifact["content_hash"]:
        mismatch("artifact_hash", artifact["content_hash"], digest, f"sha256 of {path} differs from content_hash")
    if artifact["size_bytes"] is not None and len(data) != artifact["size_bytes"]:
        mismatch("artifact_size", artifact["size_bytes"], len(data), f"size of {path} differs from size_bytes")
    if not _is_jsonl(artifact, path):
        return
    sink_hashes = self._db.rows(_SINK_HASHES_SQL, {"run": run, "node": artifact["sink_node_id"]})
    expected = Counter({h: n for h, n in sink_hashes})
    lines = data.splitlines()
    checked["lines"] += len(lines)
    for number, line in enumerate(lines, start=1):
        line_hash = _line_hash(line, expected, artifact)
        if expected[line_hash] > 0:
            expected[line_hash] -= 1
        else:
            mismatch("artifact_line", None, line_hash,
                     f"line {number} of {path.name} matches no remaining output_hash of sink {artifact['node_name']}")
    if artifact["row_count"] is not None and len(lines) != artifact["row_count"]:
        mismatch("artifact_rows", artifact["row_count"], len(lines), f"{path.name} has {len(lines)} lines")
    missing = sum(expected.values())
    if missing:
        mismatch("artifact_lines_missing", None, None,
                 f"{missing} completed state(s) of sink {artifact['node_name']} have no line in {path.name}")


def _line_hash(line: bytes, expected: Counter[str], artifact: dict[str, Any]) -> str:
    """The hash a sink state recorded for this line: our sinks write canonical JSON, so its sha256.

    ELSPETH's sinks write ``json.dumps`` lines and record ``stable_hash({"row", "artifact_path",
    "content_hash"})``; when the raw hash matches nothing, that form (then the bare canonical row)
    is tried. The bytes themselves are covered by the file's content_hash.
    """
    raw = hashlib.sha256(line).hexdigest()
    if expected[raw] > 0:
        return raw
    try:
        row = json.loads(line)
        candidates = [stable_hash({"row": row, "artifact_path": artifact["path_or_uri"],
                                   "content_hash": artifact["content_hash"]}), stable_hash(row)]
    except (ValueError, CanonicalizationError):
        return raw
    return next((c for c in candidates if expected[c] > 0), raw)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _merkle(self: Audit, run: str, expected_root: str | None) -> tuple[list[dict[str, Any]], str, str | None]:
    """Mismatch records, status and recomputed root of the run's Merkle verification."""
    store = self._db.store
    if store is None:
        if expected_root is None:
            return [], "unavailable", None
        return [{"check": "merkle_root", "table": "runs", "record_id": run, "expected": expected_root,
                 "actual": None, "detail": f"{self._db.path} has no segment files to recompute a Merkle root from"}
                ], "unavailable", None
    try:
        result = verify_run(store, run, expected_root)
    except AuditStoreError as exc:  # the run's ``runs`` or ``segment_digests`` segments no longer read
        return [{"check": "merkle_root", "table": None, "record_id": run, "expected": expected_root, "actual": None,
                 "detail": f"the Merkle root cannot be recomputed: {exc}"}], "mismatch", None
    unsealed = all(f.kind == "no_digests" for f in result.findings)  # running, interrupted, or older than seals
    if result.stored_root is None and result.segments == 0 and expected_root is None and unsealed:
        return [], "not recorded", None
    found = [{"check": f"merkle_{f.kind}", "table": f.table, "record_id": f.record or f.part_file or run,
              "expected": expected_root if f.kind == "root_changed" else None,
              "actual": result.computed_root if f.kind == "root_changed" else None,
              "detail": f"{f.part_file}: {f.detail}" if f.part_file else f.detail} for f in result.findings]
    if not result.ok and not found:  # e.g. no stored root although the segments are all there
        found.append({"check": "merkle_root", "table": "runs", "record_id": run, "expected": result.stored_root,
                      "actual": result.computed_root, "detail": "the recomputed Merkle root is not the stored one"})
    return found, "verified" if result.ok else "mismatch", result.computed_root


def _copy_checksum_sql(table: Table, source: str) -> str:
    """Records and an order-free checksum of one table's rows of ``$run``: the latest ``runs`` revision only, and
    distinct ``payloads`` (the copy keeps one row per content hash where a sharded run wrote a few twice)."""
    columns = ", ".join(quote_ident(name) for name in table.file_columns)
    latest = (f" AND revision = (SELECT max(revision) FROM {source} WHERE run_id = $run)"  # noqa: S608
              if table.name == "runs" else "")
    distinct = "DISTINCT " if table.name == "payloads" else ""
    return (f"SELECT count(*), sum(hash({columns})::HUGEINT) FROM "  # noqa: S608
            f"(SELECT {distinct}{columns} FROM {source} WHERE run_id = $run{latest})")


def _native_copy(self: Audit, run: str) -> list[dict[str, Any]]:
    """Tables whose rows of ``run`` in audit.duckdb, which the helpers read for a finished run, differ from the
    Parquet segments that the Merkle root covers (a copy edited by hand would otherwise go unseen)."""
    db = self._db
    tables = [t for t in TABLES.values() if t.name != "segment_digests"]
    if db.native is None:
        if db.kind != DUCKDB or db.store is None or run not in db.store.run_ids():
            return []
        # opened on audit.duckdb itself: the helpers read only the copy, the segments beside it are the truth
        copy = {t.name: db.rows(_copy_checksum_sql(t, _source_of(t)), {"run": run})[0] for t in tables}
        truths = _segment_checksums(db.store.parquet_root, run, tables)
    else:
        with db.native.reading(db._states_of([run])) as (con, held):
            if con is None or run not in held:
                return []  # the helpers read this run from the segments themselves
            copy = {t.name: con.execute(_copy_checksum_sql(t, t.name), {"run": run}).fetchall()[0] for t in tables}
        truths = {t.name: db.rows(_copy_checksum_sql(t, _source_of(t)), {"run": run})[0] for t in tables}
    found = []
    for table in tables:
        truth = truths[table.name]
        if tuple(truth) != tuple(copy[table.name]):
            found.append({"check": "duckdb_copy", "table": table.name, "record_id": run,
                          "expected": f"{truth[0]} record(s)", "actual": f"{copy[table.name][0]} record(s)",
                          "detail": f"audit.duckdb, which the helpers read for this run, no longer holds the same "
                                    f"{table.name} records as the verified segments; `elspeth-nb rebuild` "
                                    "recreates it"})
    return found


def _source_of(table: Table) -> str:
    """The view holding every record of ``table`` (every revision, for ``runs``)."""
    return RUN_REVISIONS if table.name == "runs" else quote_ident(table.name)


def _segment_checksums(parquet_root: Path, run: str, tables: list[Table]) -> dict[str, tuple[Any, ...]]:
    """:func:`_copy_checksum_sql` of the run's records as its Parquet segments hold them."""
    import duckdb

    found: dict[str, tuple[Any, ...]] = {}
    with duckdb.connect() as con:
        for table in tables:
            files = [str(p) for p in sorted(partition_dir(parquet_root, table.name, run).glob("part-*.parquet"))]
            if not files:
                found[table.name] = (0, None)
                continue
            source = "(SELECT *, $run AS run_id FROM read_parquet($files, union_by_name = true))"
            found[table.name] = tuple(con.execute(_copy_checksum_sql(table, source),
                                                  {"run": run, "files": files}).fetchall()[0])
    return found


def _status(self: Audit, run: str) -> str:
    """The run's status now (``interrupted`` when its writer is gone; ``unknown`` if its runs rows do not read)."""
    self._db.update_liveness()
    found = self._db.rows("SELECT status FROM runs WHERE run_id = $run", {"run": run})
    return str(found[0][0]) if found else "unknown"


#: unreadable segment -> (what reading it said, the checks it kept from being done)
_Damaged = dict[Path, tuple[str, list[str]]]


def _unless_unreadable(step: Callable[[], None], what: str, damaged: _Damaged, left_out: Mapping[Path, str] = {},
                       reads: frozenset[str] = frozenset()) -> None:
    """Run one check; a segment of the store it cannot read goes into ``damaged`` (``what`` was not verified).

    A check that ``reads`` a table which lost a segment when the audit was opened (``left_out``) is not run:
    against part of the trail it would report intact records (a sink file's lines, say) as mismatches.
    """
    missing = [path for path in left_out if path.parent.parent.name in reads]
    for path in missing:
        damaged[path][1].append(what)
    if missing:
        return
    try:
        step()
    except AuditStoreError as exc:
        if not exc.segments:
            raise
        for path, reason in exc.segments.items():
            damaged.setdefault(path, (reason, []))[1].append(what)


def _damage_found(damaged: _Damaged, left_out: Mapping[Path, str]) -> list[dict[str, Any]]:
    """One ``segment_unreadable`` mismatch per unreadable segment: which file, why, and what it kept from being
    verified."""
    found = []
    for path, (reason, skipped) in damaged.items():
        detail = f"{path} cannot be read ({reason.rstrip('.')})"
        if path in left_out:
            detail += "; it was left out of every table when the audit was opened"
        if skipped:
            detail += f"; not verified: {', '.join(skipped)}"
        found.append({"check": "segment_unreadable", "table": path.parent.parent.name, "record_id": path.name,
                      "expected": None, "actual": None, "detail": detail})
    return found


def verify(self: Audit, run_id: str = "latest", *, expected_root: str | None = None) -> VerifyResult:
    """Recompute hashes: payloads, source rows, every sink file in ``artifacts``, and the Merkle root.

    For JSON-lines sink files each line's hash must be the output_hash of one completed state of
    that sink. ``expected_root`` is a Merkle root saved earlier: the run is proven unchanged since
    when the root recomputed from its segment files equals it.

    >>> result = audit.verify()
    >>> result.ok, result.merkle, sorted(result.checked)
    (True, 'verified', ['artifacts', 'lines', 'payloads', 'source_rows'])
    """
    if expected_root is not None:
        require(expected_root, str, "expected_root", "a Merkle root (hex str) saved earlier, or None")
    db = self._db
    run = db.resolve_run(run_id, unreadable=True)
    status = _status(self, run)  # first: a run that finishes while it is verified still reads as unsealed
    params = {"run": run}
    left_out = db.unreadable_segments(run)
    damaged: _Damaged = {path: (reason, []) for path, reason in left_out.items()}
    found: list[dict[str, Any]] = []
    checked: Counter[str] = Counter()

    def payloads() -> None:
        found.extend(db.frame(_PAYLOAD_SQL, params).iter_rows(named=True))
        found.extend(db.frame(_IMPORT_MISMATCH_SQL, params).iter_rows(named=True))
        checked["payloads"] = db.rows("SELECT count(*) FROM payloads WHERE run_id = $run", params)[0][0]

    def source_rows() -> None:
        found.extend(db.frame(_SOURCE_SQL, params).iter_rows(named=True))
        checked["source_rows"], unverifiable = db.rows(_SOURCE_COUNTS_SQL, params)[0]
        if unverifiable:
            checked["source_rows_without_payload"] = unverifiable

    def artifacts() -> None:
        checked["artifacts"] = checked["lines"] = 0
        bases = _artifact_bases(self, run)
        for artifact in db.frame(_ARTIFACTS_SQL, params).iter_rows(named=True):
            _unless_unreadable(partial(_verify_artifact, self, run, artifact, bases, found, checked),
                               f"sink file {artifact['path_or_uri']}", damaged)

    _unless_unreadable(payloads, "payload hashes", damaged, left_out, frozenset({"payloads", "runs"}))
    _unless_unreadable(source_rows, "source row hashes", damaged, left_out, frozenset({"rows", "payloads"}))
    _unless_unreadable(artifacts, "sink files", damaged, left_out, frozenset({"artifacts", "nodes", "node_states"}))
    if not left_out:  # a copy is only read while every segment of the run reads
        try:
            found.extend(_native_copy(self, run))
        except AuditStoreError as exc:  # a segment stopped reading: the Merkle check below names it
            if not exc.segments:
                raise
    found += _damage_found(damaged, left_out)
    merkle_found, merkle, root = _merkle(self, run, expected_root)
    found += merkle_found
    merkle = UNSEALED.get(status, merkle)
    mismatches = pl.DataFrame(found, schema=_MISMATCH_SCHEMA) if found else pl.DataFrame(schema=_MISMATCH_SCHEMA)
    return VerifyResult(run, mismatches, MappingProxyType(dict(checked)), merkle, root)
