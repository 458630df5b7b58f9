"""The layers stay where they belong, importing elspeth_nb is cheap, and the public surface resolves."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import elspeth_nb

PACKAGE = Path(elspeth_nb.__file__).parent

# layer -> layers it must never import
FORBIDDEN = {
    "elspeth_nb.engine": ("elspeth_nb.analysis", "elspeth_nb.widgets", "elspeth_nb.charts", "elspeth_nb.report"),
    "elspeth_nb.audit": ("elspeth_nb.engine", "elspeth_nb.analysis", "elspeth_nb.widgets", "elspeth_nb.charts"),
    "elspeth_nb.analysis": ("elspeth_nb.engine", "elspeth_nb.widgets", "elspeth_nb.charts"),
    "elspeth_nb.charts": ("elspeth_nb.engine",),
    "elspeth_nb.widgets": ("elspeth_nb.engine",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_no_module_imports_across_a_layer_boundary() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for layer, forbidden in FORBIDDEN.items():
            if module == layer or module.startswith(layer + "."):
                violations += [f"{module} imports {name}" for name in _imports(path)
                               if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert violations == []


def test_bare_import_loads_no_heavy_library() -> None:
    code = ("import sys, elspeth_nb; heavy = ['altair', 'ipywidgets', 'nbclient', 'nbconvert', 'duckdb', 'polars',"
            " 'pyarrow', 'vl_convert']; print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("name", elspeth_nb.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(elspeth_nb, name) is not None
