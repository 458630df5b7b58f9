"""The audit report: parameters injected like papermill, one static HTML page with inline SVG and no scripts."""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

import nbformat
import pytest

import elspeth_nb as enb
from elspeth_nb.audit.store import AuditStore
from elspeth_nb.cli import main
from elspeth_nb.report import INJECTED_TAG, inject_parameters, render_report, report_notebook


def test_parameters_are_injected_after_the_parameters_cell() -> None:
    original = report_notebook()
    injected = inject_parameters(original, {"audit_path": "/x/audit", "run_id": "abc"})
    index = next(i for i, c in enumerate(injected.cells) if "parameters" in c.metadata.get("tags", []))
    cell = injected.cells[index + 1]
    assert cell.metadata["tags"] == [INJECTED_TAG]
    assert "audit_path = '/x/audit'\nrun_id = 'abc'\n" in cell.source
    assert len(injected.cells) == len(original.cells) + 1  # the original is untouched
    again = inject_parameters(injected, {"run_id": "def"})  # re-injecting replaces, never stacks
    assert [c.source for c in again.cells if INJECTED_TAG in c.metadata.get("tags", [])] == [
        "# Parameters injected by elspeth_nb.report\nrun_id = 'def'\n"]
    nbformat.validate(again)


def test_unknown_run_fails_before_any_kernel_starts(demo_run: enb.RunResult, demo_audit: enb.Audit,
                                                     tmp_path: Path) -> None:
    for audit in (demo_run.audit_path, demo_audit):  # a path or an opened Audit
        with pytest.raises(enb.RunNotFoundError, match="nope"):
            render_report(audit, run_id="nope", output=tmp_path / "r.html")
    with pytest.raises(TypeError, match="audit store path or an Audit"):
        render_report(42, output=tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_cli_report_is_one_static_page_with_charts_and_tables(demo_run: enb.RunResult, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out" / "report.html"
    assert main(["report", "--audit", str(demo_run.audit_path), "--run", demo_run.run_id[:8],
                 "-o", str(output)]) == 0
    assert str(output) in capsys.readouterr().out
    page = output.read_text()
    assert f"<title>elspeth-nb audit report: run {demo_run.run_id}</title>" in page
    assert page.count("<svg") >= 5 and "Coalesce wait per decision" in page  # charts are inline SVG markup
    for expected in ("Integrity", "invariants hold", "Verify run", "decision", "best_effort", "sanctions",
                     "Lost branches and late arrivals", "Lineage of row"):
        assert expected in page, expected
    assert re.findall(r"<script[^>]*\bsrc=", page) == []  # no CDN JavaScript: opens offline
    assert "def " not in page and "import " not in page  # code cells hidden


def test_a_failing_cell_is_a_clear_error(tmp_path: Path) -> None:
    from elspeth_nb.report import ReportError, execute_notebook

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('no such coalesce')")])
    with pytest.raises(ReportError, match="ValueError: no such coalesce") as failed:
        execute_notebook(notebook, cwd=tmp_path, timeout=30)
    assert isinstance(failed.value, enb.Error)


def test_the_kernel_is_this_interpreter_even_without_kernelspecs(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from elspeth_nb.report import execute_notebook

    empty = tmp_path / "no-kernelspecs"
    empty.mkdir()
    for variable in ("JUPYTER_PATH", "JUPYTER_DATA_DIR"):
        monkeypatch.setenv(variable, str(empty))
    monkeypatch.setenv("PATH", "/nonexistent")  # no `python` or `jupyter` to find: the kernel must not need one
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys\nprint(sys.executable)")])
    executed = execute_notebook(notebook, cwd=tmp_path, timeout=30)
    assert executed.cells[0].outputs[0].text.strip() == sys.executable


@pytest.mark.parametrize("output", ["folder/", "a_folder", "/proc/elspeth-nb/report.html"])
def test_an_output_that_cannot_be_written_is_refused_before_rendering(tmp_path: Path, output: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from elspeth_nb.errors import InputError
    from elspeth_nb.report import render_report

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(InputError, match=r"^report output .* (is a folder|cannot be written)"):
        render_report(tmp_path / "no-store-here", output=output)  # the output is checked before the audit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder"]


@pytest.mark.slow
def test_an_empty_run_renders_and_markup_in_its_path_stays_text(tmp_path: Path) -> None:
    """No source rows, no decisions, and a store path holding HTML: the page says so and runs no markup."""
    from tests.cases import ROWS, fork_pipeline

    folder = tmp_path / "p`<img src=x onerror=alert(7)>`q"
    folder.mkdir()
    source = folder / "in.csv"
    source.write_text(",".join(ROWS[0]) + "\n")  # a header, no rows
    result = enb.run_pipeline(fork_pipeline(source), audit=folder / "audit")
    page = render_report(result.audit_path, output=tmp_path / "empty.html").read_text()
    assert "onerror=" not in page.replace("onerror=alert(7)&gt;", "")  # only ever as escaped text
    assert "&lt;img src=x onerror=alert(7)&gt;" in page
    assert "This run has no source rows, so there is no lineage to show." in page
    assert "This run took no coalesce decisions, so no branch was lost" in page
    assert "Every expected branch arrived" not in page


@pytest.mark.slow
def test_the_report_of_a_landscape_reads_its_payload_folder(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The lineage shows stored source rows; a purged payload is listed as a finding of the import."""
    original = Path(__file__).resolve().parents[1] / "data" / "elspeth" / "quorum2_nested_timeout5_lossy"
    sample = Path(shutil.copytree(original, tmp_path / "sample"))
    with sqlite3.connect(sample / "audit.db") as con:
        [(last_ref,)] = con.execute("SELECT source_data_ref FROM rows ORDER BY row_index DESC LIMIT 1").fetchall()
    (sample / "payloads" / last_ref[:2] / last_ref).unlink()
    output = tmp_path / "landscape.html"
    assert main(["report", "--audit", str(sample / "audit.db"), "--payloads", str(sample / "payloads"),
                 "-o", str(output)]) == 0
    page = output.read_text()
    assert "payloads: source" in page and "item-0000001" in page  # the source row itself, read from its payload
    assert "Findings of the ELSPETH import:" in page and f"payload {last_ref} is purged or missing" in page
    with enb.open_audit(sample / "audit.db", payloads=sample / "payloads") as audit:  # an opened Audit: its own
        from elspeth_nb.report import _resolve

        assert _resolve(audit, "latest", None)[2] == str((sample / "payloads").resolve())
    capsys.readouterr()
    store = AuditStore.create(tmp_path / "not-a-landscape").root
    assert main(["report", "--audit", str(store), "--payloads", str(sample / "payloads"),
                 "-o", str(tmp_path / "x.html")]) == 2
    assert "payloads" in capsys.readouterr().err

