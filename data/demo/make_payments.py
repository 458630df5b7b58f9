"""Regenerate payments.csv, the demo input: 3,000 payments with a few deliberate problems.

Run `python make_payments.py` in this folder; the output is deterministic (seeded).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

COUNTRIES = ["GB", "DE", "FR", "NL", "US", "SG", "AE", "BR"]
NAMES = ["Acme Ltd", "Globex", "Initech", "Umbrella plc", "Hooli", "Stark Industries", "Wayne Enterprises",
         "Tyrell Corp", "Soylent", "Blocked Corp"]
MEMOS = ["invoice", "consulting fees", "refund", "quarterly licence renewal for the analytics platform",
         "equipment", "travel expenses", "deposit"]


def main(rows: int = 3000, seed: int = 42) -> None:
    rng = random.Random(seed)
    path = Path(__file__).with_name("payments.csv")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["payment_id", "payer", "payee", "amount", "currency", "country", "memo"])
        for i in range(1, rows + 1):
            payee = "Blocked Corp" if rng.random() < 0.01 else rng.choice(NAMES[:-1])
            amount = round(rng.lognormvariate(6, 1.2), 2) * (-1 if rng.random() < 0.02 else 1)
            memo = "embargo goods shipment" if rng.random() < 0.01 else rng.choice(MEMOS)
            record = [i, rng.choice(NAMES[:-1]), payee, amount, rng.choice(["GBP", "EUR", "USD"]),
                      rng.choice(COUNTRIES), f"{memo} #{i}"]
            if i % 997 == 0:
                record = record[:5]  # a malformed line: too few fields
            elif i % 1499 == 0:
                record[3] = "twelve"  # not a number
            writer.writerow(record)


if __name__ == "__main__":
    main()
