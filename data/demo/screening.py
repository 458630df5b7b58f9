"""The demo's in-house fraud model: a deterministic score in [0, 1] from amount, country and memo."""

from __future__ import annotations

from typing import Any

from elspeth_nb import RowRejected

HIGH_RISK = {"AE": 0.25, "BR": 0.2, "SG": 0.1}


def fraud_score(row: dict[str, Any]) -> dict[str, Any]:
    """Add ``fraud_score``; refuse rows the model cannot score (no amount)."""
    amount = row.get("amount")
    if amount is None:
        raise RowRejected("unscorable", field="amount")
    score = min(1.0, amount / 20_000 + HIGH_RISK.get(row.get("country", ""), 0.0))
    if "refund" in row.get("memo", ""):
        score = min(1.0, score + 0.3)
    return {**row, "fraud_score": round(score, 3)}
