"""The audit report: run the packaged report notebook for one run and export it as one static HTML file.

The notebook runs in a kernel on this interpreter (no installed kernelspec needed); charts are inline
SVG and the page loads no JavaScript, so the file opens offline and needs no display to build.

>>> render_report("data/demo/audit", run_id="latest", output=Path("report.html"))  # doctest: +SKIP
PosixPath('report.html')
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elspeth_nb.errors import Error, InputError

if TYPE_CHECKING:
    from nbformat import NotebookNode

REPORT_NOTEBOOK = "audit_report.ipynb"
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# The lab template without the CDN scripts it would load (require.js, MathJax, mermaid, widgets), and with
# SVG outputs inline (as markup, not base64 images): they are the report's own charts, rendered by vl-convert.
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block data_svg scoped -%}
<div class="jp-RenderedSVG jp-OutputArea-output {{ extra_class }}" data-mime-type="image/svg+xml">
{{ output.data['image/svg+xml'] }}
</div>
{%- endblock data_svg -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
<style type="text/css">
  main { max-width: 1100px; margin: 0 auto; }
  .jp-RenderedHTMLCommon table { font-size: 12px; }
  .jp-RenderedSVG svg, .jp-OutputArea-output svg { max-width: 100%; height: auto; }
</style>
{%- endblock extra_css -%}
"""


class ReportError(Error, RuntimeError):
    """The report notebook failed while running; the message names the failing cell's error."""


def render_report(
    audit: str | os.PathLike[str] | Any,
    *,
    run_id: str = "latest",
    output: str | os.PathLike[str],
    payloads: str | os.PathLike[str] | None = None,
    timeout: int = 300,
) -> Path:
    """Execute the report notebook for ``run_id`` of the audit store ``audit`` and write static HTML to ``output``.

    ``payloads`` is ELSPETH's payload folder when ``audit`` is a Landscape file (an opened Audit brings its own).

    >>> render_report("data/demo/audit", output="report.html")  # doctest: +SKIP
    PosixPath('report.html')
    """
    target = _writable_target(os.fspath(output))
    audit_path, run, payload_folder = _resolve(audit, run_id, payloads)
    notebook = inject_parameters(report_notebook(), {"audit_path": str(audit_path), "run_id": run,
                                                     "payloads": payload_folder})
    notebook.metadata["title"] = f"elspeth-nb audit report: run {run}"
    with tempfile.TemporaryDirectory(prefix="elspeth-nb-report-") as scratch:
        executed = execute_notebook(notebook, cwd=Path(scratch), timeout=timeout)
    target.write_text(to_static_html(executed), encoding="utf-8")
    return target


def _writable_target(output: str) -> Path:
    """The output file, once its folder exists and it can be written: checked before the seconds of rendering."""
    target = Path(output)
    if output.endswith(os.sep) or target.is_dir():
        raise InputError(f"report output {output} is a folder; give a file name such as {target / 'report.html'}")
    existed = target.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise InputError(f"report output {output} cannot be written: {exc.strerror or exc}") from exc
    if not existed:
        target.unlink()
    return target


def report_notebook() -> NotebookNode:
    """The packaged report notebook (also ``notebooks/04_audit_report.ipynb``), as an nbformat node.

    >>> report_notebook().cells[1].metadata["tags"]
    ['parameters']
    """
    import nbformat

    text = resources.files("elspeth_nb").joinpath("report", REPORT_NOTEBOOK).read_text(encoding="utf-8")
    notebook: NotebookNode = nbformat.reads(text, as_version=4)  # type: ignore[no-untyped-call]
    return notebook


def inject_parameters(notebook: NotebookNode, parameters: Mapping[str, Any]) -> NotebookNode:
    """A copy of ``notebook`` with a cell assigning ``parameters`` right after the ``parameters`` cell (as papermill).

    >>> notebook = inject_parameters(report_notebook(), {"run_id": "abc"})
    >>> [c.source for c in notebook.cells if INJECTED_TAG in c.metadata.get("tags", [])]
    ["# Parameters injected by elspeth_nb.report\\nrun_id = 'abc'\\n"]
    """
    import copy

    import nbformat

    result = copy.deepcopy(notebook)
    cells = [c for c in result.cells if INJECTED_TAG not in c.get("metadata", {}).get("tags", [])]
    source = "# Parameters injected by elspeth_nb.report\n" + "".join(
        f"{name} = {value!r}\n" for name, value in parameters.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})  # type: ignore[no-untyped-call]
    tagged = [i for i, c in enumerate(cells) if PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
    cells.insert(tagged[0] + 1 if tagged else 0, injected)
    result.cells = cells
    return result


def execute_notebook(notebook: NotebookNode, *, cwd: Path, timeout: int = 300) -> NotebookNode:
    """Run every cell of ``notebook`` in a fresh kernel on this interpreter, in folder ``cwd``; errors raise.

    >>> execute_notebook(nbformat.read("notebooks/01_quickstart.ipynb", 4), cwd=Path("/tmp"))  # doctest: +SKIP
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    client = NotebookClient(notebook, kernel_manager_class=_kernel_manager_class(), kernel_name="python3",
                            timeout=timeout, store_widget_state=False,
                            resources={"metadata": {"path": str(cwd)}})
    try:
        return client.execute()
    except CellExecutionError as failed:
        detail = _ANSI_ESCAPE.sub("", f"{failed.ename}: {failed.evalue}\n{failed}")  # the kernel colours its traceback
        raise ReportError(f"the notebook failed: {detail}") from None


def to_static_html(notebook: NotebookNode) -> str:
    """One self-contained HTML page of the notebook's outputs: code hidden, no external scripts.

    >>> import nbformat
    >>> page = to_static_html(nbformat.v4.new_notebook())
    >>> page.startswith("<!DOCTYPE html>"), "<script src=" in page
    (True, False)
    """
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(  # type: ignore[no-untyped-call]
        template_name="lab", raw_template=_OFFLINE_TEMPLATE, embed_images=True,
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
    )
    body, _ = exporter.from_notebook_node(notebook)
    return str(body)


def _resolve(audit: str | os.PathLike[str] | Any, run_id: str,
             payloads: str | os.PathLike[str] | None) -> tuple[Path, str, str | None]:
    """The path behind ``audit`` (a path or an opened ``Audit``), the full id of ``run_id`` and the payload
    folder to reopen it with; fails fast."""
    if not isinstance(audit, str | os.PathLike):
        if not hasattr(audit, "path") or not hasattr(audit, "run_summary"):
            raise TypeError(f"expected an audit store path or an Audit, got {type(audit).__name__}")
        if payloads is not None:
            raise TypeError("payloads= is for an audit given as a path; an opened Audit brings its own")
        return _identity(audit, run_id)
    from elspeth_nb.analysis.audit import open_audit

    try:
        opened = open_audit(audit, payloads=payloads)
    except ValueError as exc:  # a payload folder given for something that is not a Landscape file
        raise InputError(str(exc)) from None
    with opened:
        return _identity(opened, run_id)


def _identity(audit: Any, run_id: str) -> tuple[Path, str, str | None]:
    folder = getattr(audit, "payloads", None)
    return Path(audit.path).resolve(), str(audit.run_summary(run_id).run_id), None if folder is None else str(folder)


def _kernel_manager_class() -> type:
    """An async kernel manager that starts ipykernel on ``sys.executable``, whatever kernelspecs are installed."""
    import zmq
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    class ThisInterpreterSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            from ipykernel.kernelspec import get_kernel_dict

            spec = get_kernel_dict()
            return KernelSpec(resource_dir="", argv=spec["argv"], display_name=spec["display_name"],
                              language=spec["language"], metadata=spec.get("metadata", {}))

    class ThisInterpreterKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("kernel_spec_manager", ThisInterpreterSpecs())
            kwargs.setdefault("transport_encryption", "auto" if zmq.has("curve") else "disabled")
            super().__init__(**kwargs)

    return ThisInterpreterKernelManager


__all__ = ["ReportError", "execute_notebook", "inject_parameters", "render_report", "report_notebook",
           "to_static_html"]
