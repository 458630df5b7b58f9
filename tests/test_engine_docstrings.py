"""Docstring examples outside the analysis and display layers (those have their own runners) run as written."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["elspeth_nb", "elspeth_nb._arguments", "elspeth_nb.engine.dag",
           "elspeth_nb.engine.parallel", "elspeth_nb.engine.runner", "elspeth_nb.audit.integrity",
           "elspeth_nb.audit.importers.elspeth"]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # examples name files as a user in the repository would: data/demo/pipeline.yaml
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0


def test_examples_are_found() -> None:
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = {m: sum(len(t.examples) for t in finder.find(importlib.import_module(m))) for m in MODULES}
    assert all(n > 0 for n in found.values()), found
