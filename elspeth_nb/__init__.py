"""elspeth-nb: run auditable fork/coalesce pipelines and analyse their audit trail in notebooks.

>>> import elspeth_nb as enb
>>> [n for n in ("open_audit", "run_pipeline", "load_pipeline", "charts", "Audit") if n in enb.__all__]
['open_audit', 'run_pipeline', 'load_pipeline', 'charts', 'Audit']

Importing is cheap: the engine, DuckDB, Altair and ipywidgets load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from elspeth_nb._version import __version__
from elspeth_nb.errors import (
    AuditClosedError,
    AuditStoreError,
    ConfigError,
    Error,
    IntegrityError,
    NotFoundError,
    RunNotFoundError,
    SchemaVersionError,
)

if TYPE_CHECKING:
    from elspeth_nb.analysis.audit import Audit, open_audit
    from elspeth_nb.engine.dag import Pipeline, load_pipeline
    from elspeth_nb.engine.plugins.transforms import RowRejected
    from elspeth_nb.engine.runner import RunFailedError, RunResult, run_pipeline

_LAZY = {
    "load_pipeline": "elspeth_nb.engine.dag",
    "Pipeline": "elspeth_nb.engine.dag",
    "run_pipeline": "elspeth_nb.engine.runner",
    "RunResult": "elspeth_nb.engine.runner",
    "RunFailedError": "elspeth_nb.engine.runner",
    "RowRejected": "elspeth_nb.engine.plugins.transforms",
    "open_audit": "elspeth_nb.analysis.audit",
    "Audit": "elspeth_nb.analysis.audit",
}
_LAZY_MODULES = {"charts": "elspeth_nb.charts", "widgets": "elspeth_nb.widgets"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(_LAZY_MODULES[name])
    else:
        raise AttributeError(f"module 'elspeth_nb' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "Audit",
    "AuditClosedError",
    "AuditStoreError",
    "ConfigError",
    "Error",
    "IntegrityError",
    "NotFoundError",
    "Pipeline",
    "RowRejected",
    "RunFailedError",
    "RunNotFoundError",
    "RunResult",
    "SchemaVersionError",
    "__version__",
    "charts",
    "load_pipeline",
    "open_audit",
    "run_pipeline",
    "widgets",
]
