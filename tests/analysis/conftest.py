"""Audit stores built by running real pipelines (fake clock), shared by the analysis tests.

``matrix``: one store holding a run per case below, covering every policy and merge strategy,
lost branches, delays, timeouts and late arrivals, plus a run with seeded random latencies for
percentiles and a hashes-only run. Each run writes its sink in its own folder, so every
artifact still matches its file.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from elspeth_nb.analysis import Audit, open_audit
from elspeth_nb.audit.store import AuditStore
from elspeth_nb.audit.writer import ParquetSegmentWriter
from elspeth_nb.engine.clock import FakeClock
from elspeth_nb.engine.runner import run_pipeline
from tests.analysis import raw
from tests.cases import ROWS, fork_pipeline, scenario_options, write_csv

#: case -> (policy, merge, scenario); scenarios as in tests/engine/test_coalesce_matrix.py
CASES: dict[str, tuple[str, str, str]] = {
    "require_all-union-all": ("require_all", "union", "all"),
    "require_all-nested-lost": ("require_all", "nested", "lost"),
    "require_all-select-timeout": ("require_all", "select", "timeout"),
    "quorum-union-delayed": ("quorum", "union", "delayed"),
    "quorum-nested-lost": ("quorum", "nested", "lost"),
    "quorum-select-timeout": ("quorum", "select", "timeout"),
    "best_effort-union-timeout": ("best_effort", "union", "timeout"),
    "best_effort-nested-lost": ("best_effort", "nested", "lost"),
    "best_effort-select-delayed": ("best_effort", "select", "delayed"),
    "first-union-delayed": ("first", "union", "delayed"),
    "first-select-all": ("first", "select", "all"),
    "first-nested-timeout": ("first", "nested", "timeout"),
}
#: Seeded random latencies on b and c, best_effort with a timeout: varied waits, timeouts and late arrivals.
JITTER = "jitter"
HASHES_ONLY = "hashes-only"
JITTER_ROWS = 40


def jitter_pipeline(folder: Path) -> dict[str, Any]:
    rows = [{"id": i, "category": ("toys", "books", "garden")[i % 3], "amount": i * 10, "note": f"note number {i}"}
            for i in range(JITTER_ROWS)]
    pipeline = fork_pipeline(write_csv(folder / "input.csv", rows), policy="best_effort", timeout_seconds=0.12,
                             slow={"b": 1, "c": 1}, lose_c_for="garden")
    for transform in pipeline["transforms"]:
        if transform["name"] == "b_call":
            transform["options"] = {"distribution": "lognormal", "mean_ms": 40, "sigma": 0.8, "seed": 3}
        if transform["name"] == "c_call":
            transform["options"] = {"distribution": "exponential", "mean_ms": 30, "seed": 5}
    return pipeline


@dataclass
class Matrix:
    """The shared store: where it is, and the run id and pipeline of each case."""

    store: Path
    runs: dict[str, str] = field(default_factory=dict)
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    folders: dict[str, Path] = field(default_factory=dict)

    def raw(self, table: str, case: str) -> list[dict[str, Any]]:
        return raw.rows(self.store, table, self.runs[case])


def matrix_pipelines(root: Path) -> dict[str, dict[str, Any]]:
    """Every case's pipeline, each reading and writing in its own folder under ``root``."""
    pipelines = {}
    for case, (policy, merge, scenario) in CASES.items():
        (root / case).mkdir(exist_ok=True)
        source = write_csv(root / case / "input.csv")
        pipelines[case] = fork_pipeline(source, **scenario_options(policy, merge, scenario))
    (root / JITTER).mkdir(exist_ok=True)
    pipelines[JITTER] = jitter_pipeline(root / JITTER)
    (root / HASHES_ONLY).mkdir(exist_ok=True)
    pipelines[HASHES_ONLY] = fork_pipeline(write_csv(root / HASHES_ONLY / "input.csv"), policy="quorum",
                                           quorum_count=2, lose_c_for="toys", payloads="hashes")
    return pipelines


def build_matrix(root: Path, timeout_s: float = 300.0) -> Matrix:
    """Run every case into ``root/audit``; any number of processes may call this at once on one ``root``.

    Each process claims cases one at a time (an exclusively created file), runs them, and waits for
    the cases others claimed: concurrent writers in one store, as the store allows. The last one
    brings audit.duckdb up to date.
    """
    root.mkdir(parents=True, exist_ok=True)
    store = root / "audit"
    with _locked(root):
        AuditStore.create(store)
        pipelines = matrix_pipelines(root)
    for case in pipelines:
        try:
            os.close(os.open(root / f"{case}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        writer = ParquetSegmentWriter(store / "parquet", fsync=False)  # the same segments, minus the fsyncs
        result = run_pipeline(pipelines[case], audit=store, clock=FakeClock(), writer=writer)
        assert result.status == "completed", (case, result)
        (root / f"{case}.run").write_text(result.run_id)
    deadline = time.monotonic() + timeout_s
    while not all((root / f"{case}.run").exists() for case in pipelines):
        assert time.monotonic() < deadline, "another test worker did not finish its share of the matrix"
        time.sleep(0.05)
    runs = {case: (root / f"{case}.run").read_text() for case in pipelines}
    with _locked(root):
        if not (root / "synced").exists():
            sync = AuditStore.open(store).sync_duckdb(list(runs.values()))
            assert sync.ok, sync.message
            (root / "synced").touch()
    return Matrix(store, runs, pipelines, {case: root / case for case in pipelines})


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    with (root / "matrix.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def matrix(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Matrix:
    """Built once per test session; pytest-xdist workers build it together and share it (read-only)."""
    if worker_id == "master":
        return build_matrix(tmp_path_factory.mktemp("matrix"))
    return build_matrix(tmp_path_factory.getbasetemp().parent / "analysis-matrix")


@pytest.fixture(scope="session")
def audit(matrix: Matrix) -> Iterator[Audit]:
    """The matrix store opened from its Parquet folder (the helpers' results are checked on this one)."""
    opened = open_audit(matrix.store)
    yield opened
    opened.close()


@pytest.fixture(scope="session")
def duck_audit(matrix: Matrix) -> Iterator[Audit]:
    """The same store opened from its audit.duckdb: must answer exactly as ``audit`` does."""
    opened = open_audit(matrix.store / "audit.duckdb")
    yield opened
    opened.close()


@pytest.fixture(params=["store", "duckdb"])
def any_audit(request: pytest.FixtureRequest, audit: Audit, duck_audit: Audit) -> Audit:
    opened = audit if request.param == "store" else duck_audit
    assert opened.kind == request.param
    return opened


@pytest.fixture(scope="session")
def simple_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One require_all / union run over tests.cases.ROWS: what the docstring examples run against."""
    root = tmp_path_factory.mktemp("simple")
    result = run_pipeline(fork_pipeline(write_csv(root / "input.csv")), audit=root / "audit", clock=FakeClock())
    assert result.rows == len(ROWS)
    return root / "audit"
