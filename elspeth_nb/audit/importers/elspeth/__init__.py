"""Import audit trails written by ELSPETH itself (Landscape SQLite files) into our audit schema.

>>> from elspeth_nb.audit.importers.elspeth import read_landscape, import_into_store, verify_landscape
>>> imported = read_landscape("audit.db", payloads="payloads")      # doctest: +SKIP
>>> report = import_into_store("audit.db", "audit", payloads="payloads")  # doctest: +SKIP
>>> checks = verify_landscape(imported, db_path="audit.db")         # doctest: +SKIP
"""

from __future__ import annotations

from elspeth_nb.audit.importers.elspeth._lost import parse_lost_reason
from elspeth_nb.audit.importers.elspeth._model import ImportReport, LandscapeImport
from elspeth_nb.audit.importers.elspeth._read import payload_folder, read_landscape
from elspeth_nb.audit.importers.elspeth._store import import_into_store
from elspeth_nb.audit.importers.elspeth._verify import verify_landscape

__all__ = [
    "ImportReport",
    "LandscapeImport",
    "import_into_store",
    "parse_lost_reason",
    "payload_folder",
    "read_landscape",
    "verify_landscape",
]
