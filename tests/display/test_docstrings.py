"""Every docstring example of the display layer runs, against a real demo audit."""

from __future__ import annotations

import doctest
import importlib

import pytest

import elspeth_nb as enb

MODULES = ["elspeth_nb.charts", "elspeth_nb.widgets", "elspeth_nb.widgets.explorer", "elspeth_nb.report"]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(demo_audit: enb.Audit, module: str) -> None:
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(importlib.import_module(module))
    for test in tests:
        test.globs.update({"audit": demo_audit, "enb": enb})
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0
    assert result.attempted > 0
