"""``verify_landscape``: recompute an imported run's hashes from its payloads and its sink output files.

Checks, one row each: ``source_row_hash`` (a row's payload re-hashed = ``rows.source_data_hash``),
``payload_ref`` (every other payload ref resolvable and intact), ``artifact_content_hash`` and
``artifact_size`` (the output file against ``artifacts``), ``sink_row_hash`` (each sink node state's
``input_hash`` found among the stable hashes of the output file's JSON lines, and each line matched).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from elspeth_nb.audit.hashing import stable_hash
from elspeth_nb.audit.importers.elspeth._model import LandscapeImport
from elspeth_nb.audit.importers.elspeth._payloads import MISMATCH, PURGED
from elspeth_nb.errors import CanonicalizationError

COLUMNS = ("run_id", "check", "table", "record_id", "status", "detail")
Check = tuple[str, str, str, str, str, str]


def verify_landscape(imported: LandscapeImport, *, db_path: str | Path,
                     base_dir: str | Path | None = None) -> pl.DataFrame:
    """One row per check: (run_id, check, table, record_id, status ok/mismatch/missing/purged, detail)."""
    settings = dict(zip(imported.tables["runs"].column("run_id").to_pylist(),
                        imported.tables["runs"].column("settings_json").to_pylist(), strict=True))
    bases = {run: Path(base_dir) if base_dir is not None else run_folder(db_path, text)
             for run, text in settings.items()}
    payloads = dict(zip(imported.tables["payloads"].column("payload_hash").to_pylist(),
                        imported.tables["payloads"].column("payload_json").to_pylist(), strict=True))
    rows: list[Check] = []
    rows += _source_rows(imported, payloads)
    rows += _other_refs(imported, payloads)
    rows += _artifacts(imported, bases, Path(db_path).resolve().parent)
    return pl.DataFrame(rows, schema=list(COLUMNS), orient="row")


def _absent(imported: LandscapeImport, ref: str | None) -> tuple[str, str]:
    """(status, detail) for a payload ref that was not loaded."""
    if ref is None:
        return "missing", "no payload ref recorded"
    if imported.payload_dir is None:
        return "missing", "no payload folder was given (hashes-only import)"
    issue = imported.payload_issues.get(ref)
    if issue == PURGED:
        return "purged", f"payload file {ref[:2]}/{ref} is gone (purged or not copied)"
    if issue == MISMATCH:
        return "mismatch", f"payload file {ref[:2]}/{ref} does not hash to its ref (tampered or corrupt)"
    return "missing", f"payload {ref!r} is invalid or unreadable"


def _source_rows(imported: LandscapeImport, payloads: dict[str, str]) -> list[Check]:
    """Each source row's payload, re-hashed with RFC 8785, against ``rows.source_data_hash``."""
    out = []
    table = imported.tables["rows"]
    for run_id, row_id, expected, ref in zip(*(table.column(c).to_pylist() for c in (
            "run_id", "row_id", "source_data_hash", "source_data_ref")), strict=True):
        text = payloads.get(ref) if ref else None
        if text is None:
            status, detail = _absent(imported, ref)
        else:
            status, detail = _rehash(text, expected)
        out.append((run_id, "source_row_hash", "rows", row_id, status, detail))
    return out


def _rehash(text: str, expected: str) -> tuple[str, str]:
    """ok when the payload's canonical hash (or, for repr fallbacks, its byte hash) is ``expected``."""
    if hashlib.sha256(text.encode("utf-8")).hexdigest() == expected:
        return "ok", "payload bytes hash to source_data_hash"
    try:
        actual = stable_hash(json.loads(text))
    except (ValueError, CanonicalizationError) as exc:
        return "mismatch", f"payload is not canonical JSON: {exc}"
    if actual == expected:
        return "ok", "re-canonicalised payload hashes to source_data_hash"
    return "mismatch", f"payload hashes to {actual}, rows.source_data_hash is {expected}"


def _other_refs(imported: LandscapeImport, payloads: dict[str, str]) -> list[Check]:
    """Routing reasons, operation and call payload refs: present and intact."""
    out = []
    specs = (("routing_events", "event_id", ("reason_ref",)),
             ("operations", "operation_id", ("input_data_ref", "output_data_ref")),
             ("calls", "call_id", ("request_ref", "response_ref")))
    for name, key, refs in specs:
        table = imported.tables[name]
        for ref_col in refs:
            for run_id, record_id, ref in zip(*(table.column(c).to_pylist() for c in ("run_id", key, ref_col)),
                                              strict=True):
                if ref is None:
                    continue
                status, detail = ("ok", "payload present and intact") if ref in payloads else _absent(imported, ref)
                out.append((run_id, "payload_ref", name, f"{record_id}.{ref_col}", status, detail))
    return out


def _artifacts(imported: LandscapeImport, bases: dict[str, Path], db_folder: Path) -> list[Check]:
    """Each artifact file against its content hash and size, and its rows against the sink states."""
    out = []
    artifacts = imported.tables["artifacts"]
    sink_hashes = _sink_input_hashes(imported.tables["node_states"], artifacts.column("sink_node_id"))
    for art in artifacts.to_pylist():
        path = resolve_artifact(art["path_or_uri"], bases.get(art["run_id"], db_folder))
        if not path.exists():  # a file copied beside the database, as the samples keep theirs
            path = resolve_artifact(art["path_or_uri"], db_folder)
        states = sink_hashes.get((art["run_id"], art["sink_node_id"]), [])
        try:
            data = path.read_bytes()
        except OSError as exc:
            detail = f"output file {path} cannot be read ({exc.strerror or exc})"
            out.append((art["run_id"], "artifact_content_hash", "artifacts", art["artifact_id"], "missing", detail))
            out += [(art["run_id"], "sink_row_hash", "node_states", sid, "missing", detail) for sid, _ in states]
            continue
        out += _file_checks(art, data)
        if data.lstrip()[:1] in (b"{", b"["):  # JSON lines or a JSON array; a CSV file's rows are not JSON
            out += _line_checks(art, path, data, states)
    return out


def run_folder(db_path: str | Path, settings_json: str | None) -> Path:
    """The folder ELSPETH ran in, where its relative sink paths start: the database's folder, less the relative
    folders of its ``landscape.url`` (``sqlite:///./state/audit.db`` puts it one level up)."""
    db = Path(db_path).resolve()
    try:
        url = json.loads(settings_json or "{}").get("landscape", {}).get("url", "")
    except (ValueError, AttributeError):
        url = ""
    prefix = "sqlite:///"
    relative = Path(url[len(prefix):]) if isinstance(url, str) and url.startswith(prefix) else None
    if relative is None or relative.is_absolute() or ".." in relative.parts:
        return db.parent
    parts = [p for p in relative.parts if p != "."]
    if not parts or tuple(db.parts[-len(parts):]) != tuple(parts):
        return db.parent
    return Path(*db.parts[:-len(parts)]) if len(parts) < len(db.parts) else db.parent


def resolve_artifact(uri: str, base: Path) -> Path:
    """``file://output.jsonl`` is relative to ``base`` (the DB's folder); ``file:///abs`` and paths as they are."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        raw = unquote(parsed.netloc + parsed.path)
        path = Path(raw)
    else:
        path = Path(uri)
    return path if path.is_absolute() else base / path


def _file_checks(art: dict[str, Any], data: bytes) -> list[Check]:
    digest = hashlib.sha256(data).hexdigest()
    ok_hash = digest == art["content_hash"]
    ok_size = len(data) == art["size_bytes"]
    return [
        (art["run_id"], "artifact_content_hash", "artifacts", art["artifact_id"], "ok" if ok_hash else "mismatch",
         "file bytes hash to content_hash" if ok_hash
         else f"file hashes to {digest}, artifact says {art['content_hash']}"),
        (art["run_id"], "artifact_size", "artifacts", art["artifact_id"], "ok" if ok_size else "mismatch",
         f"{len(data)} bytes" + ("" if ok_size else f", artifact says {art['size_bytes']}")),
    ]


def _line_checks(art: dict[str, Any], path: Path, data: bytes, states: list[tuple[str, str]]) -> list[Check]:
    """Match the file's row hashes (a multiset) with the sink states' input hashes."""
    run_id = art["run_id"]
    line_hashes = _row_hashes(path, data)
    out: list[Check] = []
    available = Counter(h for _, h in line_hashes if h is not None)
    for state_id, expected in states:
        if available[expected] > 0:
            available[expected] -= 1
            out.append((run_id, "sink_row_hash", "node_states", state_id, "ok", f"row found in {path.name}"))
        else:
            out.append((run_id, "sink_row_hash", "node_states", state_id, "mismatch",
                        f"no row of {path.name} hashes to this sink state's input_hash {expected}"))
    wanted = Counter(h for _, h in states)
    for where, actual in line_hashes:
        if actual is None:
            out.append((run_id, "sink_row_hash", "artifacts", where, "mismatch", f"{where} is not valid JSON"))
        elif wanted[actual] > 0:
            wanted[actual] -= 1
        else:
            out.append((run_id, "sink_row_hash", "artifacts", where, "mismatch",
                        f"{where} hashes to {actual}, which no sink state of this artifact recorded"))
    return out


def _row_hashes(path: Path, data: bytes) -> list[tuple[str, str | None]]:
    """(``file:line``, stable hash) per JSON row of a jsonl file (or element of a JSON array file)."""
    text = data.decode("utf-8", errors="replace")
    stripped = text.lstrip()
    values: list[tuple[str, Any]] = []
    if stripped.startswith("["):
        try:
            values = [(f"{path.name}[{i}]", v) for i, v in enumerate(json.loads(text))]
        except ValueError:
            values = []
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                values.append((f"{path.name}:{number}", line))
    out: list[tuple[str, str | None]] = []
    for where, value in values:
        try:
            out.append((where, stable_hash(json.loads(value) if isinstance(value, str) else value)))
        except (ValueError, CanonicalizationError):
            out.append((where, None))
    return out


def _sink_input_hashes(states: pa.Table, sinks: pa.ChunkedArray) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(run_id, sink node) -> [(state_id, input_hash)] of the completed states at the artifacts' sinks."""
    at_sink = pc.is_in(states.column("node_id"), value_set=sinks.combine_chunks())
    sink_states = states.filter(pc.and_(at_sink, pc.equal(states.column("status"), "completed")))
    out: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for run_id, node_id, state_id, input_hash in zip(*(sink_states.column(c).to_pylist() for c in (
            "run_id", "node_id", "state_id", "input_hash")), strict=True):
        out[(run_id, node_id)].append((state_id, input_hash))
    return out
