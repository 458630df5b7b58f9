"""Every docstring example of the analysis layer runs, against a one-run store (require_all, union)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

from elspeth_nb.analysis import open_audit

MODULES = ["audit", "runs", "coalesce", "lineage", "integrity", "verify", "diff", "query", "results"]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(simple_store: Path, module: str) -> None:
    imported = importlib.import_module(f"elspeth_nb.analysis.{module}")
    audit = open_audit(simple_store)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(imported)
    examples = 0
    for test in tests:
        test.globs.update({"audit": audit, "store_path": simple_store, "open_audit": open_audit})
        runner.run(test)
        examples += len(test.examples)
    result = runner.summarize(verbose=False)
    assert result.failed == 0
    assert examples > 0


def test_every_audit_helper_has_an_example() -> None:
    from elspeth_nb.analysis.audit import Audit

    helpers = ["runs", "run_summary", "outcomes", "lineage", "coalesce_events", "merge_timings",
               "merge_timing_summary", "policy_outcomes", "check", "verify", "diff_runs", "sql"]
    for name in helpers:
        doc = getattr(Audit, name).__doc__ or ""
        assert ">>> " in doc, name
