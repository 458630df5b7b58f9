"""A small real run of the demo pipeline, shared by the display tests that need a real audit store."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import elspeth_nb as enb

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "demo"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> enb.RunResult:
    """The first 300 demo payments, run for real (best_effort with timeouts, late and lost branches)."""
    work = tmp_path_factory.mktemp("demo")
    lines = (DEMO / "payments.csv").read_text().splitlines(keepends=True)
    (work / "payments.csv").write_text("".join(lines[:301]))
    settings = yaml.safe_load((DEMO / "pipeline.yaml").read_text())
    settings["source"]["options"]["path"] = str(work / "payments.csv")
    for sink in settings["sinks"].values():
        sink["options"]["path"] = str(work / "output" / Path(sink["options"]["path"]).name)
    return enb.run_pipeline(enb.Pipeline.from_dict(settings, base_dir=DEMO), audit=work / "audit")


@pytest.fixture
def demo_audit(demo_run: enb.RunResult) -> enb.Audit:
    with enb.open_audit(demo_run.audit_path) as audit:
        yield audit
