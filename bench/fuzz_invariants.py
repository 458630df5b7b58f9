"""Fuzz the trail's invariants: run thousands of random pipelines and check every one.

Each pipeline is drawn from tests/fuzz/generator.py (1-3 forks, nested coalesces, every policy and
merge strategy, branch loss, simulated calls with latency and failures, timeouts, transform errors),
run on a fake clock into a temporary audit store, and checked with ``Audit.check``. A violation
prints the seed; rerun one case with ``--seed N --count 1``.

    .venv/bin/python bench/fuzz_invariants.py --count 5000 [--seed 0] [--processes 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 8  # seeds per task
sys.path.insert(0, str(ROOT))

from tests.fuzz.generator import RandomDraw, random_pipeline  # noqa: E402
from tests.fuzz.test_invariants import run_and_check  # noqa: E402


def fuzz_one(seed: int) -> tuple[int, list[str], list[dict[str, object]]]:
    """Run and check the pipeline of ``seed``: (seed, its coalesce shapes, the violations found)."""
    with tempfile.TemporaryDirectory() as folder:
        pipeline = random_pipeline(RandomDraw(seed), Path(folder))
        shapes = [c["policy"] + "/" + c["merge"] for c in pipeline["coalesce"]]
        return seed, shapes, run_and_check(pipeline)


def fuzz_chunk(seeds: range) -> list[tuple[int, list[str], list[dict[str, object]]]]:
    return [fuzz_one(seed) for seed in seeds]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0, help="first seed; case i uses seed + i")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    violations: Counter[str] = Counter()
    failed_seeds: list[int] = []
    shapes: Counter[str] = Counter()
    seeds = range(args.seed, args.seed + args.count)
    chunks = [seeds[i:i + CHUNK] for i in range(0, len(seeds), CHUNK)]
    done = 0
    # an executor, not a Pool: a worker that dies breaks it with an error instead of hanging the bench
    with ProcessPoolExecutor(args.processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(fuzz_chunk, chunk): chunk for chunk in chunks}
        for future in as_completed(futures):
            try:
                results = future.result()
            except BrokenProcessPool:
                chunk = futures[future]
                print(f"a worker process died running seeds {chunk[0]}..{chunk[-1]}: rerun them with "
                      f"--seed {chunk[0]} --count {len(chunk)} --processes 1", flush=True)
                return 2
            for seed, coalesces, found in results:
                done += 1
                shapes.update(coalesces)
                if found:
                    failed_seeds.append(seed)
                    violations.update(str(v["invariant"]) for v in found)
                    print(f"seed {seed}: {len(found)} violation(s): {found[:3]}", flush=True)
                if done % 500 == 0:
                    print(f"{done} pipelines, {len(failed_seeds)} with violations, "
                          f"{time.perf_counter() - started:.0f}s", flush=True)
    seconds = time.perf_counter() - started
    print(f"\n{args.count} random pipelines in {seconds:.0f}s ({args.count / seconds:.1f}/s): "
          f"{len(failed_seeds)} with invariant violations {dict(violations)}")
    print("coalesces by policy/merge:", dict(sorted(shapes.items())))
    return 1 if failed_seeds else 0


if __name__ == "__main__":
    sys.exit(main())
