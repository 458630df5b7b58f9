"""The text tree of a lineage: source → fork → branches → coalesce decision → merged token → sink.

A merged token hangs under its coalesce decision, and the decision under the nearest common
ancestor of the tokens it names (the forked token, for a plain fork/coalesce), after the branches.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import polars as pl

from elspeth_nb.analysis.results import format_value
from elspeth_nb.audit.schema import RunStatus

if TYPE_CHECKING:
    from elspeth_nb.analysis.lineage import Lineage

ROW_TEXT = 90


def short(token_id: Any) -> str:
    """The last 8 characters of an id, enough to tell the tokens of one row apart."""
    text = str(token_id)
    return "…" + text[-8:] if len(text) > 8 else text


def _ms(value: Any) -> str:
    return "?" if value is None else f"{format_value(float(value))} ms"


class _Tree:
    def __init__(self, lineage: Lineage) -> None:
        self.lineage = lineage
        self.tokens = {t["token_id"]: t for t in lineage.tokens.iter_rows(named=True)}
        self.states: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for state in lineage.states.iter_rows(named=True):
            self.states[state["token_id"]].append(state)
        self.lost = {r["token_id"]: r for r in lineage.lost.iter_rows(named=True) if r["token_id"]}
        self.data = {r["state_id"]: r for r in lineage.data.iter_rows(named=True) if r["state_id"]}
        decisions = lineage.decisions
        self.late: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for late in decisions.filter(pl.col("event_type") == "late_arrival").iter_rows(named=True):
            self.late[late["decision_event_id"]].append(late)
        self.children: dict[str | None, list[tuple[str, Any]]] = defaultdict(list)
        merged_by_decision: set[str] = set()
        for event in decisions.filter(pl.col("event_type") != "late_arrival").iter_rows(named=True):
            if event["merged_token_id"] in self.tokens:
                merged_by_decision.add(event["merged_token_id"])
            self.children[self._anchor(event)].append(("decision", event))
        for token_id, token in self.tokens.items():
            parents = [p for p in token["parents"] if p in self.tokens]
            if not parents:
                if token_id not in merged_by_decision:
                    self.children[None].append(("token", token_id))
            elif token_id in merged_by_decision:
                continue
            elif len(parents) == 1:
                self.children[parents[0]].append(("token", token_id))
            else:
                self.children[self._common_ancestor(parents)].append(("token", token_id))
        for anchor, items in self.children.items():
            items.sort(key=self._order_key(anchor))

    # -- structure ------------------------------------------------------------------------------
    def _ancestors(self, token_id: str) -> set[str]:
        seen: set[str] = set()
        stack = [token_id]
        while stack:
            current = stack.pop()
            if current in seen or current not in self.tokens:
                continue
            seen.add(current)
            stack.extend(self.tokens[current]["parents"])
        return seen

    def _common_ancestor(self, token_ids: list[str]) -> str | None:
        sets = [self._ancestors(t) for t in token_ids if t in self.tokens]
        if not sets:
            return None
        common = set.intersection(*sets)
        if not common:
            return None
        return max(common, key=lambda t: (self.tokens[t]["depth"] or 0, str(self.tokens[t]["created_at"])))

    def _anchor(self, event: dict[str, Any]) -> str | None:
        """Where a decision hangs: the nearest common ancestor of the parents of the branch tokens it names."""
        named = list(event["arrived_token_ids"] or [])
        lost = json.loads(event["context_json"]).get("branches_lost") or {}
        named += [r.get("token_id") for r in lost.values() if isinstance(r, dict) and r.get("token_id")]
        named += [late["late_token_id"] for late in self.late.get(event["event_id"], [])]
        above: list[str] = []
        for token_id in named:
            if token_id in self.tokens:
                parents = [p for p in self.tokens[token_id]["parents"] if p in self.tokens]
                above += parents or [token_id]
        return self._common_ancestor(above)

    def _order_key(self, anchor: str | None) -> Any:
        branches: list[str] = []
        if anchor is not None and self.tokens[anchor]["expected_branches_json"]:
            try:
                branches = list(json.loads(self.tokens[anchor]["expected_branches_json"]))
            except ValueError:
                branches = []

        def key(item: tuple[str, Any]) -> tuple[int, int, str]:
            kind, value = item
            if kind == "decision":
                return (1, 0, str(value["decided_at"]))
            token = self.tokens[value]
            rank = branches.index(token["branch"]) if token["branch"] in branches else len(branches)
            return (0, rank, f"{token['created_at']}{value}")

        return key

    # -- lines ------------------------------------------------------------------------------------
    def token_line(self, token_id: str) -> str:
        token = self.tokens[token_id]
        path = " → ".join(f"{s['node_name'] or s['node_id']} {'✓' if s['status'] == 'completed' else '✗'}"
                          for s in self.states.get(token_id, []))
        label = f"{token['branch']}  " if token["branch"] and not token["join_group_id"] else ""
        if token["join_group_id"]:
            label = "merged  "
        outcome = token["outcome"] or "(no outcome yet)"
        line = f"{label}token {short(token_id)}  {path or '(no node states)'}  {outcome}"
        if token["sink"]:
            line += f" → sink {token['sink']}"
        lost = self.lost.get(token_id)
        if lost is not None:
            when = "before" if lost["when"] == "before_decision" else "after"
            where = f" at {lost['node']}" if lost["node"] else ""
            detail = f": {lost['detail']}" if lost["detail"] not in (None, "-") else ""
            line += f"  (lost to {lost['coalesce']} {when} its decision: {lost['reason']}{where}{detail})"
        return line

    def token_notes(self, token_id: str) -> list[str]:
        notes = []
        for state in self.states.get(token_id, []):
            if state["node_type"] == "sink" and state["status"] == "completed":
                notes.append("wrote: " + _row_text(self.data.get(state["state_id"]), state["output_hash"]))
            if state["error_json"]:
                notes.append(f"error at {state['node_name']}: {format_value(state['error_json'], width=ROW_TEXT)}")
        return notes

    def decision_lines(self, event: dict[str, Any]) -> tuple[str, list[str]]:
        context = json.loads(event["context_json"])
        result = "merged" if event["event_type"] == "merged" else f"FAILED ({event['failure_reason']})"
        settings = f"policy {event['policy']}"
        if event["quorum_count"] is not None:
            settings += f" ({event['quorum_count']} of {event['n_expected']})"
        if event["timeout_seconds"] is not None:
            settings += f", timeout {format_value(event['timeout_seconds'])} s"
        settings += f", merge {event['merge_strategy']}"
        head = (f"{event['coalesce_name']}: {result} — {settings}, trigger {event['trigger']}, "
                f"waited {_ms(event['wait_duration_ms'])}")
        arrived = ", ".join(f"{b} +{_ms(o)}" for b, o in zip(event["branches_arrived"] or [],
                                                              event["arrival_offsets_ms"] or [], strict=False))
        notes = [f"arrived: {arrived or '—'}"]
        lost = context.get("branches_lost") or {}
        if lost:
            notes.append("lost: " + ", ".join(
                f"{b} ({r.get('reason')}{' at ' + str(r['node']) if r.get('node') else ''})" if isinstance(r, dict)
                else f"{b} ({r})" for b, r in lost.items()))
        for late in self.late.get(event["event_id"], []):
            notes.append(f"late: {late['late_branch']} arrived {_ms(late['late_by_ms'])} after the decision "
                         f"(token {short(late['late_token_id'])})")
        collisions = context.get("union_field_collisions") or {}
        if collisions:
            notes.append("union collisions: " + ", ".join(
                f"{field} (winner {c.get('winner')})" for field, c in collisions.items()))
        if event["event_type"] == "merged":
            merged = self.lineage.data.filter((pl.col("token_id") == event["merged_token_id"])
                                              & (pl.col("kind") == "merged"))
            record = merged.row(0, named=True) if merged.height else None
            notes.append("merged row: " + _row_text(record, event["merged_row_hash"]))
        return head, notes

    # -- rendering -----------------------------------------------------------------------------------
    def render(self) -> list[str]:
        row = self.lineage.row
        source = {"stored": row.get("payload_json") is not None, "payload_json": row.get("payload_json")}
        text = _row_text(source, row["source_data_hash"])
        if not source["stored"] and self.lineage.payload_mode in SOURCE_KEPT:  # the run keeps it: where is it?
            text = text.replace("(hashes only)", f"(payload missing: {_why_no_payload(self.lineage.run_status)})", 1)
        lines = [f"source row {row['row_index']}: " + text]
        roots = self.children.get(None, [])
        for i, item in enumerate(roots):
            self._item(item, lines, "", i == len(roots) - 1, top=True)
        return lines

    def _item(self, item: tuple[str, Any], lines: list[str], prefix: str, last: bool, top: bool = False) -> None:
        kind, value = item
        branch = "" if top else ("└─ " if last else "├─ ")
        child_prefix = prefix + ("" if top else ("   " if last else "│  "))
        if kind == "token":
            head, notes = self.token_line(value), self.token_notes(value)
            children = self.children.get(value, [])
        else:
            head, notes = self.decision_lines(value)
            merged = value["merged_token_id"]
            children = [("token", merged)] if merged in self.tokens else []
        lines.append(prefix + branch + head)
        note_prefix = child_prefix + ("│  " if children else "   ")
        lines += [note_prefix + n for n in notes]
        for i, child in enumerate(children):
            self._item(child, lines, child_prefix, i == len(children) - 1)


#: Payload modes that keep every source row: a source row without its payload is missing, not "hashes only".
SOURCE_KEPT = frozenset({"all", "boundaries", "source"})


def _row_text(record: dict[str, Any] | None, digest: Any) -> str:
    if record is not None and record.get("stored") and record.get("payload_json") is not None:
        return format_value(record["payload_json"], width=ROW_TEXT)
    return f"(hashes only) sha256 {str(digest)[:16]}…" if digest else "(no hash)"


def render_tree(lineage: Lineage) -> str:
    """The lineage of one source row as an indented text tree."""
    return "\n".join(_Tree(lineage).render())


def _why_no_payload(status: str | None) -> str:
    """Why a run that keeps source payloads has none for a row, as far as its status tells."""
    if status == RunStatus.RUNNING:
        return "not written yet, the run is still running"
    if status == RunStatus.INTERRUPTED:
        return "the run was interrupted, and the records it still held were lost with it (or it was purged)"
    return "purged, not copied or not matching its hash; verify() says which"
