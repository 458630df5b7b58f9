"""Every change to a stored run is caught by verify, which names the table (and the record when it can).

For each digested table of a real run: flip one byte of a segment file, delete one record, swap two
records. Also: a root saved earlier proves a run unchanged, and an added segment is noticed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from elspeth_nb.audit.schema import DIGESTED_TABLES, TABLES
from elspeth_nb.audit.store import AuditStore
from elspeth_nb.audit.verification import verify_run
from elspeth_nb.audit.writer import partition_dir
from elspeth_nb.engine.runner import run_pipeline
from tests.cases import ROWS, fork_pipeline, write_csv


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A run whose every digested table has at least two records in one segment."""
    folder = tmp_path_factory.mktemp("tamper")
    rows = [*ROWS, {"id": 5, "category": "toys", "amount": 50, "note": "more toys"}]
    source = write_csv(folder / "in.csv", rows)
    source.write_text(source.read_text() + "6,books\n7,books,not-a-number,x\n")  # two quarantined lines
    pipeline = fork_pipeline(source, policy="quorum", quorum_count=2, lose_c_for="toys", slow={"b": 5})
    pipeline["sinks"]["errors"] = {"plugin": "jsonl", "options": {"path": str(folder / "errors.jsonl")}}
    pipeline["source"]["options"]["on_validation_failure"] = "errors"
    next(t for t in pipeline["transforms"] if t["name"] == "c_filter")["on_error"] = "errors"
    result = run_pipeline(pipeline, sync_duckdb=False)
    return folder / "audit", result.run_id


def _copy(pristine: tuple[Path, str], tmp_path: Path) -> tuple[AuditStore, str]:
    audit, run_id = pristine
    shutil.copytree(audit, tmp_path / "audit")
    return AuditStore.open(tmp_path / "audit"), run_id


def _segment(store: AuditStore, table: str, run_id: str) -> Path:
    files = sorted(partition_dir(store.parquet_root, table, run_id).glob("part-*.parquet"))
    return files[0]


def test_an_untouched_run_verifies(pristine: tuple[Path, str], tmp_path: Path) -> None:
    store, run_id = _copy(pristine, tmp_path)
    result = verify_run(store, run_id)
    assert result.ok and result.findings == [] and result.segments > 10
    assert result.computed_root == result.stored_root and len(result.stored_root or "") == 64


TAMPERED = list(DIGESTED_TABLES)


@pytest.mark.parametrize("table", TAMPERED)
def test_a_flipped_byte_is_caught_and_named(pristine: tuple[Path, str], tmp_path: Path, table: str) -> None:
    store, run_id = _copy(pristine, tmp_path)
    path = _segment(store, table, run_id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = verify_run(store, run_id)
    assert not result.ok
    assert result.findings[0].table == table and result.findings[0].part_file == path.name


def _rewrite(path: Path, table: str, change: str) -> pa.Table:
    records = pq.read_table(path, schema=TABLES[table].file_schema)
    if change == "delete":
        records = pa.concat_tables([records.slice(0, records.num_rows // 2), records.slice(records.num_rows // 2 + 1)])
    else:
        order = list(range(records.num_rows))
        order[0], order[-1] = order[-1], order[0]
        records = records.take(order)
    pq.write_table(records, path)
    return records


@pytest.mark.parametrize("change", ["delete", "swap"])
@pytest.mark.parametrize("table", TAMPERED)
def test_a_deleted_or_swapped_record_is_caught_and_located(pristine: tuple[Path, str], tmp_path: Path, table: str,
                                                            change: str) -> None:
    store, run_id = _copy(pristine, tmp_path)
    path = _segment(store, table, run_id)
    if pq.read_metadata(path).num_rows < 2:
        pytest.fail(f"the fixture run should give {table} at least two records")
    _rewrite(path, table, change)
    result = verify_run(store, run_id)
    assert not result.ok
    [finding] = result.findings
    assert (finding.table, finding.part_file) == (table, path.name)
    assert finding.kind == ("record_missing" if change == "delete" else "records_moved")
    if change == "swap":
        assert finding.record and finding.record != "position 0"


def test_a_changed_value_names_the_record(pristine: tuple[Path, str], tmp_path: Path) -> None:
    store, run_id = _copy(pristine, tmp_path)
    path = _segment(store, "token_outcomes", run_id)
    records = pq.read_table(path, schema=TABLES["token_outcomes"].file_schema)
    victim = records.column("outcome_id")[1].as_py()
    outcomes = records.column("outcome").to_pylist()
    outcomes[1] = "completed" if outcomes[1] != "completed" else "failed"
    pq.write_table(records.set_column(records.schema.get_field_index("outcome"), "outcome",
                                      pa.array(outcomes, pa.string())), path)
    [finding] = verify_run(store, run_id).findings
    assert finding.kind == "record_changed" and finding.record == f"outcome_id={victim}"


def test_a_saved_root_proves_the_run_unchanged_and_catches_a_rewritten_trail(pristine: tuple[Path, str],
                                                                             tmp_path: Path) -> None:
    store, run_id = _copy(pristine, tmp_path)
    saved = verify_run(store, run_id).computed_root
    assert verify_run(store, run_id, expected_root=saved).ok
    # someone rewrites a segment AND its digests consistently: only the saved root can tell
    extra = partition_dir(store.parquet_root, "rows", run_id) / "part-zz-000000.parquet"
    shutil.copy(_segment(store, "rows", run_id), extra)
    result = verify_run(store, run_id, expected_root=saved)
    assert not result.ok
    assert any(f.kind == "segment_added" and f.table == "rows" for f in result.findings)


def test_digests_written_during_the_run_verify_and_catch_a_change(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Fingerprints are flushed as they accumulate (memory stays flat); the root covers every flush."""
    import elspeth_nb.audit.writer as writer

    monkeypatch.setattr(writer, "DIGEST_FLUSH_BYTES", 64)  # a digest file every few segments
    source = write_csv(tmp_path / "in.csv", [*ROWS, *({"id": 10 + i, "category": "toys", "amount": i, "note": "n"}
                                                     for i in range(40))])
    pipeline = fork_pipeline(source, policy="require_all")
    result = run_pipeline(pipeline, segment_rows=16, sync_duckdb=False)
    store = AuditStore.open(tmp_path / "audit")
    digest_files = list(partition_dir(store.parquet_root, "segment_digests", result.run_id).glob("part-*.parquet"))
    assert len(digest_files) > 1
    verified = verify_run(store, result.run_id, expected_root=result.merkle_root)
    assert verified.ok and verified.computed_root == result.merkle_root
    assert verified.segments == len({(d.table_name, d.part_file) for d in store.segment_digests(result.run_id)})
    segment = _segment(store, "node_states", result.run_id)
    records = pq.read_table(segment)
    pq.write_table(records.slice(1), segment)  # one record deleted
    changed = verify_run(store, result.run_id, expected_root=result.merkle_root)
    assert not changed.ok and "node_states" in {f.table for f in changed.findings}


def test_a_folder_that_decodes_to_the_runs_partition_is_caught(pristine: tuple[Path, str], tmp_path: Path) -> None:
    """Readers percent-decode partition folders as Hive does: records under run_id=<id>%3x read as the run's own."""
    store, run_id = _copy(pristine, tmp_path)
    alias = store.parquet_root / "tokens" / f"run_id={run_id[:-1]}%{ord(run_id[-1]):02X}"
    alias.mkdir()
    shutil.copy(_segment(store, "tokens", run_id), alias / "part-000000.parquet")
    result = verify_run(store, run_id)
    assert not result.ok
    assert [(f.table, f.kind) for f in result.findings] == [("tokens", "segment_added")]
    assert f"in folder {alias.name}, which readers take for this run's" in result.findings[0].detail


def test_a_second_runs_row_at_the_sealed_revision_is_caught(pristine: tuple[Path, str], tmp_path: Path) -> None:
    """Two rows at the latest revision: the verifier and the readers could each pick a different one."""
    store, run_id = _copy(pristine, tmp_path)
    [*_, final] = sorted(partition_dir(store.parquet_root, "runs", run_id).glob("part-*.parquet"))
    row = pq.read_table(final)
    forged = row.set_column(row.schema.get_field_index("status"), "status", pa.array(["failed"], pa.string()))
    pq.write_table(forged, final.with_name("part-zz-000000.parquet"))
    [finding] = verify_run(store, run_id).findings
    assert finding.kind == "run_row_ambiguous" and finding.detail.startswith("2 runs rows claim revision 1")


def test_a_finished_run_whose_seal_was_removed_is_caught(pristine: tuple[Path, str], tmp_path: Path) -> None:
    """Without root and digests a run looked unsealed, like one still running; a finished run is always sealed."""
    store, run_id = _copy(pristine, tmp_path)
    shutil.rmtree(partition_dir(store.parquet_root, "segment_digests", run_id))
    for path in partition_dir(store.parquet_root, "runs", run_id).glob("part-*.parquet"):
        rows = pq.read_table(path)
        pq.write_table(rows.set_column(rows.schema.get_field_index("merkle_root"), "merkle_root",
                                       pa.nulls(rows.num_rows, pa.string())), path)
    result = verify_run(store, run_id)
    assert [(f.table, f.kind) for f in result.findings] == [("runs", "seal_removed")] and not result.ok


def test_an_edited_copy_is_caught_when_the_audit_is_opened_on_audit_duckdb(pristine: tuple[Path, str],
                                                                          tmp_path: Path) -> None:
    import duckdb

    from elspeth_nb.analysis import open_audit

    store, run_id = _copy(pristine, tmp_path)
    store.update_duckdb([run_id], True)
    with open_audit(store.root / "audit.duckdb") as audit:
        assert audit.verify(run_id).ok
    with duckdb.connect(str(store.root / "audit.duckdb")) as con:
        con.execute("UPDATE token_outcomes SET outcome = 'failed' WHERE outcome = 'completed'")
    with open_audit(store.root / "audit.duckdb") as audit:
        verified = audit.verify(run_id)
    assert not verified.ok
    assert verified.mismatches.select("check", "table").rows() == [("duckdb_copy", "token_outcomes")]


def test_two_swapped_segments_are_named_as_swapped(pristine: tuple[Path, str], tmp_path: Path) -> None:
    """Their records read as added and missing ones, which no record was."""
    store, run_id = _copy(pristine, tmp_path)
    tokens, outcomes = _segment(store, "tokens", run_id), _segment(store, "token_outcomes", run_id)
    held = tokens.read_bytes()
    tokens.write_bytes(outcomes.read_bytes())
    outcomes.write_bytes(held)
    assert sorted((f.table, f.kind, f.detail) for f in verify_run(store, run_id).findings) == [
        ("token_outcomes", "segment_replaced", f"the file holds the bytes written as tokens/{tokens.name}"),
        ("tokens", "segment_replaced", f"the file holds the bytes written as token_outcomes/{outcomes.name}")]


def test_a_segment_no_digest_lists_may_have_lost_its_digests(pristine: tuple[Path, str], tmp_path: Path) -> None:
    store, run_id = _copy(pristine, tmp_path)
    extra = partition_dir(store.parquet_root, "rows", run_id) / "part-zz-000000.parquet"
    shutil.copy(_segment(store, "rows", run_id), extra)
    [finding] = verify_run(store, run_id).findings
    assert (finding.kind, finding.part_file) == ("segment_added", extra.name)
    assert finding.detail == ("no segment digest of the run lists it: added after the run, or the segment_digests "
                              "file that listed it was removed")
