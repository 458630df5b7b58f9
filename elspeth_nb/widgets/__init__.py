"""ipywidgets explorers over an audit store, each with a static HTML fallback when no kernel is live.

>>> AuditExplorer(audit).tabs.titles
('Summary', 'Outcomes', 'Coalesce analytics', 'Lineage search')
"""

from __future__ import annotations

from elspeth_nb.widgets.explorer import AuditExplorer

__all__ = ["AuditExplorer"]
