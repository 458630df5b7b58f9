"""The command line's edges: an interrupt and a closed pipe end in one line, never a traceback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cases import fork_pipeline, write_csv

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "elspeth_nb.cli"]


def _pipeline(tmp_path: Path, **options: object) -> Path:
    rows = [{"id": i, "category": "books", "amount": i, "note": "a note"} for i in range(400)]
    settings = fork_pipeline(write_csv(tmp_path / "in.csv", rows), **options)  # type: ignore[arg-type]
    settings["engine"] = {"max_in_flight": 1}  # one row at a time: a slow call makes the run slow
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    return path


def test_ctrl_c_ends_a_run_with_one_line_and_exit_130(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path, slow={"a": 40.0})  # 400 rows one at a time, a 40 ms call each: 16 s
    child = subprocess.Popen([*CLI, "run", str(pipeline)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    locks = tmp_path / "audit" / ".locks"  # the run holds its lock file while it writes: it has started
    deadline = time.monotonic() + 60
    while not (locks.is_dir() and any(locks.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, (out, err)
    assert "Traceback" not in err and err.startswith("elspeth-nb run: interrupted: run "), err
    assert err.rstrip().endswith("interrupted; its trail is complete up to that point")


def test_a_closed_pipe_is_not_an_error_worth_a_traceback(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path)
    assert subprocess.run([*CLI, "run", str(pipeline)], cwd=ROOT, capture_output=True, check=False).returncode == 0
    # `true` leaves before the verdict is printed (after a second of imports and hashing): the pipe is closed
    reader = subprocess.run(f"{' '.join(CLI)} verify --audit {tmp_path / 'audit'} | true", shell=True,
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert reader.returncode == 0 and reader.stderr == "", reader.stderr


def test_demo_names_a_missing_pipeline_in_one_line(tmp_path: Path) -> None:
    given = subprocess.run([*CLI, "demo", "--pipeline", str(tmp_path / "nope.yaml")], cwd=ROOT, capture_output=True,
                           text=True, check=False)
    assert (given.returncode, given.stderr) == (2, f"elspeth-nb demo: demo pipeline {tmp_path / 'nope.yaml'} does "
                                                   "not exist\n")
    default = subprocess.run([*CLI, "demo"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert (default.returncode, default.stderr) == (2, "elspeth-nb demo: demo pipeline data/demo/pipeline.yaml does "
                                                       "not exist; run `make demo` from the repository root\n")


def test_rebuild_that_leaves_a_run_out_says_so_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from elspeth_nb.cli import main
    from elspeth_nb.engine.runner import run_pipeline

    settings = fork_pipeline(write_csv(tmp_path / "in.csv"))
    damaged = run_pipeline(settings).run_id
    run_pipeline(settings)
    [segment] = (tmp_path / "audit" / "parquet" / "tokens" / f"run_id={damaged}").glob("part-*.parquet")
    segment.write_bytes(segment.read_bytes()[:100])
    assert main(["rebuild", "--audit", str(tmp_path / "audit")]) == 1
    out = capsys.readouterr().out
    assert ": 1 run(s) in " in out and "1 run(s) left out of audit.duckdb and kept pending" in out and damaged in out


def test_demo_of_a_run_that_fails_prints_it_and_exits_1_as_run_does(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from elspeth_nb.cli import main

    settings = fork_pipeline(write_csv(tmp_path / "in.csv"))
    settings["transforms"][0].update(plugin="python", options={"function": f"{tmp_path / 'plugin.py'}:explode"})
    (tmp_path / "plugin.py").write_text("def explode(row):\n    raise SystemExit('boom')\n")
    (tmp_path / "pipeline.yaml").write_text(json.dumps(settings))
    assert main(["demo", "--pipeline", str(tmp_path / "pipeline.yaml"), "--audit", str(tmp_path / "audit"),
                 "--no-report"]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and f"Audit store: {(tmp_path / 'audit').resolve()}" in out


def test_python_m_elspeth_nb_is_the_command_line() -> None:
    shown = subprocess.run([sys.executable, "-m", "elspeth_nb", "--help"], cwd=ROOT, capture_output=True, text=True,
                           check=False)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: elspeth-nb")
