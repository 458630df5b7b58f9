"""Point reads straight from segments (lineage's reader): exactly the rows a filter over the whole file gives."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from elspeth_nb.analysis._segments import SegmentIndex
from elspeth_nb.audit.schema import TABLES

RUN = "0123456789abcdef0123456789abcdef"
TOKENS = TABLES["tokens"]


def _segment(root: Path, rows: int, *, seed: int, drop: str | None = None) -> pa.Table:
    """A tokens segment of ``rows`` records in row groups of 64, ids in write order, some NULL branches."""
    rng = random.Random(seed)
    records = [{"token_id": f"t{seed}-{i:06d}", "row_id": f"r{i // 3:06d}",
                "branch_name": None if rng.random() < 0.2 else rng.choice("abc")} for i in range(rows)]
    table = pa.Table.from_pylist(records)
    if drop:
        table = table.drop_columns([drop])
    folder = root / "tokens" / f"run_id={RUN}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / f"part-{seed:06d}.parquet", row_group_size=64)
    return table


def _expected(tables: list[pa.Table], column: str, values: list[str], nulls: bool) -> list[dict[str, object]]:
    found = []
    for table in tables:
        if column not in table.column_names:
            found += table.to_pylist() if nulls else []
            continue
        mask = pc.fill_null(pc.is_in(table[column], pa.array(values, pa.string())), False)
        if nulls:
            mask = pc.or_(mask, pc.is_null(table[column]))
        found += table.filter(mask).to_pylist()
    return [{k: r.get(k) for k in ("token_id", "row_id", "branch_name")} for r in found]


@pytest.mark.parametrize("nulls", [False, True])
def test_read_gives_the_rows_a_full_filter_gives(tmp_path: Path, nulls: bool) -> None:
    tables = [_segment(tmp_path, 500, seed=1), _segment(tmp_path, 300, seed=2, drop="branch_name")]
    index = SegmentIndex(tmp_path)
    cases = [("row_id", ["r000010", "r000150", "r000099"]), ("token_id", ["t1-000063", "t1-000064", "t2-000299"]),
             ("branch_name", ["b"]), ("row_id", ["absent"])]
    for column, values in cases:
        got = index.read(TOKENS, RUN, column, values, nulls=nulls)
        assert got is not None and got.schema == TOKENS.schema
        assert set(got.column("run_id").to_pylist()) <= {RUN}
        rows = [{k: r[k] for k in ("token_id", "row_id", "branch_name")} for r in got.to_pylist()]
        assert rows == _expected(tables, column, values, nulls), (column, values)


def test_read_rows_takes_the_positions_and_keeps_only_matching_keys(tmp_path: Path) -> None:
    first = _segment(tmp_path, 500, seed=1)
    index = SegmentIndex(tmp_path)
    positions = {"part-000001.parquet": [0, 64, 65, 499], "part-000002.parquet": [1]}  # no such file: ignored
    wanted = ["t1-000000", "t1-000065", "t1-000499"]  # row 64 holds t1-000064: a position whose key differs
    got = index.read_rows(TOKENS, RUN, positions, "token_id", wanted)
    assert got is not None
    assert got.column("token_id").to_pylist() == wanted
    assert got.column("row_id").to_pylist() == [first["row_id"][i].as_py() for i in (0, 65, 499)]
    empty = index.read_rows(TOKENS, RUN, {"part-000001.parquet": [500, 10_000]}, "token_id", wanted)
    assert empty is not None and empty.num_rows == 0 and empty.schema == TOKENS.schema
