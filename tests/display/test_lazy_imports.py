"""Heavy display libraries load on first use, never on ``import elspeth_nb`` or ``import elspeth_nb.charts``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

HEAVY = ("altair", "vl_convert", "ipywidgets", "nbclient", "nbconvert", "jupyter_client")


def loaded_after(statement: str) -> list[str]:
    probe = f"import sys\n{statement}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return [m for m in out.strip().split(",") if m]


def test_importing_the_display_modules_loads_nothing_heavy() -> None:
    assert loaded_after("import elspeth_nb, elspeth_nb.charts, elspeth_nb.report") == []


def test_the_lazy_names_resolve_and_stay_light_until_used() -> None:
    assert loaded_after("import elspeth_nb as enb; enb.charts.to_svg; enb.widgets.AuditExplorer") == []
    assert loaded_after("import elspeth_nb as enb; enb.charts.to_svg(enb.charts.outcome_funnel("
                        "__import__('polars').DataFrame({'outcome': ['forked'], 'count': [1]})))") == [
        "altair", "vl_convert"]


@pytest.mark.parametrize("module", ["elspeth_nb.charts", "elspeth_nb.widgets", "elspeth_nb.report"])
def test_every_public_name_resolves(module: str) -> None:
    imported = importlib.import_module(module)
    assert imported.__all__ and all(hasattr(imported, name) for name in imported.__all__)
