"""open_audit on an ELSPETH Landscape SQLite file: imported in memory, same helpers, same answers."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import polars as pl
import pytest

from elspeth_nb.analysis import Audit, open_audit
from elspeth_nb.audit.importers.elspeth import read_landscape

DATA = Path(__file__).parent.parent / "data" / "elspeth"
LOSSY = DATA / "quorum2_nested_timeout5_lossy"


@pytest.fixture(scope="module")
def landscape() -> Audit:
    return open_audit(LOSSY / "audit.db", payloads=LOSSY / "payloads")


def test_opens_as_an_elspeth_audit_with_the_importers_tables(landscape: Audit) -> None:
    imported = read_landscape(LOSSY / "audit.db", payloads=LOSSY / "payloads")
    assert landscape.kind == "elspeth" and landscape.import_problems == []
    assert landscape.runs()["run_id"].to_list() == imported.run_ids
    events = pl.from_arrow(imported.tables["coalesce_events"])
    assert isinstance(events, pl.DataFrame)
    got = landscape.coalesce_events(include_late=True)
    assert sorted(got["event_id"]) == sorted(events["event_id"])
    assert got.sort("event_id")["context_json"].to_list() == events.sort("event_id")["context_json"].to_list()


def test_coalesce_analytics_of_the_quorum_run(landscape: Audit) -> None:
    timings = landscape.merge_timings()
    decisions = landscape.coalesce_events()
    assert timings.height == 3 * decisions.height == 300
    status = dict(timings.filter(pl.col("branch") == "path_c").group_by("status").len().rows())
    assert status == {"late": 82, "missing": 18}  # 18 rows' path_c was filtered out after the quorum merged
    assert timings.filter(pl.col("status") == "arrived")["arrival_rank"].max() == 2
    policy = landscape.policy_outcomes()
    assert policy.by_trigger.rows() == [("merge3", "quorum_met", 100)]
    assert policy.late_arrivals.select("branch", "after", "count").rows() == [("path_c", "after_merge", 82)]
    summary = landscape.merge_timing_summary(by="coalesce").row(0, named=True)
    waits = decisions["wait_duration_ms"]
    assert summary["decisions"] == 100 and summary["wait_max_ms"] == pytest.approx(waits.max())
    assert summary["wait_p50_ms"] == pytest.approx(waits.quantile(0.5, interpolation="linear"))


def test_a_branch_lost_after_the_decision_is_tied_to_it(landscape: Audit) -> None:
    """ELSPETH records no outcome context; the import infers it from the branch token that ended elsewhere."""
    with sqlite3.connect(f"file:{LOSSY / 'audit.db'}?mode=ro&immutable=1", uri=True) as con:
        ended = dict(con.execute(
            "SELECT t.token_id, n.node_id FROM tokens t JOIN token_outcomes o USING (token_id) "
            "JOIN node_states n USING (token_id) WHERE t.branch_name = 'path_c' AND o.is_terminal = 1 "
            "AND o.outcome = 'quarantined'").fetchall())
    missing = landscape.merge_timings().filter(pl.col("status") == "missing")
    assert sorted(missing["token_id"]) == sorted(ended) and len(ended) == 18
    assert set(missing["lost_reason"]) == {"quarantined"}
    assert {node.startswith("transform_branch_c_filter_") for node in ended.values()} == {True}
    text = repr(landscape.lineage(row_index=14))
    assert "(lost to merge3 after its decision: quarantined at branch_c_filter)" in text
    lost = landscape.policy_outcomes().lost_branches  # the summaries count them too, as lost after the decision
    assert lost.rows() == [("merge3", "path_c", "quarantined", "after_decision", len(ended))]
    coalesce = landscape.run_summary().coalesce.row(0, named=True)
    assert (coalesce["lost_branches"], coalesce["lost_after_decision"]) == (len(ended), len(ended))


def test_the_failed_states_of_late_arrivals_are_named_in_the_nodes_table(landscape: Audit) -> None:
    """ELSPETH fails the state of a branch arriving after its decision: the nodes table says how many those are."""
    with sqlite3.connect(f"file:{LOSSY / 'audit.db'}?mode=ro&immutable=1", uri=True) as con:
        [(failed,)] = con.execute("SELECT count(*) FROM node_states s JOIN nodes n USING (node_id) "
                                  "WHERE n.node_type = 'coalesce' AND s.status = 'failed'").fetchall()
    late = landscape.merge_timings().filter(pl.col("status") == "late").height
    [merge3] = landscape.run_summary().nodes.filter(pl.col("node_type") == "coalesce").rows(named=True)
    assert (merge3["failed"], merge3["late_arrivals"]) == (failed, late) == (82, 82)


def test_check_and_verify_pass_on_elspeth_data(landscape: Audit) -> None:
    result = landscape.check()
    assert result.ok, result
    skipped = result.invariants.filter(~pl.col("applied"))["invariant"].to_list()
    assert skipped == ["coalesce_state_context"]  # ELSPETH records its own coalesce metadata in states
    verified = landscape.verify()
    assert verified.ok, verified
    assert verified.checked["lines"] == 100 and verified.checked["source_rows"] == 100


def test_lineage_of_an_elspeth_row(landscape: Audit) -> None:
    tree = landscape.lineage(row_index=3)
    assert tree.tokens.height == 5 and tree.source_row is not None and tree.source_row["id"] == 4
    text = repr(tree)
    assert tree.title().endswith("payloads: source")  # ELSPETH keeps source rows only, not every boundary
    stored = dict(tree.data.select("kind", "stored").unique().group_by("kind").agg(pl.col("stored").all()).rows())
    assert stored["source"] is True and stored["sink_output"] is False  # what "source" promises
    assert "merge3: merged — policy quorum (2 of 3), timeout 5 s, merge nested, trigger quorum_met" in text
    assert "late: path_c arrived" in text


def test_payload_mode_says_what_elspeth_kept(landscape: Audit, tmp_path: Path) -> None:
    assert landscape.runs()["payload_mode"].to_list() == ["source"]
    assert landscape.run_summary().header["payload_mode"] == "source"
    assert open_audit(LOSSY / "audit.db").runs()["payload_mode"].to_list() == ["hashes"]


def test_a_source_row_whose_payload_is_gone_is_missing_not_hashes_only(tmp_path: Path) -> None:
    """ELSPETH keeps every source row ('source'): one whose payload file was purged is missing, and says so."""
    copy = tmp_path / "lossy"
    shutil.copytree(LOSSY, copy)
    with sqlite3.connect(copy / "audit.db") as con:
        [(ref,)] = con.execute("SELECT source_data_ref FROM rows WHERE row_index = 1").fetchall()
    [payload] = [p for p in (copy / "payloads").rglob(ref) if p.is_file()]
    payload.unlink()
    audit = open_audit(copy / "audit.db", payloads=copy / "payloads")
    gone, kept = audit.lineage(row_index=1), audit.lineage(row_index=2)
    assert gone.source_row is None and kept.source_row is not None
    assert repr(gone).splitlines()[1] == ("source row 1: (payload missing: purged, not copied or not matching its "
                                          f"hash; verify() says which) sha256 {ref[:16]}…")
    assert "(hashes only)" in repr(open_audit(copy / "audit.db").lineage(row_index=1))  # no folder given: by choice
    running = tmp_path / "running"  # the same row of a run still being written: not yet, not purged
    shutil.copytree(copy, running)
    writer = sqlite3.connect(running / "audit.db", isolation_level=None)
    writer.execute("PRAGMA journal_mode = DELETE")  # no write-ahead log left beside the file once closed
    writer.execute("UPDATE runs SET status = 'running', completed_at = NULL")
    writer.close()
    still = open_audit(running / "audit.db", payloads=running / "payloads").lineage(row_index=1)
    assert repr(still).splitlines()[1] == ("source row 1: (payload missing: not written yet, the run is still "
                                           f"running) sha256 {ref[:16]}…")


def test_without_the_payload_folder_only_hashes_are_shown(tmp_path: Path) -> None:
    audit = open_audit(LOSSY / "audit.db")
    tree = audit.lineage(row_index=0)
    assert tree.source_row is None and "(hashes only)" in repr(tree) and tree.title().endswith("payloads: hashes")
    verified = audit.verify()
    assert verified.ok and verified.checked["source_rows"] == 0
    assert verified.checked["source_rows_without_payload"] == 100


def test_refresh_reimports(landscape: Audit) -> None:
    before = landscape.runs()
    landscape.refresh()
    assert landscape.runs().equals(before)
