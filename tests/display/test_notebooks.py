"""Every notebook in notebooks/ runs headless, top to bottom, and is committed with its outputs cleared."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from elspeth_nb.report import REPORT_NOTEBOOK, execute_notebook, report_notebook

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
WATCHED = (REPO / "notebooks", REPO / "data" / "demo")  # the notebooks must write to temporary folders only


def listing() -> set[Path]:
    return {p for folder in WATCHED for p in folder.rglob("*") if "audit" not in p.parts}


def test_the_four_notebooks_are_there() -> None:
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_lineage.ipynb", "03_coalesce_timing.ipynb",
                                           "04_audit_report.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_without_errors(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Alternate the working directory: the notebooks must find the repository from either place.
    cwd = REPO if NOTEBOOKS.index(path) % 2 else path.parent
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's temporary folders, cleaned up by pytest
    before = listing()
    executed = execute_notebook(nbformat.read(path, as_version=4), cwd=cwd, timeout=60)
    assert listing() == before
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)


def test_report_notebook_is_the_packaged_one() -> None:
    shipped = REPO / "elspeth_nb" / "report" / REPORT_NOTEBOOK
    assert (REPO / "notebooks" / "04_audit_report.ipynb").read_bytes() == shipped.read_bytes()
    tagged = [c for c in report_notebook().cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "audit_path = None" in tagged[0].source and 'run_id = "latest"' in tagged[0].source
