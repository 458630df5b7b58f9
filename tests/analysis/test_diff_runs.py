"""diff_runs: config keys, nodes, outcome and decision deltas, wait percentiles, against the raw trail."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from elspeth_nb.analysis import Audit
from elspeth_nb.analysis.diff import RunDiff
from tests.analysis import raw
from tests.analysis.conftest import JITTER, Matrix

A, B = "quorum-union-delayed", "quorum-nested-lost"


def test_diff_of_two_runs(audit: Audit, matrix: Matrix) -> None:
    run_a, run_b = matrix.runs[A], matrix.runs[B]
    diff = audit.diff_runs(run_a, run_b)
    assert (diff.a, diff.b) == (run_a, run_b) and not diff.same_config
    config = {r["key"]: (r["change"], r["a"], r["b"]) for r in diff.config.iter_rows(named=True)}
    assert config["coalesce[merge3].merge"] == ("changed", '"union"', '"nested"')
    assert config["coalesce[merge3].timeout_seconds"] == ("removed", "1", None)  # canonical JSON: 1.0 is 1
    assert config["transforms[c_filter].plugin"] == ("added", None, '"keyword_filter"')
    assert config["transforms[b_call].plugin"] == ("removed", '"latency"', None)
    assert all(not k.startswith("sinks") or "path" in k for k in config)  # only the sink paths differ there

    nodes = {r["node_name"]: r["change"] for r in diff.nodes.iter_rows(named=True)}
    assert nodes == {"b_call": "removed", "c_filter": "added", "merge3": "changed",
                     "output": "changed", "source": "changed"}

    def outcomes(run: str) -> Counter[str]:
        return Counter(o["outcome"] for o in raw.rows(matrix.store, "token_outcomes", run))

    want = outcomes(run_b)
    want.subtract(outcomes(run_a))
    assert {r["outcome"]: r["delta"] for r in diff.outcomes.iter_rows(named=True)} == dict(want)

    def decisions(run: str) -> Counter[tuple[object, ...]]:
        return Counter((e["event_type"], e["trigger"], e["failure_reason"])
                       for e in raw.rows(matrix.store, "coalesce_events", run))

    got = {(r["event_type"], r["trigger"], r["failure_reason"]): (r["a"], r["b"], r["delta"])
           for r in diff.decisions.iter_rows(named=True)}
    da, db = decisions(run_a), decisions(run_b)
    assert got == {k: (da[k], db[k], db[k] - da[k]) for k in da | db}


def test_wait_percentile_deltas(audit: Audit, matrix: Matrix) -> None:
    run_a, run_b = matrix.runs["best_effort-union-timeout"], matrix.runs[JITTER]
    diff = audit.diff_runs(run_a, run_b)
    waits = {run: [d["wait_duration_ms"] for d in raw.decisions(matrix.store, run)] for run in (run_a, run_b)}

    def stat(run: str, name: str) -> float:
        values = waits[run]
        q = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
        if name in q:
            return raw.quantile_cont(values, q[name])  # type: ignore[return-value]
        return {"decisions": float(len(values)), "mean": raw.mean(values), "max": max(values)}[name]  # type: ignore[return-value]

    assert diff.timings["stat"].to_list() == ["decisions", "mean", "p50", "p90", "p99", "max"]
    for record in diff.timings.iter_rows(named=True):
        assert record["a"] == pytest.approx(stat(run_a, record["stat"]))
        assert record["b"] == pytest.approx(stat(run_b, record["stat"]))
        assert record["delta"] == pytest.approx(record["b"] - record["a"])


def test_a_run_against_itself_differs_in_nothing(audit: Audit, matrix: Matrix) -> None:
    diff = audit.diff_runs(matrix.runs[JITTER], matrix.runs[JITTER])
    assert diff.same_config and diff.config.height == 0 and diff.nodes.height == 0
    assert set(diff.outcomes["delta"]) == {0} and set(diff.decisions["delta"]) == {0}


def test_diff_tidy_frame_and_reprs(audit: Audit, matrix: Matrix) -> None:
    diff = audit.diff_runs(matrix.runs[A], "latest")
    tidy = diff.to_polars()
    assert tidy.columns == ["section", "key", "a", "b", "delta"]
    assert set(tidy["section"]) == {"runs", "config", "nodes", "outcomes", "decisions", "timings"}
    assert tidy.filter(tidy["section"] == "runs").rows() == [("runs", "status", "completed", "completed", None),
                                                             ("runs", "producer", *diff.runs["producer"], None)]
    assert tidy.filter(tidy["section"] == "outcomes").height == diff.outcomes.height
    text = repr(diff)
    assert text.startswith(f"Run diff {matrix.runs[A]} -> {diff.b}\nRuns:") and "Wait time (ms):" in text
    assert diff.notes == [] and "<table>" in diff._repr_html_()


def test_a_run_without_decisions_took_zero_and_other_producers_and_statuses_are_named(tmp_path: Path) -> None:
    from elspeth_nb.analysis import open_audit
    from elspeth_nb.audit.importers.elspeth import import_into_store
    from elspeth_nb.engine.runner import run_pipeline
    from tests.cases import ROWS, fork_pipeline, write_csv

    store = tmp_path / "audit"
    full = run_pipeline(fork_pipeline(write_csv(tmp_path / "in.csv")), audit=store)
    (tmp_path / "empty.csv").write_text(",".join(ROWS[0]) + "\n")
    empty = run_pipeline(fork_pipeline(tmp_path / "empty.csv"), audit=store)
    sample = Path(__file__).resolve().parents[1] / "data" / "elspeth" / "requireall_nested"
    import_into_store(sample / "audit.db", store, payloads=sample / "payloads")
    with open_audit(store) as audit:
        diff = audit.diff_runs(full.run_id, empty.run_id)
        decisions = diff.timings.filter(diff.timings["stat"] == "decisions").row(0, named=True)
        assert (decisions["a"], decisions["b"], decisions["delta"]) == (len(ROWS), 0, -len(ROWS))
        assert diff.timings.filter(diff.timings["stat"] == "p50")["b"].to_list() == [None]  # no wait: no percentile
        assert diff.notes == []
        elspeth_run = audit.runs().filter(audit.runs()["producer"].str.starts_with("elspeth-nb").not_())["run_id"][0]
        crossed = audit.diff_runs(elspeth_run, full.run_id)
        assert [n for n in crossed.notes if "different producers" in n] == crossed.notes != []
        assert f"note: {crossed.notes[0]}" in repr(crossed) and "Note:" in crossed._repr_html_()
    stopped = RunDiff(**{**{f: getattr(diff, f) for f in ("a", "b", "config", "nodes", "outcomes", "decisions",
                                                           "timings")},
                         "runs": diff.runs.with_columns(
                             pl.Series("status", ["interrupted", "failed"]),
                             pl.Series("error_message", [None, "PluginError: boom"]))})
    assert stopped.notes == [
        f"run a ({full.run_id}) is interrupted: its counts stop where its trail does",
        f"run b ({empty.run_id}) is failed (PluginError: boom): its counts cover only what it did before it stopped"]


def test_arguments_that_override_the_settings_file_are_recorded_and_diffed(tmp_path: Path) -> None:
    from elspeth_nb.analysis import open_audit
    from elspeth_nb.engine.runner import run_pipeline
    from tests.cases import fork_pipeline, write_csv

    pipeline, store = fork_pipeline(write_csv(tmp_path / "in.csv")), tmp_path / "audit"
    plain = run_pipeline(pipeline, audit=store)
    lean = run_pipeline(pipeline, audit=store, payloads="hashes", max_in_flight=1)
    with open_audit(store) as audit:
        diff = audit.diff_runs(plain.run_id, lean.run_id)
        settings = audit.sql("SELECT run_id, payload_mode, settings_json->>'$.audit.payloads' AS recorded, "
                             "settings_json->>'$.audit.path' AS path FROM runs").rows(named=True)
    assert {(r["payload_mode"], r["recorded"]) for r in settings} == {("all", "all"), ("hashes", "hashes")}
    assert {r["path"] for r in settings} == {str(store)}  # the store the trail is in, not the file's default
    assert not diff.same_config
    assert diff.config.rows() == [("audit.payloads", "changed", '"all"', '"hashes"'),
                                  ("engine.max_in_flight", "changed", "1024", "1")]


def test_one_store_named_relatively_or_absolutely_is_the_same_config(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from elspeth_nb.analysis import open_audit
    from elspeth_nb.engine.runner import run_pipeline
    from tests.cases import fork_pipeline, write_csv

    pipeline = fork_pipeline(write_csv(tmp_path / "in.csv"))
    monkeypatch.chdir(tmp_path)
    relative = run_pipeline(pipeline, audit="store")
    absolute = run_pipeline(pipeline, audit=tmp_path / "store")
    with open_audit(tmp_path / "store") as audit:
        assert audit.diff_runs(relative.run_id, absolute.run_id).same_config


def test_config_values_compare_as_json_and_dotted_keys_stay_apart() -> None:
    from elspeth_nb.analysis.diff import _config_diff

    flags = _config_diff('{"t": {"flag": 1, "off": 0}}', '{"t": {"flag": true, "off": false}}')
    assert flags.rows() == [("t.flag", "changed", "1", "true"), ("t.off", "changed", "0", "false")]
    dotted = _config_diff('{"o": {"a.b": 0}}', '{"o": {"a": {"b": 0}}}')
    assert dotted.rows() == [("o.a.b", "added", None, "0"), ('o["a.b"]', "removed", "0", None)]
