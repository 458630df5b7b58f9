"""bench/_machine.py: the CPU seconds and steal share the benchmarks print beside their wall-clock figures."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _machine() -> Any:
    spec = importlib.util.spec_from_file_location("_machine", BENCH / "_machine.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_machine", module)  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


def test_conditions_count_cpu_spent_between_start_and_stop() -> None:
    machine = _machine()
    idle = machine.Conditions().start().stop()
    busy = machine.Conditions().start()
    total = sum(i * i for i in range(3_000_000))
    busy.stop()
    assert total > 0
    assert busy.cpu_s > 0.05 > idle.cpu_s
    assert "CPU us per source row" in busy.describe(1000)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_steal_is_a_share_of_machine_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    machine = _machine()
    stat = tmp_path / "stat"
    monkeypatch.setattr(machine, "PROC_STAT", stat)
    stat.write_text("cpu  100 0 50 800 0 0 0 50 0 0\ncpu0 1 2 3\n")
    conditions = machine.Conditions().start()
    stat.write_text("cpu  200 0 100 1500 0 0 0 200 7 0\ncpu0 1 2 3\n")  # +1000 jiffies: 150 busy, 150 stolen
    conditions.stop()
    assert conditions.steal_pct == pytest.approx(15.0)
    ours = 100.0 * conditions.cpu_s * os.sysconf("SC_CLK_TCK") / 1000
    assert conditions.others_pct == pytest.approx(max(0.0, 15.0 - ours))
    assert conditions.shares().startswith("CPU steal 15%, other processes ")
    stat.unlink()
    assert machine.Conditions().start().stop().steal_pct is None  # no /proc/stat: unknown, not 0


@pytest.mark.slow
def test_engine_floor_prints_each_stage_of_the_trail_in_order(tmp_path: Path) -> None:
    """Four stages, each measured on the real pipeline; the full trail costs more than none (fixed costs blur the
    middle stages at this size)."""
    out = subprocess.run([sys.executable, str(BENCH / "engine_floor.py"), "--rows", "2000", "--repeat", "1",
                          "--work", str(tmp_path)], check=True, capture_output=True, text=True).stdout
    stages = {line[:12].strip(): int(line[12:24]) for line in out.splitlines()
              if line[:12].strip() in ("no trail", "buffered", "in Arrow", "full trail")}
    assert list(stages) == ["no trail", "buffered", "in Arrow", "full trail"]
    assert all(cost > 0 for cost in stages.values()) and stages["no trail"] < stages["full trail"]
    assert (tmp_path / "floor_2000" / "output.jsonl").read_text().count("\n") == 2000  # the pipeline really ran
    assert "rerun: .venv/bin/python bench/engine_floor.py --rows 2000 --repeat 1" in out


@pytest.mark.slow
def test_batch_ceiling_writes_the_engines_trail_and_its_check_notices_a_difference(tmp_path: Path) -> None:
    """The ceiling counts the engine's work only if its trail is the engine's: the script checks that, and the check
    is not blind (a missing payload segment makes it differ)."""
    out = subprocess.run([sys.executable, str(BENCH / "batch_ceiling.py"), "--rows", "700", "--workers", "1",
                          "--batch", "256", "--check", "500", "--work", str(tmp_path)],
                         check=True, capture_output=True, text=True).stdout
    assert "trail check on 500 rows: same records as the engine's" in out
    assert "700 rows, 1 worker(s), batches of 256, today's trail:" in out
    assert (tmp_path / "ceiling_700" / "output.jsonl").read_text().count("\n") == 700
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("batch_ceiling", BENCH / "batch_ceiling.py")
        assert spec and spec.loader
        ceiling = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ceiling)
    finally:
        sys.path.remove(str(BENCH))
    engine, ours = tmp_path / "engine_check_500" / "audit", tmp_path / "ceiling_check_500" / "audit"
    assert ceiling._trail(engine) == ceiling._trail(ours)
    for segment in (ours / "parquet" / "payloads").glob("*/part-*.parquet"):
        segment.unlink()
    differing = ceiling._trail(ours)
    assert differing["payloads"] == [] and ceiling._trail(engine)["payloads"]
