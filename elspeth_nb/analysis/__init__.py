"""Analysis of audit trails: ``open_audit`` and the helpers of :class:`Audit`.

Reads the audit layer only (never the engine): a store folder, its audit.duckdb, or an ELSPETH
Landscape file, through one read-only DuckDB connection.
"""

from __future__ import annotations

from elspeth_nb.analysis.audit import Audit, open_audit
from elspeth_nb.analysis.coalesce import PolicyOutcomes
from elspeth_nb.analysis.diff import RunDiff
from elspeth_nb.analysis.integrity import CheckResult
from elspeth_nb.analysis.lineage import Lineage
from elspeth_nb.analysis.query import ReadOnlyError
from elspeth_nb.analysis.runs import RunSummary
from elspeth_nb.analysis.verify import VerifyResult

__all__ = [
    "Audit",
    "CheckResult",
    "Lineage",
    "PolicyOutcomes",
    "ReadOnlyError",
    "RunDiff",
    "RunSummary",
    "VerifyResult",
    "open_audit",
]
