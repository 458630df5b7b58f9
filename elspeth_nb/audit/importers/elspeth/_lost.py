"""ELSPETH's lost-branch reasons (free strings) parsed into ``{"reason", "detail", "raw"}``.

ELSPETH stores ``branches_lost`` as ``{branch: "<kind>:<detail>"}`` with kinds ``error_routed``,
``quarantined``, ``max_retries_exceeded`` and ``gate_routed_to_sink`` (detail = the sink); older
runs and some code paths leave Python reprs instead (a dict, a dataclass or an enum member).
Parsing runs once per *distinct* string, so its cost does not grow with the number of rows.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from elspeth_nb.audit.hashing import canonical_json, is_canonical

KNOWN_KINDS = frozenset({"error_routed", "quarantined", "max_retries_exceeded", "gate_routed_to_sink",
                         "coalesce_failed"})
UNKNOWN = "unknown"
_PREFIXED = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*)$", re.DOTALL)
_WORD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*$")
_ENUM = re.compile(r"^<[\w.]+\.(\w+):\s*'([^']*)'>$")
_CALL = re.compile(r"^\s*[A-Za-z_][\w.]*\((.*)\)\s*$", re.DOTALL)
_KWARG = re.compile(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^,()]+)")


def parse_lost_reason(raw: Any) -> dict[str, Any]:
    """``{"reason", "detail", "raw"}`` (+ ``"sink"`` for gate routes); reason ``unknown`` when unparseable."""
    text = raw if isinstance(raw, str) else (None if raw is None else json.dumps(raw, sort_keys=True))
    parsed = _parse(raw) if not isinstance(raw, str) else _parse_text(raw)
    out: dict[str, Any] = {"reason": UNKNOWN, "detail": None, **parsed, "raw": text}
    if out["reason"] == "gate_routed_to_sink" and isinstance(out["detail"], str):
        out["sink"] = out["detail"]
    return out


def is_parsed(reason: dict[str, Any]) -> bool:
    return bool(reason["reason"] != UNKNOWN)


def _parse(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        kind = value.get("reason") or value.get("kind") or value.get("type")
        detail = value.get("detail", {k: v for k, v in value.items() if k not in ("reason", "kind", "type")} or None)
        return {"reason": str(kind), "detail": detail} if kind else {"detail": value}
    return {}


def _parse_text(text: str) -> dict[str, Any]:
    stripped = text.strip()
    for attempt in (_as_mapping, _as_enum, _as_call, _as_prefixed):
        parsed = attempt(stripped)
        if parsed is not None:
            return parsed
    return {"detail": text} if stripped else {}


def _as_mapping(text: str) -> dict[str, Any] | None:
    """A JSON object or a Python dict repr with a ``reason`` (or ``kind``) key."""
    value = _load_mapping(text)
    return None if value is None else (_parse(value) or None)


def _load_mapping(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    for loader in (json.loads, ast.literal_eval):
        try:
            value = loader(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _as_enum(text: str) -> dict[str, Any] | None:
    """``<LostReason.QUARANTINED: 'quarantined'>``."""
    m = _ENUM.match(text)
    return {"reason": m.group(2) or m.group(1).lower(), "detail": None} if m else None


def _as_call(text: str) -> dict[str, Any] | None:
    """A dataclass/pydantic repr: ``BranchLoss(reason='error_routed', detail='...')``."""
    m = _CALL.match(text)
    if not m:
        return None
    kwargs = {k: _literal(v) for k, v in _KWARG.findall(m.group(1))}
    return _parse(kwargs) or None


def _as_prefixed(text: str) -> dict[str, Any] | None:
    """``<kind>:<detail>`` or a bare ``<kind>``; a detail that is itself a mapping is parsed too."""
    m = _PREFIXED.match(text)
    if m:
        detail = m.group(2).strip() or None
        return {"reason": m.group(1), "detail": (detail and _load_mapping(detail)) or detail}
    m = _WORD.match(text)
    return {"reason": m.group(1), "detail": None} if m else None


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text.strip()


def reason_table(raws: Iterable[str | None]) -> tuple[pa.Table, list[str]]:
    """Distinct raw strings -> (raw, reason, detail_json, sink) as Arrow, plus a problem per odd one."""
    raw_list, kinds, details, sinks, problems = [], [], [], [], []
    for raw in dict.fromkeys(raws):
        parsed = parse_lost_reason(raw)
        raw_list.append(raw)
        kinds.append(parsed["reason"])
        detail = parsed["detail"]
        details.append(None if detail is None else canonical_json(detail) if is_canonical(detail) else json.dumps(
            detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str))
        sinks.append(parsed.get("sink"))
        if not is_parsed(parsed):
            problems.append(f"unparseable lost-branch reason {raw!r}: kept as reason 'unknown' with the raw text")
        elif parsed["reason"] not in KNOWN_KINDS:
            problems.append(f"lost-branch reason of an unknown kind {parsed['reason']!r} (raw {raw!r})")
    table = pa.table({"raw": pa.array(raw_list, pa.string()), "reason": pa.array(kinds, pa.string()),
                      "detail_json": pa.array(details, pa.string()), "sink": pa.array(sinks, pa.string())})
    return table, problems


