"""Bad input, catalogued: each case gets a clear error or a recorded quarantine, and nothing stored is lost.

``CASES`` is the catalogue, one named row per bad input: what the case does (``act``), what must come of it
(``expect``), and for cases about a damaged store, the damage done first (``arrange``). The outcomes:

- ``Fails``: an error of exactly one elspeth_nb class, whose message names what is wrong and where (file and
  line, path in the settings, segment file, id); for a config error, the exact list of problems;
- ``Quarantines``: the run goes on; each bad record has a ``validation_errors`` row with its violation type,
  source location and message, a ``quarantined`` outcome, and is kept in the quarantine sink; the trail passes
  ``check()``;
- ``Completes``: an input that looks odd but is valid (a BOM, a header only, a field just under the limit);
- ``Pending``: the run completes on Parquet while audit.duckdb cannot be updated, and says so;
- ``Returns``: a result to inspect (a verify finding, an explorer page, an empty filter).

Every case starts from an audit store holding one completed run. Before the case (after its ``arrange``) the
bytes of every file under ``parquet/`` and the run's Merkle verification are taken; after it they must be the
same: a bad input may add a run of its own, never change or lose one, and the stored run still reads the same.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rfc8785

from elspeth_nb.analysis import Audit, ReadOnlyError, open_audit
from elspeth_nb.audit.schema import SCHEMA_VERSION
from elspeth_nb.audit.store import AuditStore
from elspeth_nb.audit.verification import verify_run
from elspeth_nb.charts import wait_time_ecdf
from elspeth_nb.cli import main
from elspeth_nb.engine.dag import load_pipeline
from elspeth_nb.engine.plugins.sinks import JsonlSink, ParquetSink
from elspeth_nb.engine.runner import RunFailedError, RunResult, run_pipeline
from elspeth_nb.errors import (
    AuditStoreError,
    AuditStoreWarning,
    ConfigError,
    InputError,
    NotFoundError,
    RunNotFoundError,
    SchemaVersionError,
)
from tests.cases import fork_pipeline, write_csv

ELSPETH_SAMPLE = Path(__file__).parent / "data" / "elspeth" / "requireall_nested" / "audit.db"

# -- the pipeline every input case runs: line numbers matter, config errors are located by them -----------

PIPELINE = """\
source:
  plugin: csv
  on_success: raw
  options:
    path: in.csv
    on_validation_failure: bad
    schema:
      mode: fixed
      fields: ["id: int", "amount: float", "note: str"]
gates:
  - name: fork_gate
    input: raw
    condition: "True"
    routes: {"true": fork, "false": out}
    fork_to: [a, b]
transforms:
  - name: a_pass
    plugin: passthrough
    input: a
    on_success: out_a
  - name: b_truncate
    plugin: truncate
    input: b
    on_success: out_b
    options: {fields: {note: 8}, suffix: ".."}
coalesce:
  - name: merge
    branches: {a: out_a, b: out_b}
    policy: require_all
    merge: union
    on_success: out
sinks:
  out: {plugin: jsonl, options: {path: out.jsonl}}
  bad: {plugin: jsonl, options: {path: bad.jsonl}}
audit: {path: audit}
"""
JSONL = (("  plugin: csv", "  plugin: jsonl"), ("    path: in.csv", "    path: in.jsonl"))
HEADER = b"id,amount,note\n"
LIMIT = 16 * 1024 * 1024  # the largest CSV field, in characters

Edit = tuple[str, str]


def edited(text: str, *edits: Edit) -> str:
    """``text`` with whole lines replaced: each edit's first item must be exactly one line of it."""
    lines = text.splitlines()
    for old, new in edits:
        where = [i for i, line in enumerate(lines) if line == old]
        assert len(where) == 1, f"{old!r} is not exactly one line of the pipeline"
        lines[where[0]:where[0] + 1] = new.splitlines()
    return "\n".join(lines) + "\n"


# -- what a case runs in ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pristine:
    """The store with one completed run that every case starts from (copied, never used directly)."""

    store: Path
    run: str
    summary: tuple[Any, ...]  # (status, rows, tokens) as runs() reads them


@dataclass
class Ctx:
    """One case's folder, its copy of the stored run, and what to close when the case ends."""

    work: Path
    store: Path
    run: str
    stack: ExitStack
    opened: Audit | None = None

    def settings(self, *edits: Edit, inputs: Mapping[str, bytes] | None = None) -> Path:
        """Write the input files and ``pipeline.yaml`` (PIPELINE with ``edits``) into the case folder."""
        for name, data in (inputs or {}).items():
            (self.work / name).write_bytes(data)
        path = self.work / "pipeline.yaml"
        path.write_text(edited(PIPELINE, *edits))
        return path

    def audit(self, path: Path | None = None) -> Audit:
        audit = open_audit(path or self.store)
        self.stack.callback(audit.close)
        return audit

    def sub(self, pattern: str) -> str:
        """A message pattern with ``<run>``, ``<store>`` and ``<work>`` filled in (escaped)."""
        for key, value in (("<run>", self.run), ("<store>", str(self.store)), ("<work>", str(self.work))):
            pattern = pattern.replace(key, re.escape(value))
        return pattern


Act = Callable[[Ctx], Any]


# -- outcomes -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fails:
    """``act`` raises exactly ``error``; the message matches every pattern in ``says`` (a ConfigError: its
    problems, one pattern each, in order)."""

    error: type[BaseException]
    says: tuple[str, ...]
    adds_run: bool = False

    def __init__(self, error: type[BaseException], *says: str, adds_run: bool = False) -> None:
        object.__setattr__(self, "error", error)
        object.__setattr__(self, "says", says)
        object.__setattr__(self, "adds_run", adds_run)

    def check(self, ctx: Ctx, act: Act) -> Any:
        with pytest.raises(BaseException) as caught:
            act(ctx)
        exc = caught.value
        assert type(exc) is self.error, f"expected {self.error.__name__}, got {type(exc).__name__}: {exc}"
        if isinstance(exc, ConfigError) and self.error is ConfigError:
            assert len(exc.problems) == len(self.says), exc.problems
            for problem, pattern in zip(exc.problems, self.says, strict=True):
                assert re.fullmatch(ctx.sub(pattern), problem), f"{problem!r} !~ {pattern!r}"
        else:
            for pattern in self.says:
                assert re.search(ctx.sub(pattern), str(exc)), f"{exc} !~ {pattern!r}"
        return exc


def _fork_outcomes(good: int, **more: int) -> dict[str, int]:
    """Terminal outcomes of PIPELINE: per good row one forked, two coalesced and one completed token."""
    counts = {"forked": good, "coalesced": 2 * good, "completed": good, **more}
    return {k: v for k, v in sorted(counts.items()) if v}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass(frozen=True)
class Quarantines:
    """The run completes; each bad record is quarantined with (location, violation type, message pattern)."""

    rows: tuple[tuple[str, str, str], ...]
    good: int
    adds_run: bool = True

    def __init__(self, *rows: tuple[str, str, str], good: int) -> None:
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "good", good)
        object.__setattr__(self, "adds_run", True)

    def check(self, ctx: Ctx, act: Act) -> Any:
        result = act(ctx)
        assert isinstance(result, RunResult) and result.status == "completed", result
        assert (result.rows, result.quarantined) == (self.good + len(self.rows), len(self.rows))
        with open_audit(ctx.store) as audit:
            found = audit.sql("SELECT source_location, violation_type, error, destination FROM validation_errors "
                              "WHERE run_id = $run", {"run": result.run_id}).rows()
            outcomes = dict(audit.outcomes(result.run_id).select("outcome", "count").rows())
            assert audit.check(result.run_id).ok
        found.sort(key=lambda r: int(re.split(r":|#row", r[0])[-1]))  # in.csv:12, in.parquet#row12
        assert [(loc, kind) for loc, kind, _, _ in found] == [(loc, kind) for loc, kind, _ in self.rows]
        for (_, _, message, destination), (_, _, pattern) in zip(found, self.rows, strict=True):
            assert re.search(pattern, message), f"{message!r} !~ {pattern!r}"
            assert destination == "bad"
        assert outcomes == _fork_outcomes(self.good, quarantined=len(self.rows))
        assert len(_lines(ctx.work / "bad.jsonl")) == len(self.rows)  # quarantined records are kept, not lost
        assert len(_lines(ctx.work / "out.jsonl")) == self.good
        return result


@dataclass(frozen=True)
class Completes:
    """The run completes with ``good`` rows through the pipeline and nothing quarantined."""

    good: int
    outcomes: Mapping[str, int] = field(default_factory=dict)
    #: Where the new run is read back from: the store's Parquet, or its audit.duckdb (the store is damaged).
    read_from: str = ""
    adds_run: bool = True

    def check(self, ctx: Ctx, act: Act) -> Any:
        result = act(ctx)
        assert isinstance(result, RunResult) and result.status == "completed", result
        assert (result.rows - sum(self.outcomes.values()), result.quarantined) == (self.good, 0)
        assert dict(result.outcomes) == _fork_outcomes(self.good, **self.outcomes)
        with open_audit(ctx.store / self.read_from) as audit:
            assert dict(audit.outcomes(result.run_id).select("outcome", "count").rows()) == dict(result.outcomes)
            assert audit.sql("SELECT * FROM validation_errors WHERE run_id = $run", {"run": result.run_id}).height == 0
        return result


@dataclass(frozen=True)
class Pending:
    """The run completes on Parquet; audit.duckdb is not updated, the run is marked pending and the result says
    why (``says``); once the file can be written again a sync brings it up to date."""

    says: str
    then_syncs: bool = True
    adds_run: bool = True

    def check(self, ctx: Ctx, act: Act) -> Any:
        result = act(ctx)
        assert isinstance(result, RunResult) and result.status == "completed", result
        assert re.search(ctx.sub(self.says), result.duckdb), result.duckdb
        assert "marked pending" in result.duckdb and str(ctx.store) in result.duckdb
        store = AuditStore(ctx.store)
        assert store.pending_runs() == [result.run_id]
        with open_audit(ctx.store) as audit:  # the trail itself is complete
            assert audit.run_summary(result.run_id).status == "completed"
            assert audit.verify(result.run_id).ok
        if self.then_syncs:
            assert store.sync_duckdb([]).synced == [result.run_id] and store.pending_runs() == []
            with duckdb.connect(str(store.duckdb_path), read_only=True) as con:
                stored = {r for (r,) in con.execute("SELECT run_id FROM runs").fetchall()}
            assert stored == {ctx.run, result.run_id}
        return result


@dataclass(frozen=True)
class Returns:
    """``act`` returns; ``check_result(ctx, result)`` asserts what it must be."""

    check_result: Callable[[Ctx, Any], None]
    adds_run: bool = False

    def check(self, ctx: Ctx, act: Act) -> Any:
        result = act(ctx)
        self.check_result(ctx, result)
        return result


Outcome = Fails | Quarantines | Completes | Pending | Returns


@dataclass(frozen=True)
class Case:
    act: Act
    expect: Outcome
    arrange: Callable[[Ctx], None] | None = None
    #: What ``arrange`` damaged on purpose: "parquet" (a segment), "manifest", "duckdb", or None.
    damage: str | None = None
    then: Callable[[Ctx, Any], None] | None = None


CASES: dict[str, Case] = {}


def case(name: str, act: Act, expect: Outcome, **more: Any) -> None:
    assert name not in CASES, name
    CASES[name] = Case(act, expect, **more)


# == config errors: rejected before anything runs, every problem by file, line and path ==================


def _config(*edits: Edit) -> Act:
    return lambda ctx: run_pipeline(ctx.settings(*edits, inputs={"in.csv": HEADER + b"1,1.5,ok\n"}))


def config_case(name: str, edits: tuple[Edit, ...], *problems: str) -> None:
    case(f"config-{name}", _config(*edits), Fails(ConfigError, *problems), then=_nothing_written)


def _nothing_written(ctx: Ctx, _: Any) -> None:
    assert not (ctx.work / "out.jsonl").exists() and not (ctx.work / "bad.jsonl").exists()


case("config-yaml-syntax-unclosed-flow-mapping",
     _config(('    options: {fields: {note: 8}, suffix: ".."}', '    options: {fields: {note: 8}, suffix: ".."')),
     Fails(ConfigError, r"pipeline\.yaml:26: invalid YAML: expected ',' or '\}', but got '<scalar>' "
                        r"\(while parsing a flow mapping at line 25\)"), then=_nothing_written)
case("config-yaml-tab-indentation", _config(("    input: a", "\tinput: a")),
     Fails(ConfigError, r"pipeline\.yaml:19: invalid YAML: found character '\\t' that cannot start any token"),
     then=_nothing_written)
config_case("yaml-duplicate-key", (("    merge: union", "    merge: union\n    policy: first"),),
            r"pipeline\.yaml:31: coalesce\[0\]\.policy: duplicate key, overrides the value at line 29")
config_case("unknown-key-with-suggestion", (("    policy: require_all", "    polcy: require_all"),),
            r"pipeline\.yaml:29: coalesce\[0\]\.polcy: unknown setting; did you mean 'policy'\? "
            r"\(got 'require_all'\)")
config_case("unknown-top-level-section", (("audit: {path: audit}", "audit: {path: audit}\naudits: {}"),),
            r"pipeline\.yaml:36: audits: unknown setting; did you mean 'audit'\? \(got \{\}\)")
config_case("unknown-top-level-key-without-a-near-one", (("audit: {path: audit}", "audit: {path: audit}\nfoo: 1"),),
            r"pipeline\.yaml:36: foo: unknown setting \(got 1\)")  # never a key of another section ('fork_to')
config_case("missing-required-input", (("    input: a", ""),),
            r"pipeline\.yaml:17: transforms\[0\]\.input: required \(got nothing\)")
config_case("missing-required-sink-path", (("  bad: {plugin: jsonl, options: {path: bad.jsonl}}",
                                            "  bad: {plugin: jsonl, options: {}}"),),
            r"pipeline\.yaml:34: sinks\.bad\.options\.path: required \(got nothing\)")
config_case("wrong-type-length", (('    options: {fields: {note: 8}, suffix: ".."}',
                                   '    options: {fields: {note: eight}, suffix: ".."}'),),
            r"pipeline\.yaml:25: transforms\[1\]\.options\.fields\.note: must be a valid integer "
            r"\(got 'eight'\)")
config_case("wrong-type-timeout", (("    merge: union", "    merge: union\n    timeout_seconds: soon"),),
            r"pipeline\.yaml:31: coalesce\[0\]\.timeout_seconds: must be a valid number \(got 'soon'\)")
config_case("infinite-timeout", (("    policy: require_all", "    policy: best_effort\n    timeout_seconds: .inf"),),
            r"pipeline\.yaml:30: coalesce\[0\]\.timeout_seconds: must be a finite number \(got inf\)")
config_case("unknown-transform-plugin", (("    plugin: passthrough", "    plugin: passthru"),),
            r"pipeline\.yaml:18: transforms\[0\]\.plugin: unknown plugin; expected one of 'passthrough', "
            r"'field_mapper', 'truncate', 'keyword_filter', 'latency', 'python' \(got 'passthru'\)")
config_case("unknown-source-plugin", (("  plugin: csv", "  plugin: xlsx"),),
            r"pipeline\.yaml:2: source\.plugin: unknown plugin; expected one of 'csv', 'jsonl', 'parquet' "
            r"\(got 'xlsx'\)")
config_case("unknown-sink-plugin", (("  bad: {plugin: jsonl, options: {path: bad.jsonl}}",
                                     "  bad: {plugin: xlsx, options: {path: bad.xlsx}}"),),
            r"pipeline\.yaml:34: sinks\.bad\.plugin: unknown plugin; expected one of .* \(got 'xlsx'\)")
config_case("quorum-without-quorum-count", (("    policy: require_all", "    policy: quorum"),),
            r"pipeline\.yaml:27: coalesce\[0\]\.quorum_count: required when policy is quorum \(got nothing\)")
config_case("quorum-count-exceeds-branches",
            (("    policy: require_all", "    policy: quorum\n    quorum_count: 3"),),
            r"pipeline\.yaml:30: coalesce\[0\]\.quorum_count: cannot exceed the number of branches \(2\) \(got 3\)")
config_case("quorum-count-without-quorum", (("    policy: require_all", "    policy: first\n    quorum_count: 1"),),
            r"pipeline\.yaml:30: coalesce\[0\]\.quorum_count: only used when policy is quorum \(policy is first\) "
            r"\(got 1\)")
config_case("best-effort-without-timeout", (("    policy: require_all", "    policy: best_effort"),),
            r"pipeline\.yaml:27: coalesce\[0\]\.timeout_seconds: required when policy is best_effort "
            r"\(got nothing\)")
config_case("select-branch-not-a-branch", (("    merge: union", "    merge: select\n    select_branch: c"),),
            r"pipeline\.yaml:31: coalesce\[0\]\.select_branch: must be one of the branches: a, b \(got 'c'\)")
config_case("select-without-select-branch", (("    merge: union", "    merge: select"),),
            r"pipeline\.yaml:27: coalesce\[0\]\.select_branch: required when merge is select \(got nothing\)")
config_case("unknown-merge-strategy", (("    merge: union", "    merge: zip"),),
            r"pipeline\.yaml:30: coalesce\[0\]\.merge: must be 'union', 'nested' or 'select' \(got 'zip'\)")
config_case("unknown-connection", (("    input: a", "    input: nowhere"),),
            r"pipeline\.yaml:19: transforms\[0\]\.input: no node produces connection 'nowhere' "
            r"\(connections produced: a, b, out_a, out_b, raw\) \(got 'nowhere'\)",
            r"pipeline\.yaml:15: gates\[0\]\.fork_to\[0\]: fork branch 'a' leads nowhere: name a sink after it, or "
            r"use it as the input of a transform, gate or coalesce branch \(sinks: out, bad; connections: b, nowhere, "
            r"out_a, out_b, raw\) \(got 'a'\)")
config_case("on-error-unknown-sink", (("    on_success: out_a", "    on_success: out_a\n    on_error: nosink"),),
            r"pipeline\.yaml:21: transforms\[0\]\.on_error: must be 'discard' or a sink name \(sinks: out, bad\) "
            r"\(got 'nosink'\)")
config_case("duplicate-node-names", (("  - name: b_truncate", "  - name: a_pass"),),
            r"pipeline\.yaml:21: transforms\[1\]\.name: duplicate node name: transforms\[0\] is also called "
            r"'a_pass' \(got 'a_pass'\)")  # alone: what follows from leaving a node out is not listed
config_case("quorum-count-boolean", (("    policy: require_all", "    policy: quorum\n    quorum_count: true"),),
            r"pipeline\.yaml:30: coalesce\[0\]\.quorum_count: must be a valid integer \(got true\)")
config_case("coalesce-branch-not-named-after-its-fork-branch", (("    branches: {a: out_a, b: out_b}",
                                                                "    branches: {a: out_a, x: out_b}"),),
            r"pipeline\.yaml:28: coalesce\[0\]\.branches\.x: input 'out_b' carries fork branch 'b' of gate "
            r"'fork_gate'; a coalesce branch is named after the fork branch it joins \(tokens carry that name\): "
            r"use 'b' \(got 'x'\)")


def _input_kept(ctx: Ctx, _: Any) -> None:
    _nothing_written(ctx, _)
    assert (ctx.work / "in.csv").read_bytes() == HEADER + b"1,1.5,ok\n"


case("config-sink-overwrites-the-input",
     _config(("  bad: {plugin: jsonl, options: {path: bad.jsonl}}", "  bad: {plugin: csv, options: {path: in.csv}}")),
     Fails(ConfigError, r"^pipeline\.yaml:34: sinks\.bad\.options\.path: is the source's input file "
                        r"\(source\.options\.path\); the sink would overwrite it \(got 'in\.csv'\)$"),
     then=_input_kept)
case("config-two-sinks-one-file",
     _config(("  bad: {plugin: jsonl, options: {path: bad.jsonl}}",
              "  bad: {plugin: jsonl, options: {path: out.jsonl}}")),
     Fails(ConfigError, r"^pipeline\.yaml:34: sinks\.bad\.options\.path: is already the file of "
                        r"sinks\.out\.options\.path; the sink would overwrite it \(got 'out\.jsonl'\)$"),
     then=_nothing_written)
case("config-sink-overwrites-the-settings",
     _config(("  bad: {plugin: jsonl, options: {path: bad.jsonl}}",
              "  bad: {plugin: jsonl, options: {path: pipeline.yaml}}")),
     Fails(ConfigError, r"^pipeline\.yaml:34: sinks\.bad\.options\.path: is this settings file; the sink would "
                        r"overwrite it \(got 'pipeline\.yaml'\)$"))
case("config-sink-inside-the-audit-store",
     _config(("  bad: {plugin: jsonl, options: {path: bad.jsonl}}",
              "  bad: {plugin: jsonl, options: {path: audit/bad.jsonl}}")),
     Fails(ConfigError, r"^pipeline\.yaml:34: sinks\.bad\.options\.path: is inside the audit store <work>/audit; "
                        r"write sink files elsewhere \(got 'audit/bad\.jsonl'\)$"),
     then=_nothing_written)


def _code_kept(ctx: Ctx, _: Any) -> None:
    assert (ctx.work / "fn.py").read_text() == "def f(row):\n    return row\n"


def _sink_over_python_code(ctx: Ctx) -> Any:
    (ctx.work / "fn.py").write_text("def f(row):\n    return row\n")
    return _config(("    plugin: passthrough", "    plugin: python\n    options: {function: 'fn.py:f'}"),
                   ("  bad: {plugin: jsonl, options: {path: bad.jsonl}}",
                    "  bad: {plugin: jsonl, options: {path: fn.py}}"))(ctx)


case("config-sink-overwrites-python-code", _sink_over_python_code,
     Fails(ConfigError, r"^pipeline\.yaml:35: sinks\.bad\.options\.path: is the code of transforms\[0\] \(a_pass\), "
                        r"loaded from options\.function; the sink would overwrite it \(got 'fn\.py'\)$"),
     then=_code_kept)
config_case("sink-path-blank", (("  bad: {plugin: jsonl, options: {path: bad.jsonl}}",
                                 "  bad: {plugin: jsonl, options: {path: ' '}}"),),
            r"pipeline\.yaml:34: sinks\.bad\.options\.path: must name a file \(it is blank\) \(got ' '\)")


def _second_sink_is_a_directory(ctx: Ctx) -> Any:
    (ctx.work / "bad.jsonl").mkdir()
    return _config(("  out: {plugin: jsonl, options: {path: out.jsonl}}",
                    "  out: {plugin: jsonl, options: {path: new/deeper/out.jsonl}}"))(ctx)


def _no_folder_made(ctx: Ctx, _: Any) -> None:
    assert not (ctx.work / "new").exists()  # every sink is checked before a folder is made for one


case("sink-folder-not-made-when-another-sink-is-refused", _second_sink_is_a_directory,
     Fails(InputError, r"^pipeline\.yaml:\d+: sinks\.bad\.options\.path: <work>/bad\.jsonl is a directory; a sink "
                       r"writes a file$"), then=_no_folder_made)
config_case("node-named-like-a-sink", (("  - name: a_pass", "  - name: bad"),),
            r"pipeline\.yaml:17: transforms\[0\]\.name: a sink has the same name; node and sink names must "
            r"differ \(got 'bad'\)")
config_case("sink-named-source", (("  bad: {plugin: jsonl, options: {path: bad.jsonl}}",
                                   "  source: {plugin: jsonl, options: {path: bad.jsonl}}"),
                                  ("    on_validation_failure: bad", "    on_validation_failure: source")),
            r"pipeline\.yaml:34: sinks\.source: 'source' is the name of the source node; it cannot name a sink "
            r"\(got 'source'\)")  # not a cycle source → source
config_case("duplicate-fork-branch", (("    fork_to: [a, b]", "    fork_to: [a, b, a]"),),
            r"pipeline\.yaml:15: gates\[0\]\.fork_to: duplicate branch names: a \(got \[\"a\", \"b\", \"a\"\]\)")
config_case("cycle", (("transforms:", "transforms:\n  - {name: x1, plugin: passthrough, input: lp1, on_success: lp2}"
                                      "\n  - {name: x2, plugin: passthrough, input: lp2, on_success: lp1}"),),
            r"pipeline\.yaml:18: transforms\[1\]\.on_success: cycle: x1 → x2 → x1")
config_case("fork-branch-reaches-nothing", (("    fork_to: [a, b]", "    fork_to: [a, b, c]"),),
            r"pipeline\.yaml:15: gates\[0\]\.fork_to\[2\]: fork branch 'c' leads nowhere: name a sink after it, "
            r"or use it as the input of a transform, gate or coalesce branch .* \(got 'c'\)")
config_case("condition-imports-os", (('    condition: "True"', '''    condition: "__import__('os').system('id')"'''),),
            r"pipeline\.yaml:13: gates\[0\]\.condition: function call system\(\) is not allowed; only "
            r"row\.get\(\.\.\.\) is \(at column 1\) \(got \"__import__\('os'\)\.system\('id'\)\"\)")
config_case("condition-dunder-attribute", (('    condition: "True"', '''    condition: "row.__class__"'''),),
            r"pipeline\.yaml:13: gates\[0\]\.condition: dunder attribute '__class__' is not allowed \(at column 1\) "
            r"\(got 'row\.__class__'\)")
config_case("invalid-regular-expression", (("    plugin: passthrough", "    plugin: keyword_filter\n"
                                            "    options: {fields: [note], blocked_patterns: ['(unclosed']}"),),
            r"pipeline\.yaml:19: transforms\[0\]\.options\.blocked_patterns\[0\]: invalid regular expression "
            r"'\(unclosed': missing \), unterminated subpattern at position 0 \(got '\(unclosed'\)")
config_case("elspeth-aggregations", (("audit: {path: audit}", "audit: {path: audit}\naggregations: [{name: x}]"),),
            r"pipeline\.yaml:36: aggregations: not supported by elspeth-nb; remove them .*")
case("config-settings-file-missing", lambda ctx: run_pipeline(ctx.work / "nope.yaml"),
     Fails(ConfigError, r".*nope\.yaml: settings file not found"))
case("config-settings-path-is-a-directory", lambda ctx: run_pipeline(ctx.work),
     Fails(ConfigError, r"<work>: cannot read the settings file: \[Errno 21\] Is a directory: '<work>'"))


def _settings_file(name: str, data: bytes) -> Act:
    def act(ctx: Ctx) -> Any:
        (ctx.work / name).write_bytes(data)
        return run_pipeline(ctx.work / name)

    return act


case("config-settings-file-empty", _settings_file("empty.yaml", b""),
     Fails(ConfigError, r"empty\.yaml: the settings are empty"))
case("config-settings-file-not-utf8", _settings_file("latin.yaml", b"# caf\xe9\n"),
     Fails(ConfigError, r".*latin\.yaml: cannot read the settings file: 'utf-8' codec can't decode byte 0xe9 .*"))
case("config-settings-nested-too-deeply", _settings_file("deep.yaml", b"source: " + b"[" * 800 + b"]" * 800 + b"\n"),
     Fails(ConfigError, r"deep\.yaml:1: nested too deeply \(more than 100 levels of lists and mappings inside one "
                        r"another\)"))
_LAUGHS = b"".join([b'a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]\n',
                    *[b"a%d: &a%d [%s]\n" % (i, i, b", ".join([b"*a%d" % (i - 1)] * 10)) for i in range(1, 9)],
                    b"source: *a8\n"])
case("config-settings-aliases-expand-to-billions", _settings_file("laughs.yaml", _LAUGHS),  # fails in ms, not minutes
     Fails(ConfigError, r"laughs\.yaml:5: a4: the aliases expand to too many values \(more than 100,000\)"))
case("config-settings-alias-contains-itself", _settings_file("loop.yaml", b"source: &s {plugin: csv, options: *s}\n"),
     Fails(ConfigError, r"loop\.yaml:1: source\.options: the alias \*s refers to a value that contains it"))


def _mapping_with_two_problems(ctx: Ctx) -> Any:
    pipeline = fork_pipeline(write_csv(ctx.work / "in.csv"), policy="quorum")  # quorum without quorum_count
    pipeline["coalesce"][0]["merge"] = "zip"
    pipeline["audit"]["path"] = str(ctx.store)
    return run_pipeline(pipeline)


case("config-mapping-lists-every-problem", _mapping_with_two_problems,
     Fails(ConfigError, r"coalesce\[0\]\.merge: must be 'union', 'nested' or 'select' \(got 'zip'\)",
           r"coalesce\[0\]\.quorum_count: required when policy is quorum \(got nothing\)"))
case("config-payloads-argument-unknown", lambda ctx: run_pipeline(_config_path(ctx), payloads="some"),
     Fails(ConfigError, r"payloads: must be all, boundaries or hashes \(got 'some'\)"), then=_nothing_written)


def _config_path(ctx: Ctx) -> Path:
    return ctx.settings(inputs={"in.csv": HEADER + b"1,1.5,ok\n"})


# == run ids given to run_pipeline: a folder name in the store, so only safe ids, and never one in use ======

EVIL = {  # name -> a user id with quotes, SQL, wildcards, escapes and non-ASCII in it
    "quote-or": "x' OR '1'='1",
    "drop-table": '"; DROP TABLE runs; --',
    "percent": "%",
    "backslash": "\\",
    "unicode": "ünïcødé-€-😀",
    "html": "<b>x</b>",
    "nul": "nul\x00byte",
    "empty": "",
}
BAD_RUN_IDS = {**EVIL, "parent-folder": "../escape", "subfolder": "a/b",
               "hive-separator": "a=b", "schema-partition": "__schema__", "glob": "*", "latest": "latest"}
for _name, _value in BAD_RUN_IDS.items():
    case(f"run-id-{_name}", lambda ctx, v=_value: run_pipeline(_config_path(ctx), run_id=v),
         Fails(ConfigError, r"run_id: must start with an ASCII letter or digit and contain only ASCII letters, digits, "
               rf"'\.', '_' and '-' \(at most 128 characters\), and not be 'latest' \(got {re.escape(repr(_value))}\)"),
         then=_nothing_written)
case("run-id-of-the-stored-run", lambda ctx: run_pipeline(_config_path(ctx), run_id=ctx.run),
     Fails(AuditStoreError, r"run_id: <store> already holds a run '<run>'; a run id names one run"),
     then=_nothing_written)

# == input files: a clear error before the run, or a recorded quarantine and the run goes on ================


def _run(data: bytes, *edits: Edit, jsonl: bool = False, name: str = "in.csv") -> Act:
    name = "in.jsonl" if jsonl else name
    return lambda ctx: run_pipeline(ctx.settings(*(JSONL if jsonl else ()), *edits, inputs={name: data}))


def _payload_at_least(size: int) -> Callable[[Ctx, Any], None]:
    def then(ctx: Ctx, result: RunResult) -> None:
        with open_audit(ctx.store) as audit:
            longest = audit.sql("SELECT max(length(payload_json)) AS n FROM payloads WHERE run_id = $run",
                                {"run": result.run_id})["n"][0]
        assert longest > size  # the huge field was stored whole

    return then


def _kept_raw(needle: str) -> Callable[[Ctx, Any], None]:
    def then(ctx: Ctx, result: RunResult) -> None:
        with open_audit(ctx.store) as audit:
            raw = audit.sql("SELECT row_data_json FROM validation_errors WHERE run_id = $run",
                            {"run": result.run_id})["row_data_json"].to_list()
        assert any(needle in r for r in raw), raw

    return then


def _stored_raw(*expected: dict[str, Any]) -> Callable[[Ctx, Any], None]:
    """The quarantined records are stored exactly as ``expected`` (in source order): the text as read."""
    def then(ctx: Ctx, result: RunResult) -> None:
        with open_audit(ctx.store) as audit:
            stored = audit.sql("SELECT source_location, row_data_json FROM validation_errors WHERE run_id = $run",
                               {"run": result.run_id}).rows()
        stored.sort(key=lambda r: int(re.split(r":|#row", r[0])[-1]))
        assert [json.loads(raw) for _, raw in stored] == list(expected)

    return then


case("csv-too-few-fields", _run(HEADER + b"1,1.5,ok\n2,2.5\n3,3.5,ok\n"),
     Quarantines(("in.csv:3", "malformed_row", r"^record has 2 fields, the header has 3$"), good=2))
case("csv-too-many-fields", _run(HEADER + b"1,1.5,ok\n2,2.5,x,y\n"),
     Quarantines(("in.csv:3", "malformed_row", r"^record has 4 fields, the header has 3$"), good=1))
case("csv-unterminated-quote", _run(HEADER + b'1,1.5,ok\n2,2.5,"open\n3,3.5,ok\n'),
     Quarantines(("in.csv:3", "malformed_row", r"^malformed CSV record \(it runs to line 4\): unexpected end of data"),
                 good=1), then=_stored_raw({"line": 3, "text": '2,2.5,"open\n3,3.5,ok\n'}))
case("csv-numbers-in-other-digits-or-with-underscores",
     _run(HEADER + "1,1.5,ok\n\u0663,2.5,arabic\n3,\uff17.5,fullwidth\n1_000,4.5,underscore\n".encode()),
     Quarantines(("in.csv:3", "type_mismatch", r"^field 'id' should be int, got '\u0663'$"),
                 ("in.csv:4", "type_mismatch", r"^field 'amount' should be float, got '\uff17\.5'$"),
                 ("in.csv:5", "type_mismatch", r"^field 'id' should be int, got '1_000'$"), good=1))
case("csv-blank-lines-before-the-header", _run(b"\n\r\n" + HEADER + b"1,1.5,ok\n2,2.5,ok\n"), Completes(good=2))
case("csv-broken-quoted-field-spanning-lines",  # its tail, `9,9.5,done"`, is no record of its own
     _run(HEADER + b'1,1.5,"He said "hi" there\n9,9.5,done"\n2,2.5,ok\n3,3.5,"x"y\n4,4.5,ok\n'),
     Quarantines(("in.csv:2", "malformed_row", r"^malformed CSV record \(it runs to line 3\): ',' expected after"),
                 ("in.csv:5", "malformed_row", r"""^malformed CSV record: ',' expected after '"'$"""), good=2),
     then=_stored_raw({"line": 2, "text": '1,1.5,"He said "hi" there\n9,9.5,done"\n'},
                      {"line": 5, "text": '3,3.5,"x"y\n'}))
case("csv-stray-quote-in-a-quoted-field-takes-no-other-line",  # `"12" ruler"` closes before its comma
     _run(HEADER + b'1,1.5,"12" ruler"\n2,2.5,ok\n3,3.5,ok\n'),
     Quarantines(("in.csv:2", "malformed_row", r"""^malformed CSV record: ',' expected after '"'$"""), good=2))
case("csv-text-after-closing-quote", _run(HEADER + b'1,1.5,"ab"c\n2,2.5,ok\n'),
     Quarantines(("in.csv:2", "malformed_row", r"""^malformed CSV record: ',' expected after '"'$"""), good=1))
case("csv-invalid-utf8", _run(HEADER + b"1,1.5,ok\n2,2.5,caf\xe9\n3,3.5,ok\n"),
     Quarantines(("in.csv:3", "encoding", r"^bytes that are not valid utf-8$"), good=2), then=_kept_raw("caf\\\\xe9"))
case("csv-invalid-utf8-in-header", _run(b"id,amount,n\xf6te\n1,1.5,ok\n"),
     Fails(InputError, r"^<work>/in\.csv:1: the header line has bytes that are not valid utf-8$"),
     then=_nothing_written)
case("csv-utf8-bom", _run(b"\xef\xbb\xbf" + HEADER + b"1,1.5,ok\n2,2.5,ok\n"), Completes(good=2))
case("csv-empty-file", _run(b""),
     Fails(InputError, r"^pipeline\.yaml:5: source\.options\.path: <work>/in\.csv is empty; a CSV source needs a "
                       r"header line"),
     then=_nothing_written)
case("csv-header-only", _run(HEADER), Completes(good=0))
case("csv-header-lacks-a-declared-field", _run(b"id,amount\n1,1.5\n"),
     Fails(InputError, r"^<work>/in\.csv: the header lacks declared field\(s\) \['note'\] "
           r"\(header: \['id', 'amount'\]\)$"), then=_nothing_written)
case("csv-old-mac-line-endings", _run(b"id,amount,note\r1,1.5,a\r2,2.5,b\r"),
     Fails(InputError, r"^<work>/in\.csv:1: the header line ends with a bare carriage return "
                       r"\(old Mac line endings\?\); lines must end with \\n or \\r\\n$"), then=_nothing_written)
case("csv-duplicate-column", _run(b"id,amount,note,note\n1,1.5,a,b\n"),
     Fails(InputError, r"^<work>/in\.csv: duplicate column names in the header \['id', 'amount', 'note', 'note'\]$"),
     then=_nothing_written)
case("csv-type-mismatch", _run(HEADER + b"1,abc,not a number\n2,2.5,ok\n"),
     Quarantines(("in.csv:2", "type_mismatch", r"^field 'amount' should be float, got 'abc'$"), good=1))
case("csv-empty-required-value", _run(HEADER + b"1,,empty\n2,2.5,ok\n"),
     Quarantines(("in.csv:2", "missing_field", r"^required field 'amount' is empty$"), good=1))
case("csv-huge-field-over-16MiB", _run(HEADER + b"1,1.5,ok\n2,2.5," + b"x" * (LIMIT + 1) + b"\n3,3.5,ok\n"),
     Quarantines(("in.csv:3", "malformed_row", r"^malformed CSV record: field larger than field limit \(16777216\); "
                  r"only its first 65536 of 16777224 characters are kept$"), good=2),
     then=_stored_raw({"line": 3, "text": "2,2.5," + "x" * (65536 - 6), "text_chars": LIMIT + 8}))
case("csv-huge-field-just-under-16MiB", _run(HEADER + b"1,1.5,ok\n2,2.5," + b"x" * (LIMIT - 1) + b"\n"),
     Completes(good=2), then=_payload_at_least(LIMIT - 1))
_NON_FINITE_TEXT = ("nan", "inf", "-inf", "NaN", "Infinity", "-Infinity", "1e400", "-1e400")
case("csv-nan-and-infinities", _run(HEADER + b"".join(b"%d,%s,n\n" % (i, t.encode()) for i, t in
                                                      enumerate(_NON_FINITE_TEXT, start=1)) + b"9,1.5,ok\n"),
     Quarantines(*[(f"in.csv:{line}", "non_finite", rf"^\$\.amount: {text} is not a finite number; NaN and Infinity "
                    "cannot be hashed") for line, text in ((2, "nan"), (3, "inf"), (4, "-inf"), (5, "nan"),
                                                         (6, "inf"), (7, "-inf"), (8, "inf"), (9, "-inf"))], good=1),
     then=_stored_raw(*[{"id": str(i), "amount": t, "note": "n"} for i, t in enumerate(_NON_FINITE_TEXT, start=1)]))
_RANGE = r"^\$\.id: integer {} is outside the range RFC 8785 can represent exactly \(\+/-2\*\*53-1\)"
case("csv-integer-beyond-2**53", _run(HEADER + b"99999999999999999999999999,1.5,a\n9007199254740993,2.5,b\n"
                                      b"-9007199254740991,3.5,ok\n"),
     Quarantines(("in.csv:2", "integer_range", _RANGE.format("99999999999999999999999999")),
                 ("in.csv:3", "integer_range", _RANGE.format("9007199254740993")), good=1),
     then=_stored_raw({"id": "99999999999999999999999999", "amount": "1.5", "note": "a"},
                      {"id": "9007199254740993", "amount": "2.5", "note": "b"}))
case("csv-multi-line-records-located-at-their-first-line",
     _run(HEADER + b'1,1.5,ok\n2,abc,"three\nline\nnote"\n3,3.5,"caf\xe9\nlatte"\n4,4.5,"two\nlines"\n'),
     Quarantines(("in.csv:3", "type_mismatch", r"^field 'amount' should be float, got 'abc'$"),
                 ("in.csv:6", "encoding", r"^bytes that are not valid utf-8$"), good=2))
_NON_FINITE_JSON = r"^NaN or Infinity is not allowed in audited data \(use null\)$"
case("jsonl-nan-and-infinities", _run(b'{"id": 1, "amount": NaN, "note": "a"}\n{"id": 2, "amount": Infinity, '
                                      b'"note": "b"}\n{"id": 3, "amount": -Infinity, "note": "c"}\n'
                                      b'{"id": 4, "amount": 1e999, "note": "d"}\n{"id": 5, "amount": 1.5, '
                                      b'"note": "ok"}\n', jsonl=True),
     Quarantines(*[(f"in.jsonl:{n}", "non_finite", _NON_FINITE_JSON) for n in (1, 2, 3, 4)], good=1))
case("jsonl-lone-surrogate-escape", _run(b'{"id": 1, "amount": 1.5, "note": "\\ud800"}\n'
                                         b'{"id": 2, "amount": 2.5, "note": "\\ud83d\\ude00"}\n', jsonl=True),
     Quarantines(("in.jsonl:1", "invalid_unicode", r"^a \\u escape that is not Unicode text \(.*surrogate"), good=1))
case("jsonl-malformed-lines", _run(b'{"id": 1, "amount": 1.5\n[1, 2]\n"text"\n{"id": 4, "amount": 1.5, '
                                   b'"note": "ok"}\n', jsonl=True),
     Quarantines(("in.jsonl:1", "malformed_row", r"^invalid JSON: "),
                 ("in.jsonl:2", "malformed_row", r"^expected a JSON object, got list$"),
                 ("in.jsonl:3", "malformed_row", r"^expected a JSON object, got str$"), good=1))
case("jsonl-schema-violations", _run(b'{"id": "1", "amount": 1.5, "note": "a"}\n{"id": 2, "note": "b"}\n'
                                     b'{"id": 3, "amount": 1.5, "note": "c", "extra": 1}\n'
                                     b'{"id": 4, "amount": 1.5, "note": "ok"}\n', jsonl=True),
     Quarantines(("in.jsonl:1", "type_mismatch", r"^field 'id' should be int, got str '1'$"),
                 ("in.jsonl:2", "missing_field", r"^required field 'amount' is missing$"),
                 ("in.jsonl:3", "extra_field", r"^unexpected field\(s\) \['extra'\] \(schema mode fixed\)$"), good=1))
case("jsonl-invalid-utf8", _run(b'{"id": 1, "amount": 1.5, "note": "caf\xe9"}\n{"id": 2, "amount": 1.5, '
                                b'"note": "ok"}\n', jsonl=True),
     Quarantines(("in.jsonl:1", "encoding", r"^bytes that are not valid utf-8$"), good=1), then=_kept_raw("caf\\\\xe9"))
case("jsonl-utf8-bom", _run(b'\xef\xbb\xbf{"id": 1, "amount": 1.5, "note": "ok"}\n', jsonl=True), Completes(good=1))
case("jsonl-empty-file", _run(b"", jsonl=True), Completes(good=0))
OBSERVED = (("      mode: fixed", "      mode: observed"),
            ('      fields: ["id: int", "amount: float", "note: str"]', ""))
_BIG_INTS = (b'{"id": 99999999999999999999, "amount": 1.5, "note": "a"}\n'  # orjson alone reads 1e+20
             b'{"id": -9223372036854775809, "amount": 1.5, "note": "b"}\n'  # 19 digits, below -2**63: a float too
             b'{"id": 9007199254740993, "amount": 1.5, "note": "c"}\n'  # 2**53 + 1
             b'{"id": 4, "amount": 1.5, "note": "ok"}\n')
_BIG_INTS_QUARANTINED = Quarantines(("in.jsonl:1", "integer_range", _RANGE.format("99999999999999999999")),
                                    ("in.jsonl:2", "integer_range", _RANGE.format("-9223372036854775809")),
                                    ("in.jsonl:3", "integer_range", _RANGE.format("9007199254740993")), good=1)
_BIG_INTS_STORED = _stored_raw(*[{"line": line} for line in _BIG_INTS.decode().splitlines()[:3]])
case("jsonl-integer-beyond-2**53-observed-schema", _run(_BIG_INTS, *OBSERVED, jsonl=True), _BIG_INTS_QUARANTINED,
     then=_BIG_INTS_STORED)
case("jsonl-integer-beyond-2**53-fixed-schema", _run(_BIG_INTS, jsonl=True), _BIG_INTS_QUARANTINED,
     then=_BIG_INTS_STORED)
case("jsonl-schema-violation-with-a-value-that-cannot-be-hashed",
     _run(b'{"id": "1", "amount": 9007199254740993, "note": "a"}\n{"id": 2, "amount": 1.5, "note": "ok"}\n',
          jsonl=True),
     Quarantines(("in.jsonl:1", "type_mismatch", r"^field 'id' should be int, got str '1'$"), good=1),
     then=_stored_raw({"line": '{"id": "1", "amount": 9007199254740993, "note": "a"}'}))


def _nested_line(levels: int, key: str = "x", more: str = "") -> bytes:
    """A JSON object whose ``key`` holds lists nested ``levels`` deep (the object itself is one level more)."""
    return f'{{"id": 1, "amount": 1.5, "note": "a"{more}, "{key}": {"[" * levels}{"]" * levels}}}\n'.encode()


_TOO_DEEP = (_nested_line(400)  # read, but deeper than canonical JSON goes
             + _nested_line(1100)  # deeper than the JSON parsers go
             + _nested_line(1010, more=', "big": 12345678901234567890')  # read exactly by the stdlib: too deep
             + _nested_line(253)  # the deepest a row can be
             + b'{"id": 5, "amount": 1.5, "note": "ok"}\n')
case("jsonl-nested-too-deep",
     _run(_TOO_DEEP, *OBSERVED, jsonl=True),
     Quarantines(("in.jsonl:1", "too_deep", r"^\$\.x\[0\]\[0\].*: nested more than 254 levels deep"),
                 ("in.jsonl:2", "too_deep", r"^JSON nested too deeply to read \(depth limit exceeded"),
                 ("in.jsonl:3", "too_deep", r"^JSON nested too deeply to read \(maximum recursion depth"),
                 good=2),
     then=_stored_raw(*[{"line": line} for line in _TOO_DEEP.decode().splitlines()[:3]]))


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue())


PARQUET = (("  plugin: csv", "  plugin: parquet"), ("    path: in.csv", "    path: in.parquet"))
case("parquet-integer-beyond-2**53",
     _run(_parquet(pa.table({"id": [1, 2**62, 3], "amount": [1.5, 2.5, 3.5], "note": ["a", "b", "c"]})), *PARQUET,
          name="in.parquet"),
     Quarantines(("in.parquet#row2", "integer_range", _RANGE.format(2**62)), good=2),
     then=_stored_raw({"_repr": repr({"id": 2**62, "amount": 2.5, "note": "b"})}))


def _source_payloads(*expected: dict[str, Any]) -> Callable[[Ctx, RunResult], None]:
    """The source rows are stored as ``expected`` (in source order), each under the SHA-256 of its RFC 8785 form."""
    def then(ctx: Ctx, result: RunResult) -> None:
        with open_audit(ctx.store) as audit:
            stored = audit.sql("SELECT r.source_data_hash, p.payload_json FROM rows r JOIN payloads p "
                               "ON p.run_id = r.run_id AND p.payload_hash = r.source_data_hash "
                               "WHERE r.run_id = $run ORDER BY r.row_index", {"run": result.run_id}).rows()
        assert [json.loads(payload) for _, payload in stored] == list(expected)
        assert [h for h, _ in stored] == [hashlib.sha256(rfc8785.dumps(e)).hexdigest() for e in expected]

    return then


case("parquet-nanosecond-times-are-kept-whole",
     _run(_parquet(pa.table({"id": [1, 2], "amount": [1.5, 2.5], "note": ["a", "b"],
                             "at": pa.array([1_700_000_000_123_456_789, 1_700_000_000_123_456_000],
                                            pa.timestamp("ns"))})),
          *PARQUET, ('      fields: ["id: int", "amount: float", "note: str"]',
                     '      fields: ["id: int", "amount: float", "note: str", "at: any"]'), name="in.parquet"),
     Completes(good=2),
     then=_source_payloads({"id": 1, "amount": 1.5, "note": "a", "at": "2023-11-14T22:13:20.123456789+00:00"},
                           {"id": 2, "amount": 2.5, "note": "b", "at": "2023-11-14T22:13:20.123456+00:00"}))


def _chmod_stops_reading() -> bool:
    """False when the tests run as root (or with CAP_DAC_OVERRIDE): then permissions do not stop reading."""
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe"
        probe.write_text("x")
        probe.chmod(0)
        try:
            return not os.access(probe, os.R_OK)
        finally:
            probe.chmod(0o600)


def _unreadable_by_chmod(ctx: Ctx) -> Any:
    path = ctx.settings(inputs={"in.csv": HEADER + b"1,1.5,ok\n"})
    (ctx.work / "in.csv").chmod(0)
    ctx.stack.callback((ctx.work / "in.csv").chmod, 0o600)
    return run_pipeline(path)


def _fifo_input(ctx: Ctx) -> Any:
    path = ctx.settings()
    os.mkfifo(ctx.work / "in.csv")  # opening it for reading would block: it must be refused before that
    return run_pipeline(path)


def _directory_input(ctx: Ctx) -> Any:
    path = ctx.settings()
    (ctx.work / "in.csv").mkdir()
    return run_pipeline(path)


if _chmod_stops_reading():
    case("input-unreadable-chmod-000", _unreadable_by_chmod,
         Fails(InputError, r"^pipeline\.yaml:5: source\.options\.path: cannot read <work>/in\.csv: Permission denied$"))
else:
    case("input-unreadable-as-root-fifo-instead-of-chmod-000", _fifo_input,
         Fails(InputError, r"^pipeline\.yaml:5: source\.options\.path: <work>/in\.csv is not a file$"))
case("input-is-a-directory", _directory_input,
     Fails(InputError, r"^pipeline\.yaml:5: source\.options\.path: <work>/in\.csv is not a file$"))
case("input-missing", lambda ctx: run_pipeline(ctx.settings()),
     Fails(InputError, r"^pipeline\.yaml:5: source\.options\.path: input file <work>/in\.csv does not exist$"))
case("input-parquet-with-corrupt-footer",
     _run(b"PAR1" + b"\0" * 64, ("  plugin: csv", "  plugin: parquet"), ("    path: in.csv", "    path: in.parquet"),
          name="in.parquet"),
     Fails(InputError, r"^pipeline\.yaml:5: source\.options\.path: <work>/in\.parquet is not a readable Parquet file: "
           r"Parquet magic bytes not found in footer"), then=_nothing_written)


def _python_transform(body: str, *edits: Edit, rows: int = 3) -> Act:
    def act(ctx: Ctx) -> Any:
        (ctx.work / "plugin.py").write_text(body)
        return run_pipeline(ctx.settings(
            ("  on_success: raw", "  on_success: raw0"),
            ("transforms:", "transforms:\n  - {name: user_fn, plugin: python, input: raw0, on_success: raw, "
                            "on_error: bad, options: {function: 'plugin.py:explode'}}"), *edits,
            inputs={"in.csv": HEADER + b"".join(b"%d,%d.5,%c\n" % (i, i, 96 + i) for i in range(1, rows + 1))}))

    return act


def _recorded_transform_error(ctx: Ctx, result: RunResult) -> None:
    with open_audit(ctx.store) as audit:
        [(destination, details)] = audit.sql("SELECT destination, error_details_json FROM transform_errors "
                                             "WHERE run_id = $run", {"run": result.run_id}).rows()
    assert destination == "bad" and json.loads(details)["type"] == "ZeroDivisionError"
    assert [row["id"] for row in _lines(ctx.work / "bad.jsonl")] == [2]


def _recorded_failed_run(in_flight: int) -> Callable[[Ctx, RunFailedError], None]:
    """The run is stored failed, and its ``in_flight`` tokens ended failed, saying why: check() passes.

    With two in flight, branch a was held at the coalesce while b failed: a's state there shows it
    arrived, how long it waited and what its join held.
    """
    def then(ctx: Ctx, error: RunFailedError) -> None:
        assert error.result.status == "failed"
        with open_audit(ctx.store) as audit:
            params = {"run": error.result.run_id}
            [(status, message)] = audit.sql("SELECT status, error_message FROM runs WHERE run_id = $run",
                                            params).rows()
            ended = audit.sql("SELECT o.outcome, o.context_json, t.branch_name, o.token_id FROM token_outcomes o "
                              "JOIN tokens t USING (run_id, token_id) WHERE run_id = $run "
                              "AND o.context_json LIKE '%run_failed%' ORDER BY t.branch_name", params).rows()
            held_states = audit.sql(
                "SELECT s.token_id, s.status, s.context_after_json, s.error_json, s.started_at, s.completed_at, "
                "s.duration_ms FROM node_states s JOIN nodes n ON n.run_id = s.run_id AND n.node_id = s.node_id "
                "WHERE s.run_id = $run AND n.node_type = 'coalesce'", params).rows()
            assert audit.check(error.result.run_id).ok
            held_joins = audit.run_summary(error.result.run_id).coalesce.select(
                "coalesce", "policy", "decisions", "held_when_run_stopped").rows()
        assert status == "failed" and message == "SystemExit: 3"
        assert [o for o, _, _, _ in ended] == ["failed"] * in_flight
        contexts = [json.loads(c) for _, c, _, _ in ended]
        assert all(c["run_failed"] == {"error": "SystemExit: 3"} for c in contexts)
        if in_flight == 1:
            assert contexts == [{"run_failed": {"error": "SystemExit: 3"}}] and held_states == []
            assert held_joins == []  # no decision and nothing held: no coalesce to list
            return
        assert [b for _, _, b, _ in ended] == ["a", "b"]
        held, failing = contexts
        assert failing == {"run_failed": {"error": "SystemExit: 3"}}  # b never reached the coalesce
        [(token_id, state, state_context, error_json, started, completed, duration_ms)] = held_states
        assert token_id == ended[0][3] and state == "failed" and json.loads(state_context) == held
        assert held["held_at_coalesce"]["branches_arrived"] == ["a"]
        assert held["held_at_coalesce"]["arrival_order"] == [
            {"branch": "a", "token_id": token_id, "arrival_offset_ms": 0.0}]
        assert held["held_at_coalesce"]["branches_lost"] == {}
        assert held["held_at_coalesce"]["expected_branches"] == ["a", "b"]
        assert held_joins == [(held["held_at_coalesce"]["coalesce"], held["held_at_coalesce"]["policy"], 0, 1)]
        assert json.loads(error_json)["failure_reason"] == "run_failed"
        assert started <= completed
        assert duration_ms == pytest.approx((completed - started).total_seconds() * 1000, abs=1)

    return then


case("transform-module-raises-on-import", _python_transform("raise RuntimeError('no credentials')\n"),
     Fails(ConfigError, r"^pipeline\.yaml:\d+: transforms\[0\]\.options\.function: importing 'plugin\.py' for "
                        r"python function 'plugin\.py:explode' raised RuntimeError: no credentials$"))
case("transform-function-missing", _python_transform("def other(row):\n    return row\n"),
     Fails(ConfigError, r"^pipeline\.yaml:\d+: transforms\[0\]\.options\.function: cannot load python function "
                        r"'plugin\.py:explode': plugin\.py has no attribute 'explode'; it defines other$"))
_PARQUET_OUT = ("  out: {plugin: jsonl, options: {path: out.jsonl}}",
                "  out: {plugin: parquet, options: {path: out.parquet}}")
_PARQUET_SCHEMA = r" \(the sink's first row fixed the Parquet schema: id: int64, amount: double, note: string\)$"


def _parquet_rows_that_do_not_fit(ctx: Ctx, result: RunResult) -> None:
    """Rows 2 and 4 fail at the sink with its error; rows 1 and 3 (note missing: null) are in the file."""
    assert result.status == "completed"
    assert dict(result.outcomes) == {"coalesced": 8, "completed": 2, "failed": 2, "forked": 4}
    assert pq.read_table(ctx.work / "out.parquet").to_pylist() == [
        {"id": 1, "amount": 1.5, "note": "a"}, {"id": 3, "amount": 3.5, "note": None}]
    with open_audit(ctx.store) as audit:
        failed = audit.sql("SELECT r.row_index, o.sink_name, s.error_json FROM token_outcomes o "
                           "JOIN tokens t USING (run_id, token_id) JOIN rows r USING (run_id, row_id) "
                           "JOIN node_states s ON s.run_id = o.run_id AND s.token_id = o.token_id "
                           "AND s.status = 'failed' WHERE o.run_id = $run AND o.outcome = 'failed' "
                           "ORDER BY r.row_index", {"run": result.run_id}).rows()
        assert audit.check(result.run_id).ok and audit.verify(result.run_id).ok
    assert [(index, sink) for index, sink, _ in failed] == [(1, "out"), (3, "out")]
    errors = [json.loads(error) for _, _, error in failed]
    assert {(e["reason"], e["type"]) for e in errors} == {("sink_write_failed", "SinkWriteError")}
    assert re.fullmatch(r"field\(s\) 'extra' \(str\) not in the schema" + _PARQUET_SCHEMA, errors[0]["exception"])
    assert re.fullmatch(r"value\(s\) the columns cannot hold: 'amount' is str but its column is double"
                        + _PARQUET_SCHEMA, errors[1]["exception"])


case("parquet-sink-rows-that-do-not-fit-its-schema",
     _python_transform("def explode(row):\n    if row['id'] == 2:\n        row['extra'] = 'E'\n"
                       "    if row['id'] == 3:\n        del row['note']\n"
                       "    if row['id'] == 4:\n        row['amount'] = 'text'\n    return row\n",
                       _PARQUET_OUT, rows=4),
     Returns(_parquet_rows_that_do_not_fit, adds_run=True))
_CSV_OUT = ("  out: {plugin: jsonl, options: {path: out.jsonl}}",
            "  out: {plugin: csv, options: {path: out.csv}, on_write_failure: discard}")


def _csv_row_that_does_not_fit_fails_its_token(ctx: Ctx, result: RunResult) -> None:
    """What the on_write_failure warning says: the row that does not fit the header fails, the run goes on."""
    assert [w for w in result.warnings if "on_write_failure" in w] == [
        "pipeline.yaml:34: sinks.out.on_write_failure: accepted for ELSPETH compatibility, not applied (a row the "
        "sink cannot write fails its token, recorded with the sink's error, and the run goes on; a sink that breaks "
        "fails the run)"]
    assert result.status == "completed"
    assert dict(result.outcomes) == {"coalesced": 6, "completed": 2, "failed": 1, "forked": 3}
    assert (ctx.work / "out.csv").read_text() == "id,amount,note\n1,1.5,a\n3,3.5,c\n"
    with open_audit(ctx.store) as audit:
        [(sink, error)] = audit.sql("SELECT o.sink_name, s.error_json FROM token_outcomes o JOIN node_states s "
                                    "ON s.run_id = o.run_id AND s.token_id = o.token_id AND s.status = 'failed' "
                                    "WHERE o.run_id = $run AND o.outcome = 'failed'", {"run": result.run_id}).rows()
        assert audit.check(result.run_id).ok and audit.verify(result.run_id).ok
    assert sink == "out" and json.loads(error) == {
        "reason": "sink_write_failed", "type": "SinkWriteError",
        "exception": "row fields ['amount', 'extra', 'id', 'note'] do not match the CSV header "
                     "['id', 'amount', 'note']"}


case("csv-sink-row-that-does-not-fit-the-header",
     _python_transform("def explode(row):\n    if row['id'] == 2:\n        row['extra'] = 'E'\n    return row\n",
                       _CSV_OUT),
     Returns(_csv_row_that_does_not_fit_fails_its_token, adds_run=True))
case("transform-raises-on-one-row",
     _python_transform("def explode(row):\n    if row['id'] == 2:\n        raise ZeroDivisionError('boom')\n"
                       "    return row\n"),
     Completes(good=2, outcomes={"routed": 1}), then=_recorded_transform_error)
case("transform-exits-the-process", _python_transform("def explode(row):\n    raise SystemExit(3)\n"),
     Fails(RunFailedError, r"^run \w+ failed: SystemExit: 3$", adds_run=True), then=_recorded_failed_run(1))

def _branch_transform(body: str) -> Act:
    """PIPELINE with branch b's transform replaced by the python function ``explode`` (on_error: bad)."""
    def act(ctx: Ctx) -> Any:
        (ctx.work / "plugin.py").write_text(body)
        return run_pipeline(ctx.settings(
            ("    plugin: truncate", "    plugin: python\n    on_error: bad"),
            ('    options: {fields: {note: 8}, suffix: ".."}', "    options: {function: 'plugin.py:explode'}"),
            inputs={"in.csv": HEADER + b"1,1.5,a\n2,2.5,b\n3,3.5,c\n"}))

    return act


def _branch_error(reason: str) -> Returns:
    """Row 2's branch b fails like any transform error: recorded, routed to bad, its coalesce fails, check() ok."""
    def check(ctx: Ctx, result: RunResult) -> None:
        assert result.status == "completed"
        assert dict(result.outcomes) == {"forked": 3, "coalesced": 4, "completed": 2, "routed": 1, "failed": 1}
        with open_audit(ctx.store) as audit:
            assert audit.check(result.run_id).ok
            [(destination, details)] = audit.sql("SELECT destination, error_details_json FROM transform_errors "
                                                 "WHERE run_id = $run", {"run": result.run_id}).rows()
        assert destination == "bad" and json.loads(details)["reason"] == "non_canonical_output"
        assert re.search(reason, json.loads(details)["error"]), details
        assert [row["id"] for row in _lines(ctx.work / "bad.jsonl")] == [2]
        assert [row["id"] for row in _lines(ctx.work / "out.jsonl")] == [1, 3]

    return Returns(check, adds_run=True)


case("transform-in-a-branch-returns-a-row-that-contains-itself",
     _branch_transform("def explode(row):\n    if row['id'] == 2:\n        row['me'] = row\n    return row\n"),
     _branch_error(r"^\$\.me\.me\..*nested more than 254 levels deep \(or a value that contains itself\)"))
case("transform-in-a-branch-exits-the-process", _branch_transform("def explode(row):\n    raise SystemExit(3)\n"),
     Fails(RunFailedError, r"^run \w+ failed: SystemExit: 3$", adds_run=True), then=_recorded_failed_run(2))
case("transform-in-a-branch-returns-nan",
     _branch_transform("def explode(row):\n    row['score'] = float('nan') if row['id'] == 2 else 0.5\n"
                       "    return row\n"),
     _branch_error(r"^\$\.score: nan is not a finite number"))


# == a sink that breaks as a whole: the run fails, naming it, and the trail keeps everything recorded ==========


def _broken_sink(cls: type, method: str, error: Exception, *edits: Edit, rows: int = 3, cli: bool = False,
                 **run: Any) -> Act:
    """Run PIPELINE (``rows`` rows) with ``cls.method`` of the ``out`` sink raising ``error`` once it holds a row."""
    def act(ctx: Ctx) -> Any:
        real = getattr(cls, method)

        def broken(sink: Any, *args: Any) -> Any:
            if sink.path.name.startswith("out.") and sink.rows:
                raise error
            return real(sink, *args)

        ctx.stack.enter_context(pytest.MonkeyPatch.context()).setattr(cls, method, broken)
        path = ctx.settings(*edits, inputs={"in.csv": HEADER + b"".join(b"%d,1.5,n\n" % i for i in range(rows))})
        if not cli:
            return run_pipeline(path, **run)
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["run", str(path)])
        return code, out.getvalue(), err.getvalue()

    return act


def _failed_at_sink(failed_token: str | None = None) -> Callable[[Ctx, Any], None]:
    """The run is stored failed with the sink's error, every row it read and no artifact for ``out``; every token
    has an outcome and check() passes; ``failed_token``: the error of the token being written."""
    def then(ctx: Ctx, error: RunFailedError) -> None:
        result = error.result
        assert result.status == "failed" and str(error) == f"run {result.run_id} failed: {result.error}"
        with open_audit(ctx.store) as audit:
            params = {"run": result.run_id}
            [(status, message, rows)] = audit.sql("SELECT status, error_message, (SELECT count(*) FROM rows "
                                                  "WHERE run_id = $run) FROM runs WHERE run_id = $run", params).rows()
            sinks = audit.sql("SELECT n.node_name FROM artifacts a JOIN nodes n ON n.run_id = a.run_id AND "
                              "n.node_id = a.sink_node_id WHERE a.run_id = $run", params)["node_name"].to_list()
            errors = audit.sql("SELECT s.error_json FROM node_states s JOIN nodes n ON n.run_id = s.run_id AND "
                               "n.node_id = s.node_id WHERE s.run_id = $run AND n.node_name = 'out' "
                               "AND s.status = 'failed'", params)["error_json"].to_list()
            unfinished = audit.sql("SELECT count(*) AS n FROM tokens t WHERE run_id = $run AND NOT EXISTS (SELECT 1 "
                                   "FROM token_outcomes o WHERE o.run_id = t.run_id AND o.token_id = t.token_id)",
                                   params)["n"][0]
            violations = audit.check(result.run_id).violations
        assert (status, message, rows) == ("failed", result.error, result.rows)
        assert sinks == ["bad"]
        assert [json.loads(e) for e in errors] == ([] if failed_token is None else [
            {"reason": "sink_failed", "type": "ValueError", "exception": failed_token}])
        assert (violations.height, unfinished) == (0, 0)  # tokens in flight when the sink broke ended failed

    return then


def _cli_says_one_line(ctx: Ctx, said: tuple[int, str, str]) -> None:
    code, out, err = said
    assert code == 1 and "Traceback" not in out + err, out + err
    [line] = [line for line in out.splitlines() if "error" in line]
    assert re.fullmatch(ctx.sub(r"  error: SinkFailedError: sink 'out' \(<work>/out\.parquet\): close failed: "
                                r"ArrowInvalid: Could not convert 'text' with type str"), line), line


_NO_SPACE = OSError(28, "No space left on device")
_ARROW_INVALID = pa.ArrowInvalid("Could not convert 'text'\nwith type str")  # a message on two lines
_SINK_FAILED = r"^run \w+ failed: SinkFailedError: sink 'out' \(<work>/out\.(jsonl|parquet)\): "
case("sink-write-raises-something-else-than-a-row-error", _broken_sink(JsonlSink, "write", ValueError("bug in a sink")),
     Fails(RunFailedError, _SINK_FAILED + r"write failed: ValueError: bug in a sink$", adds_run=True),
     then=_failed_at_sink("bug in a sink"))
case("sink-flush-fails-mid-run", _broken_sink(JsonlSink, "flush", _NO_SPACE, rows=130, flush_interval_s=0),
     Fails(RunFailedError, _SINK_FAILED + r"flush failed: OSError: \[Errno 28\] No space left on device$",
           adds_run=True), then=_failed_at_sink())
case("sink-close-fails", _broken_sink(JsonlSink, "close", _NO_SPACE),
     Fails(RunFailedError, _SINK_FAILED + r"close failed: OSError: \[Errno 28\] No space left on device$",
           adds_run=True), then=_failed_at_sink())
case("parquet-sink-flush-raises-arrow-error",
     _broken_sink(ParquetSink, "flush", _ARROW_INVALID, _PARQUET_OUT),
     Fails(RunFailedError, _SINK_FAILED + r"close failed: ArrowInvalid: Could not convert 'text' with type str$",
           adds_run=True), then=_failed_at_sink())
case("sink-fails-cli-prints-the-error-not-a-traceback",
     _broken_sink(ParquetSink, "flush", _ARROW_INVALID, _PARQUET_OUT, cli=True),
     Returns(_cli_says_one_line, adds_run=True))

# == where the run writes: clear errors before anything is written ====================================


def _audit_under_a_file(ctx: Ctx) -> Any:
    (ctx.work / "blocker").write_text("a file, not a folder")
    return run_pipeline(_config_path(ctx), audit=ctx.work / "blocker" / "audit")


def _sink_is_a_directory(ctx: Ctx) -> Any:
    path = _config_path(ctx)
    (ctx.work / "out.jsonl").mkdir()
    return run_pipeline(path)


case("audit-path-under-a-file", _audit_under_a_file,
     Fails(AuditStoreError, r"^audit path <work>/blocker/audit is not writable \(Not a directory\)"))
case("audit-path-is-a-file", lambda ctx: run_pipeline(_config_path(ctx), audit=ctx.store / "audit.duckdb"),
     Fails(AuditStoreError, r"^audit path <store>/audit\.duckdb is a file, not a folder: an audit store is a folder"))


def _import_into_a_file(ctx: Ctx) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = main(["import", str(ELSPETH_SAMPLE), "--audit", str(ctx.store / "audit.duckdb")])
    return code, err.getvalue()


def _says_audit_is_a_file(ctx: Ctx, said: tuple[int, str]) -> None:
    assert said == (2, f"elspeth-nb import: audit path {ctx.store}/audit.duckdb is a file, not a folder: an audit "
                       "store is a folder (give a new or empty folder, or the store's own folder)\n"), said


case("import-audit-path-is-a-file", _import_into_a_file, Returns(_says_audit_is_a_file))
case("sink-path-is-a-directory", _sink_is_a_directory,
     Fails(InputError, r"^pipeline\.yaml:\d+: sinks\.out\.options\.path: <work>/out\.jsonl is a directory; a sink "
                       r"writes a file$"))

# == the audit store: locked, damaged or newer than this release ======================================

HOLDER = ("import duckdb, sys\ncon = duckdb.connect(sys.argv[1])\ncon.execute('SELECT 1')\n"
          "print('ready', flush=True)\nsys.stdin.read()\n")


def _run_while_duckdb_is_held(ctx: Ctx) -> Any:
    """Another process holds a write connection to audit.duckdb for the whole run."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ctx.store / "audit.duckdb")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        return run_pipeline(_config_path(ctx))
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def _truncate_duckdb(ctx: Ctx) -> None:
    path = ctx.store / "audit.duckdb"
    path.write_bytes(path.read_bytes()[:5000])


def _newer_manifest(ctx: Ctx) -> None:
    manifest = ctx.store / "elspeth-nb-store.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "schema_version": SCHEMA_VERSION + 1}))


def _newer_duckdb(ctx: Ctx) -> None:
    with duckdb.connect(str(ctx.store / "audit.duckdb")) as con:
        con.execute("UPDATE runs SET schema_version = $v", {"v": SCHEMA_VERSION + 1})


def _newer_run_segment(ctx: Ctx) -> None:
    """A run written by a newer release next to ours: its runs segment says a newer schema version."""
    runs = AuditStore(ctx.store).read_partition("runs", ctx.run)
    column = runs.schema.get_field_index("schema_version")
    newer = runs.set_column(column, runs.schema.field(column),
                            pa.array([SCHEMA_VERSION + 1] * runs.num_rows, runs.schema.field(column).type))
    folder = ctx.store / "parquet" / "runs" / "run_id=from-the-future"
    folder.mkdir()
    pq.write_table(newer, folder / "part-000000.parquet")


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _opened(ctx: Ctx) -> Audit:
    assert ctx.opened is not None
    return ctx.opened


def _segment(ctx: Ctx, table: str) -> Path:
    return ctx.store / "parquet" / table / f"run_id={ctx.run}" / "part-000000.parquet"


def _zero_footer(table: str) -> Callable[[Ctx], None]:
    """The footer length and magic bytes at the end of the run's first segment of ``table`` overwritten."""
    def arrange(ctx: Ctx) -> None:
        data = bytearray(_segment(ctx, table).read_bytes())
        data[-8:] = b"\0" * 8
        _segment(ctx, table).write_bytes(bytes(data))

    return arrange


def _garble_footer(table: str) -> Callable[[Ctx], None]:
    """The footer's metadata bytes inverted, its length and magic bytes intact (DuckDB then names no file)."""
    def arrange(ctx: Ctx) -> None:
        data = bytearray(_segment(ctx, table).read_bytes())
        length = int.from_bytes(data[-8:-4], "little")
        for i in range(len(data) - 8 - length, len(data) - 8):
            data[i] ^= 0xFF
        _segment(ctx, table).write_bytes(bytes(data))

    return arrange


def _open_then(damage: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    """Open the audit first, then damage the store under it (``ctx.opened`` is the audit opened before)."""
    def arrange(ctx: Ctx) -> None:
        ctx.opened = ctx.audit()
        assert ctx.opened.runs().height == 1
        damage(ctx)

    return arrange


def _damage_page(table: str) -> Callable[[Ctx], None]:
    """Every data page of the run's first segment of ``table`` inverted, its footer intact (DuckDB then fails
    mid-query, "Out of buffer" or a thrift error, and names no file)."""
    def arrange(ctx: Ctx) -> None:
        path = _segment(ctx, table)
        data = bytearray(path.read_bytes())
        group = pq.read_metadata(path).row_group(0)
        first = min(c.dictionary_page_offset or c.data_page_offset for c in map(group.column, range(group.num_columns)))
        for i in range(first, len(data) - 8 - int.from_bytes(data[-8:-4], "little")):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))

    return arrange


def _open_warned(ctx: Ctx) -> tuple[Audit, list[str]]:
    """open_audit on a store with an unreadable segment: the audit and the warnings it gave."""
    with pytest.warns(AuditStoreWarning) as warned:
        audit = ctx.audit()
    return audit, [str(w.message) for w in warned]


def _left_out(table: str) -> Callable[[Ctx, Any], None]:
    """The store opened, with one warning naming the unreadable segment and it in ``problems``; the run's helpers
    refuse it with an AuditStoreError naming it; verify reports it (and the Merkle root no longer matches)."""
    def check(ctx: Ctx, result: tuple[Audit, list[str]]) -> None:
        audit, warned = result
        file = _segment(ctx, table)
        says = ctx.sub(rf"^<store>: a segment of the audit store cannot be read: {re.escape(str(file))}: ")
        assert len(warned) == 1 and re.match(says + r".*\. Left out of every table: helpers refuse", warned[0])
        assert [p.split(": ")[0] for p in audit.problems] == [str(file)] and str(file) in repr(audit)
        assert audit.runs()["run_id"].to_list() == [ctx.run]
        for helper in (audit.run_summary, audit.check, audit.merge_timings, lambda r: audit.lineage(r, row_index=0)):
            refusal = ctx.sub(r"^<store>: run <run> cannot be read in full: ")
            with pytest.raises(AuditStoreError, match=refusal) as refused:
                helper(ctx.run)
            assert list(refused.value.segments) == [file]
        verified = audit.verify(ctx.run)
        assert not verified.ok and verified.merkle == "mismatch"
        found = verified.mismatches.select("check", "table", "record_id").rows()
        assert found[0] == ("segment_unreadable", table, file.name), found

    return check


def _page_unreadable(table: str) -> Callable[[Ctx, Any], None]:
    """verify names the segment, the checks it kept from being done, and the Merkle mismatch it makes."""
    def check(ctx: Ctx, result: Any) -> None:
        assert not result.ok and result.merkle == "mismatch"
        rows = result.mismatches.select("check", "table", "record_id", "detail").rows()
        assert [r[:3] for r in rows] == [("segment_unreadable", table, "part-000000.parquet"),
                                         ("merkle_segment_unreadable", table, "part-000000.parquet")]
        assert rows[0][3].startswith(f"{_segment(ctx, table)} cannot be read (")
        assert re.search(r"; not verified: sink file file://\S+\.jsonl$", rows[0][3]), rows[0][3]

    return check


def _names_unreadable(table: str) -> Callable[[Ctx, Any], None]:
    def check(ctx: Ctx, result: Any) -> None:
        findings = [(f.table, f.part_file, f.kind) for f in result.findings]
        assert findings == [(table, "part-000000.parquet", "segment_unreadable")]
        assert not result.ok

    return check


def _verify_names_unreadable(table: str) -> Callable[[Ctx, Any], None]:
    def check(ctx: Ctx, result: Any) -> None:
        assert not result.ok and result.merkle == "mismatch"
        rows = result.mismatches.select("check", "table", "record_id").rows()
        assert rows == [("merkle_segment_unreadable", table, "part-000000.parquet")]

    return check


SEGMENT = r"<store>/parquet/{table}/run_id=<run>/part-000000\.parquet"
for _table in ("tokens", "runs", "segment_digests"):
    _file = SEGMENT.format(table=_table)
    _zero, _garble = _zero_footer(_table), _garble_footer(_table)
    case(f"corrupt-{_table}-footer-open_audit", _open_warned, Returns(_left_out(_table)),
         arrange=_zero, damage="parquet")
    case(f"garbled-{_table}-footer-open_audit", _open_warned, Returns(_left_out(_table)),
         arrange=_garble, damage="parquet")
    if _table == "tokens":  # the runs and digests tables are still readable: verify_run names the file
        case("corrupt-tokens-footer-verify_run", lambda ctx: verify_run(AuditStore(ctx.store), ctx.run),
             Returns(_names_unreadable("tokens")), arrange=_zero, damage="parquet")
        case("corrupt-tokens-footer-run_pipeline", lambda ctx: run_pipeline(_config_path(ctx)),
             Completes(good=1, read_from="audit.duckdb"), arrange=_zero, damage="parquet")
        case("corrupt-tokens-footer-after-open-runs", lambda ctx: _opened(ctx).runs(),
             Fails(AuditStoreError, rf"^<store>: a segment of the audit store cannot be read: .*'{_file}'"),
             arrange=_open_then(_zero), damage="parquet")
        case("corrupt-tokens-footer-after-open-verify", lambda ctx: _opened(ctx).verify(ctx.run),
             Returns(_verify_names_unreadable("tokens")), arrange=_open_then(_zero), damage="parquet")
    else:
        case(f"corrupt-{_table}-footer-verify_run", lambda ctx: verify_run(AuditStore(ctx.store), ctx.run),
             Fails(AuditStoreError, rf"^segment {_file} of the audit store cannot be read: .*magic bytes"),
             arrange=_zero, damage="parquet")
_PAGE = rf"^<store>: a segment of the audit store cannot be read: {SEGMENT.format(table='node_states')}: "
case("damaged-node_states-page-check", lambda ctx: ctx.audit().check(ctx.run), Fails(AuditStoreError, _PAGE),
     arrange=_damage_page("node_states"), damage="parquet")
case("damaged-node_states-page-lineage", lambda ctx: ctx.audit().lineage(ctx.run, row_index=0),
     Fails(AuditStoreError, _PAGE), arrange=_damage_page("node_states"), damage="parquet")
case("damaged-node_states-page-verify", lambda ctx: ctx.audit().verify(ctx.run),
     Returns(_page_unreadable("node_states")), arrange=_damage_page("node_states"), damage="parquet")
case("corrupt-runs-footer-run_pipeline", lambda ctx: run_pipeline(_config_path(ctx)),
     Fails(AuditStoreError, rf"^segment {SEGMENT.format(table='runs')} of the audit store cannot be read: "),
     arrange=_zero_footer("runs"), damage="parquet", then=_nothing_written)
case("garbled-runs-footer-after-open-run_summary", lambda ctx: _opened(ctx).run_summary(ctx.run),
     Fails(AuditStoreError, rf"^<store>: a segment of the audit store cannot be read: {SEGMENT.format(table='runs')}"),
     arrange=_open_then(_garble_footer("runs")), damage="parquet")

case("audit-duckdb-locked-by-another-process", _run_while_duckdb_is_held,
     Pending(r"^<store>/audit\.duckdb is held by another process \(IO Error: Could not set lock on file"))
case("audit-duckdb-truncated-run", lambda ctx: run_pipeline(_config_path(ctx)),
     Pending(r"audit\.duckdb cannot be opened or written \(IO Error: .*\).* recreates audit\.duckdb from them$",
             then_syncs=False), arrange=_truncate_duckdb, damage="duckdb")
case("audit-duckdb-truncated-open_audit", lambda ctx: ctx.audit(ctx.store / "audit.duckdb"),
     Fails(AuditStoreError, r"^cannot open <store>/audit\.duckdb read-only: IO Error: "),
     arrange=_truncate_duckdb, damage="duckdb")
case("manifest-newer-schema-open_audit", lambda ctx: ctx.audit(),
     Fails(SchemaVersionError, rf"^<store> was written with audit schema version {SCHEMA_VERSION + 1}; this "
           rf"elspeth-nb reads up to version {SCHEMA_VERSION}\. Upgrade elspeth-nb to read it\.$"),
     arrange=_newer_manifest, damage="manifest")
case("manifest-newer-schema-run_pipeline", lambda ctx: run_pipeline(_config_path(ctx)),
     Fails(SchemaVersionError, rf"^<store> was written with audit schema version {SCHEMA_VERSION + 1};"),
     arrange=_newer_manifest, damage="manifest", then=_nothing_written)
case("manifest-not-json-open_audit", lambda ctx: ctx.audit(),
     Fails(AuditStoreError, r"^<store>/elspeth-nb-store\.json is unreadable or not JSON: "),
     arrange=lambda ctx: _write(ctx.store / "elspeth-nb-store.json", b"{not json"), damage="manifest")
case("duckdb-newer-schema-open_audit", lambda ctx: ctx.audit(ctx.store / "audit.duckdb"),
     Fails(SchemaVersionError, rf"^<store>/audit\.duckdb holds runs written with audit schema version "
           rf"{SCHEMA_VERSION + 1}; this elspeth-nb reads up to version {SCHEMA_VERSION}\."),
     arrange=_newer_duckdb, damage="duckdb")
case("run-segment-newer-schema-open_audit", lambda ctx: ctx.audit(),
     Fails(SchemaVersionError, rf"^<store> holds runs written with audit schema version {SCHEMA_VERSION + 1};"),
     arrange=_newer_run_segment, damage="parquet")
case("open_audit-missing-path", lambda ctx: ctx.audit(ctx.work / "nowhere"),
     Fails(AuditStoreError, r"^audit path <work>/nowhere does not exist; expected an elspeth-nb audit store"))


def _open_file(data: bytes) -> Act:
    def act(ctx: Ctx) -> Any:
        (ctx.work / "x.db").write_bytes(data)
        return ctx.audit(ctx.work / "x.db")

    return act


case("open_audit-not-a-database", _open_file(b"hello, world" * 4),
     Fails(AuditStoreError, r"^<work>/x\.db is neither a DuckDB nor an SQLite database \(unrecognised file header\)"))
case("open_audit-folder-without-manifest", lambda ctx: ctx.audit(ctx.store / "parquet"),
     Fails(AuditStoreError, r"^<store>/parquet is a folder but not an elspeth-nb audit store "
           r"\(no elspeth-nb-store\.json\)"))

# == user ids with quotes and SQL in them, given to every Audit helper and to the explorer ==============

#: helper -> (call with the audit, the stored run and the id; what the id is called in the not-found message)
ID_HELPERS: dict[str, tuple[Callable[[Audit, str, str], Any], str]] = {
    "runs-run_summary": (lambda a, r, v: a.run_summary(v), "run"),
    "runs-outcomes": (lambda a, r, v: a.outcomes(v), "run"),
    "lineage-run_id": (lambda a, r, v: a.lineage(v, row_index=0), "run"),
    "lineage-row_id": (lambda a, r, v: a.lineage(r, row_id=v), "row_id"),
    "lineage-token_id": (lambda a, r, v: a.lineage(r, token_id=v), "token_id"),
    "lineage-context-event_id": (lambda a, r, v: a.lineage(r, row_index=0).context(v), "event_id"),
    "coalesce_events-run_id": (lambda a, r, v: a.coalesce_events(v), "run"),
    "coalesce_events-coalesce": (lambda a, r, v: a.coalesce_events(r, coalesce=v), "coalesce"),
    "merge_timings-run_id": (lambda a, r, v: a.merge_timings(v), "run"),
    "merge_timings-coalesce": (lambda a, r, v: a.merge_timings(r, coalesce=v), "coalesce"),
    "merge_timing_summary-run_id": (lambda a, r, v: a.merge_timing_summary(v), "run"),
    "policy_outcomes-run_id": (lambda a, r, v: a.policy_outcomes(v), "run"),
    "check-run_id": (lambda a, r, v: a.check(v), "run"),
    "verify-run_id": (lambda a, r, v: a.verify(v), "run"),
    "diff_runs-first": (lambda a, r, v: a.diff_runs(v, r), "run"),
    "diff_runs-second": (lambda a, r, v: a.diff_runs(r, v), "run"),
    "diff_runs-both": (lambda a, r, v: a.diff_runs(v, v), "run"),
    "explorer-run_id": (lambda a, r, v: _explorer(a, run_id=v), "run"),
    "explorer-run-picker": (lambda a, r, v: _pick(a, v), "picker"),
    "explorer-search-row_id": (lambda a, r, v: _explorer(a).search(v, by="row_id"), "html:row_id"),
    "explorer-search-token_id": (lambda a, r, v: _explorer(a).search(v, by="token_id"), "html:token_id"),
    "explorer-search-row_index": (lambda a, r, v: _explorer(a).search(v, by="row_index"), "html:row_index"),
    "sql-params": (lambda a, r, v: a.sql("SELECT * FROM runs WHERE run_id = $id", {"id": v}),
                   "empty"),
    "verify-expected_root": (lambda a, r, v: a.verify(r, expected_root=v), "root"),
}


def _explorer(audit: Audit, **kwargs: Any) -> Any:
    from elspeth_nb.widgets import AuditExplorer

    return AuditExplorer(audit, **kwargs)


def _pick(audit: Audit, value: str) -> Any:
    from traitlets import TraitError

    explorer = _explorer(audit)
    shown = explorer.panes[0].value
    with pytest.raises(TraitError, match="Invalid selection: value not found"):
        explorer.run_picker.value = value
    assert explorer.run_id == audit.runs()["run_id"][0] and explorer.panes[0].value == shown  # still on the run
    return explorer


def _id_outcome(kind: str, value: str) -> Outcome:
    v = re.escape(value)
    if kind == "run":
        return Fails(RunNotFoundError, rf"^Run `{v}` not found\. Available: `<run>`\.")
    if kind in ("row_id", "token_id"):
        return Fails(NotFoundError, rf"^Run `<run>`: {kind} `{v}` not found\. Available: `")
    if kind == "event_id":
        return Fails(NotFoundError, rf"^Coalesce event of row `\w+`: `{v}` not found\. Available: `")
    if kind == "coalesce":
        return Fails(NotFoundError, rf"^Coalesce in run `<run>`: `{v}` not found\. Available: `merge3`\.$")
    if kind == "picker":
        return Returns(lambda ctx, explorer: None)
    if kind == "empty":
        return Returns(lambda ctx, frame: _assert_empty(frame))
    if kind == "root":
        return Returns(lambda ctx, result: _assert_root_mismatch(result, value))
    return Returns(lambda ctx, html: _assert_shown(ctx, html, kind.removeprefix("html:"), value))


def _assert_empty(frame: pl.DataFrame) -> None:
    assert isinstance(frame, pl.DataFrame) and frame.height == 0 and "run_id" in frame.columns


def _assert_root_mismatch(result: Any, value: str) -> None:
    assert not result.ok and result.merkle == "mismatch"
    assert result.mismatches.select("check", "expected").rows() == [("merkle_root_changed", value)]


def _assert_shown(ctx: Ctx, html: str, by: str, value: str) -> None:
    """The explorer shows the error as escaped text: never the id as markup, never a crash."""
    text = value.strip()
    if not text:
        assert html == "<p class='enb-note'>Enter a row index, row id or token id, then press Explain.</p>"
    elif by == "row_index":
        assert html == f"<p class='enb-error'>{escape(f'A row index is a whole number (got {text!r}).')}</p>"
    else:
        assert html.startswith(f"<p class='enb-error'>{escape(f'Run `{ctx.run}`: {by} `{text}` not found.')}")
    assert "<b>" not in html


#: Every helper gets the five ids of the issue; ids that only matter to some get only those helpers.
EXTRA_IDS: dict[str, tuple[str, ...]] = {
    "html": ("runs-run_summary", "explorer-run_id", "explorer-search-row_id", "explorer-search-token_id",
             "explorer-search-row_index"),
    "nul": ("runs-run_summary", "lineage-row_id", "coalesce_events-coalesce", "explorer-search-token_id",
            "sql-params"),
    "empty": ("runs-run_summary", "lineage-row_id", "lineage-token_id", "coalesce_events-coalesce",
              "explorer-search-row_id", "explorer-search-row_index", "verify-expected_root", "sql-params"),
    "superscript-two": ("explorer-search-row_index",),  # "²".isdigit() is True, int("²") fails
}
ID_VALUES = {**EVIL, "superscript-two": "²"}
for _helper, (_call, _kind) in ID_HELPERS.items():
    for _name, _value in ID_VALUES.items():
        if _name in EXTRA_IDS and _helper not in EXTRA_IDS[_name]:
            continue
        case(f"id-{_helper}-{_name}", lambda ctx, c=_call, v=_value: c(ctx.audit(), ctx.run, v),
             _id_outcome(_kind, _value))

for _name, _query, _says in (
        ("drop", "DROP TABLE runs", r"not DROP$"),
        ("second-statement", "SELECT 1; DROP TABLE runs; --", r"; got 2 statements$"),
        ("copy-to-a-file", "COPY runs TO '/tmp/enb-stolen.csv'", r"not COPY$"),
        ("attach", "ATTACH '/tmp/enb-other.db' AS other", r"not ATTACH$"),
        ("set-configuration", "SET enable_external_access = true", r"not SET$"),
        ("read-outside-the-store", "SELECT * FROM read_csv('/etc/hostname')",
         r"^the audit reads only its own tables: Permission Error: Cannot access file \"/etc/hostname\""),
):
    case(f"sql-{_name}", lambda ctx, q=_query: ctx.audit().sql(q), Fails(ReadOnlyError, _says))


# == wrong argument types and values: named where they were passed, never a deep library error or a changed answer

_PATH = r"must be a path \(str or os\.PathLike\), not "
for _name, _act, _outcome in (
        ("open_audit-path-None", lambda ctx: open_audit(None), Fails(TypeError, rf"^path {_PATH}NoneType None$")),
        ("open_audit-path-blank", lambda ctx: open_audit("  "), Fails(ValueError, r"^path is an empty path$")),
        ("load_pipeline-None", lambda ctx: load_pipeline(None), Fails(TypeError, rf"^pipeline {_PATH}NoneType None$")),
        ("load_pipeline-int", lambda ctx: load_pipeline(3), Fails(TypeError, rf"^pipeline {_PATH}int 3$")),
        ("run_pipeline-None", lambda ctx: run_pipeline(None), Fails(TypeError, rf"^pipeline {_PATH}NoneType None$")),
        ("run_pipeline-audit-int", lambda ctx: run_pipeline(_config_path(ctx), audit=5),
         Fails(TypeError, rf"^audit {_PATH}int 5$")),
        ("coalesce_events-include_late-str", lambda ctx: ctx.audit().coalesce_events(include_late="no"),
         Fails(TypeError, r"^include_late must be True or False, not str 'no'$")),
        ("merge_timing_summary-by-None", lambda ctx: ctx.audit().merge_timing_summary(by=None),
         Fails(TypeError, r"^by must be a column name or a sequence of names from coalesce, branch, policy, "
                          r"merge_strategy, trigger, event_type, not NoneType None$")),
        ("outcomes-by-list", lambda ctx: ctx.audit().outcomes(by=["outcome"]),
         Fails(TypeError, r"^by must be one of outcome, node, sink, branch, not list \['outcome'\]$")),
        ("lineage-context-int", lambda ctx: ctx.audit().lineage(ctx.run, row_index=0).context(5),
         Fails(TypeError, r"^event_id must be a coalesce event id \(str\) from this lineage's decisions, not int 5$")),
        ("verify-expected_root-int", lambda ctx: ctx.audit().verify(expected_root=5),
         Fails(TypeError, r"^expected_root must be a Merkle root \(hex str\) saved earlier, or None, not int 5$")),
        ("chart-points-zero", lambda ctx: wait_time_ecdf(ctx.audit().merge_timings(), points=0),
         Fails(ValueError, r"^points must be at least 1, not 0$")),
        ("sql-query-None", lambda ctx: ctx.audit().sql(None),
         Fails(TypeError, r"^query must be one SQL statement \(str\), not NoneType None$")),
        ("sql-query-bytes", lambda ctx: ctx.audit().sql(b"SELECT 1"),
         Fails(TypeError, r"^query must be one SQL statement \(str\), not bytes b'SELECT 1'$")),
        ("sql-param-missing", lambda ctx: ctx.audit().sql("SELECT * FROM runs WHERE run_id = $run"),
         Fails(ValueError, r"^the query uses \$run and params= gives no value for it$")),
        ("sql-param-misnamed", lambda ctx: ctx.audit().sql("SELECT * FROM runs WHERE run_id = $run", {"rum": 1}),
         Fails(ValueError, r"^the query uses \$run and params= gives no value for it; params= gives \$rum, "
                           r"which the query does not use$")),
        ("sql-positional-count", lambda ctx: ctx.audit().sql("SELECT ?, ?", [1]),
         Fails(ValueError, r"^the query uses \?2 and params= gives no value for it$")),
):
    case(f"argument-{_name}", _act, _outcome)

# == the test ==================================================================================================


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    """One completed run of the canonical fork pipeline, in its own store."""
    work = tmp_path_factory.mktemp("pristine")
    result = run_pipeline(fork_pipeline(write_csv(work / "in.csv")))
    with open_audit(work / "audit") as audit:
        row = audit.runs().row(0, named=True)
    assert verify_run(AuditStore(work / "audit"), result.run_id).ok
    return Pristine(work / "audit", result.run_id, (row["status"], row["rows"], row["tokens"]))


@pytest.fixture
def ctx(pristine: Pristine, tmp_path: Path) -> Iterator[Ctx]:
    """A copy of the pristine store in the case's folder (as <case folder>/audit, where PIPELINE writes)."""
    store = tmp_path / "audit"
    shutil.copytree(pristine.store, store)
    with ExitStack() as stack:
        yield Ctx(tmp_path, store, pristine.run, stack)


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted((store / "parquet").rglob("*")) if p.is_file()}


def _duckdb_bytes(store: Path) -> bytes | None:
    path = store / "audit.duckdb"
    return path.read_bytes() if path.exists() else None


def _merkle(ctx: Ctx) -> object:
    """The stored run's Merkle verification: ok, or what it found (or the error it gave) in a damaged store."""
    try:
        result = verify_run(AuditStore(ctx.store), ctx.run)
    except AuditStoreError as exc:
        return f"{type(exc).__name__}: {exc}"
    return result.ok if result.ok else [(f.table, f.part_file, f.kind) for f in result.findings]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, ctx: Ctx, pristine: Pristine) -> None:
    case_ = CASES[name]
    if case_.arrange is not None:
        case_.arrange(ctx)
    files, merkle, database = _files(ctx.store), _merkle(ctx), _duckdb_bytes(ctx.store)
    assert merkle is True or case_.damage == "parquet"

    result = case_.expect.check(ctx, case_.act)
    if case_.then is not None:
        case_.then(ctx, result)
    ctx.stack.close()  # audits opened by the case, file modes it changed

    # nothing already stored was lost or changed: same bytes, same Merkle verification
    after = _files(ctx.store)
    assert [f for f in files if f not in after] == [], "files lost"
    assert [f for f in files if f in after and after[f] != files[f]] == [], "files changed"
    added = [f for f in after if f not in files]
    assert _merkle(ctx) == merkle
    assert not list((ctx.store / ".locks").glob("*")), "a lock was left behind"
    if not case_.expect.adds_run:  # then nothing at all was written: not a file, not a byte of audit.duckdb
        assert added == [], "a case that must fail before running wrote to the store"
        assert _duckdb_bytes(ctx.store) == database, "audit.duckdb changed"
        return
    assert added and not [f for f in added if f"run_id={ctx.run}/" in f or "run_id=__schema__/" in f]
    if case_.damage in ("parquet", "manifest"):
        return
    # a run was added next to the stored one: the stored run still reads the same, from the Parquet and
    # (unless damaged on purpose) from audit.duckdb
    with open_audit(ctx.store) as audit:
        runs = audit.runs()
        assert runs.height == 2
        row = runs.filter(pl.col("run_id") == ctx.run).row(0, named=True)
        assert (row["status"], row["rows"], row["tokens"]) == pristine.summary
    if case_.damage is None:
        with duckdb.connect(str(ctx.store / "audit.duckdb"), read_only=True) as con:
            stored = con.execute("SELECT status, (SELECT count(*) FROM tokens WHERE run_id = $run) FROM runs "
                                 "WHERE run_id = $run", {"run": ctx.run}).fetchall()
        assert stored == [(pristine.summary[0], pristine.summary[2])]
