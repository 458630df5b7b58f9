"""Sharded runs: a large input split into contiguous record ranges, one forked worker per range.

Rows never interact across source rows (a coalesce joins the branches of one row), so a run can be
split by source record. Each worker processes its range with its own recorder (segments named
``part-w<k>-<n>``), id counters offset by ``(k + 1) * 10**16`` and sink parts; the parent joins the
sink parts in range order, so outputs are in the same order a single process would write them.
A worker whose parent dies exits on its own, leaving the run to be found ``interrupted``.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from elspeth_nb.audit.schema import RunStatus
from elspeth_nb.engine.plugins.sinks import OpenSinks, SinkFailedError, assemble_parts, part_path, part_sink
from elspeth_nb.engine.processor import ProcessStats, RowProcessor, RunStopped
from elspeth_nb.engine.tokens import EngineContext

if TYPE_CHECKING:
    from elspeth_nb.engine.runner import Engine, RunOutcome

ID_STRIDE = 10**16


@dataclass
class ShardResult:
    """What one worker reports back (pickled through a pipe)."""

    index: int
    status: str = RunStatus.COMPLETED
    error: str | None = None
    stats: ProcessStats = field(default_factory=ProcessStats)
    outcome_counts: dict[str, int] = field(default_factory=dict)
    records: dict[str, int] = field(default_factory=dict)
    parts: dict[str, tuple[str, int]] = field(default_factory=dict)  # sink -> (part path, rows)
    failed_sinks: list[str] = field(default_factory=list)  # sinks that failed in this worker (part kept, no artifact)
    seconds: dict[str, float] = field(default_factory=dict)  # where the worker's time went
    stopped: bool = False  # it stopped because the parent asked (an interrupt, another worker's failure)
    died: bool = False  # it sent nothing back: killed, or crashed in native code


def shard_bounds(total: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal record ranges.

    >>> shard_bounds(10, 3)
    [(0, 3), (3, 6), (6, 10)]
    """
    return [(total * k // workers, total * (k + 1) // workers) for k in range(workers)]


#: What the parent asks of its workers, in a byte they read every 64 source rows.
KEEP_GOING, STOP_FAILED, STOP_INTERRUPTED = 0, 1, 2


def run_sharded(engine: Engine, workers: int) -> RunOutcome:
    """Process the engine's source over ``workers`` forked processes and merge what they did.

    The parent decides when the run stops: an interrupt (Ctrl-C, a notebook's stop button) or a worker
    that fails or dies asks every other worker to stop between rows; each then closes its part of the
    trail as a single-process run would, so the run's trail accounts for every token it created. A second
    interrupt stops waiting for them.
    """
    from elspeth_nb.engine.runner import RunOutcome

    bounds = shard_bounds(engine.source.count_records(), workers)
    context = multiprocessing.get_context("fork")
    stop = context.RawValue("b", KEEP_GOING)
    processes, pipes = [], {}
    for index, (start, end) in enumerate(bounds):
        receive_end, send_end = context.Pipe(duplex=False)
        process = context.Process(target=_worker, args=(engine, index, start, end, send_end, os.getpid(), stop),
                                  name=f"elspeth-nb-shard-{index}")
        process.start()
        send_end.close()
        processes.append(process)
        pipes[receive_end] = index
    try:
        results = _collect(pipes, processes, stop)
    except KeyboardInterrupt:
        for process in processes:
            process.terminate()
        raise
    finally:
        for process in processes:
            process.join()
    outcome = RunOutcome(ProcessStats(), {}, {}, {})
    outcome.shard_seconds = [r.seconds for r in results]
    _merge(outcome, results)
    _assemble(engine, results, outcome)
    return outcome


def _collect(pipes: dict[Connection, int], processes: list[Any], stop: Any) -> list[ShardResult]:
    """Every worker's result; the first failure or death asks the others to stop, so does an interrupt."""
    results: dict[int, ShardResult] = {}
    waiting = dict(pipes)
    interrupted = False
    while waiting:
        try:
            ready = wait(list(waiting))
        except KeyboardInterrupt:
            if interrupted:  # a second interrupt: stop waiting for the workers
                raise
            interrupted = True
            stop.value = STOP_INTERRUPTED
            continue
        for conn in ready:
            index = waiting.pop(cast(Connection, conn))
            try:
                result: ShardResult = cast(Connection, conn).recv()
            except EOFError:
                processes[index].join()
                result = ShardResult(index, RunStatus.INTERRUPTED, _death(processes[index].exitcode), died=True)
            results[index] = result
            if result.status != RunStatus.COMPLETED and stop.value == KEEP_GOING:
                stop.value = STOP_FAILED
    return [results[i] for i in sorted(results)]


def _death(exitcode: int | None) -> str:
    """How a worker that sent no result ended."""
    if exitcode is not None and exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return f"the worker {how} before reporting: the records it had not yet written are lost"


def _merge(outcome: RunOutcome, results: list[ShardResult]) -> None:
    """Sum the workers' counts; the run's status and error come from what went wrong first-hand.

    A worker that died leaves the trail short of what it held in memory: the run is ``interrupted``. Else
    a worker's own failure is the run's, not the stops it caused in the others.
    """
    stats = outcome.stats
    started = [r.stats.source_started for r in results if r.stats.source_started]
    ended = [r.stats.source_ended for r in results if r.stats.source_ended]
    stats.source_started, stats.source_ended = min(started, default=0.0), max(ended, default=0.0)
    for result in results:
        stats.rows += result.stats.rows
        stats.quarantined += result.stats.quarantined
        for name, counts in result.stats.coalesce.items():
            merged = stats.coalesce.setdefault(name, dict.fromkeys(counts, 0))
            for key, value in counts.items():
                merged[key] += value
        for name, state in result.stats.first_sink_states.items():
            if stats.first_sink_states.get(name) is None:
                stats.first_sink_states[name] = state
        for key, value in result.outcome_counts.items():
            outcome.outcome_counts[key] = outcome.outcome_counts.get(key, 0) + value
        for key, value in result.records.items():
            outcome.records[key] = outcome.records.get(key, 0) + value
    died = [r for r in results if r.died]
    failed = [r for r in results if r.status != RunStatus.COMPLETED and not r.died and not r.stopped]
    stopped = [r for r in results if r.stopped]
    outcome.lost_workers = [r.index for r in died]
    if died:
        outcome.status = RunStatus.INTERRUPTED
        outcome.error = "; ".join(f"worker {r.index}: {r.error}" for r in died + failed)
    elif failed or stopped:
        first = (failed or stopped)[0]
        outcome.status, outcome.error = first.status, f"worker {first.index}: {first.error}"


def _assemble(engine: Engine, results: list[ShardResult], outcome: RunOutcome) -> None:
    """Join each sink's parts into its file; no artifact for a sink that failed anywhere or a run a worker died in.

    What each worker's sink wrote before the run stopped stays in the file, as in a single-process run; a
    part whose worker died or whose sink failed is joined whole, since its row count was not reported.
    """
    failed = {name for r in results for name in r.failed_sinks}
    for name, sink in engine.sinks.items():
        parts: list[tuple[Path, int | None]] = []
        for r in results:
            if name in r.parts:
                parts.append((Path(r.parts[name][0]), r.parts[name][1]))
            elif r.died or name in r.failed_sinks:
                parts.append((part_path(sink, engine.run_id, r.index), None))
        if not any(path.is_file() for path, _ in parts):
            continue
        try:
            artifact = assemble_parts(sink, parts)
        except Exception as exc:
            error = SinkFailedError(name, sink.path, "joining the workers' parts", exc)
            if outcome.status == RunStatus.COMPLETED:
                outcome.status, outcome.error = RunStatus.FAILED, f"{type(error).__name__}: {error}"
            continue
        if name not in failed and not outcome.lost_workers:
            outcome.artifacts[name] = (artifact, outcome.stats.first_sink_states.get(name))


def _worker(engine: Engine, index: int, start: int, end: int, conn: Connection, parent: int, stop: Any) -> None:
    """Body of worker ``index``: process records [start, end) and report a ShardResult."""
    from elspeth_nb.engine.runner import abandon_in_flight

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent asks every worker to stop, between rows
    faulthandler.enable(all_threads=True)  # a crash in native code still says where it happened
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    began = time.perf_counter()
    result = ShardResult(index)
    sinks = OpenSinks({name: part_sink(sink, engine.run_id, index) for name, sink in engine.sinks.items()})
    # sink bytes reach the OS before the audit says they were written
    rec = engine.recorder(None, before_flush=sinks.flush, part_prefix=f"w{index}-")
    ctx = EngineContext(engine.run_id, rec, engine.clock, engine.payload_mode, id_offset=(index + 1) * ID_STRIDE)
    processor: RowProcessor | None = None
    failure: BaseException | None = None

    def should_stop() -> RunStopped | None:
        asked = stop.value
        if asked == KEEP_GOING:
            return None
        if asked == STOP_INTERRUPTED:
            return RunStopped("interrupted by the user (KeyboardInterrupt)", interrupted=True)
        return RunStopped("stopped because another worker of this sharded run failed", interrupted=False)

    try:
        sinks.open()
        processor = RowProcessor(engine.pipeline, ctx, source=engine.source, plugins=engine.plugins,
                                 sinks=sinks.sinks, edge_ids=engine.edge_ids, max_in_flight=engine.max_in_flight,
                                 should_stop=should_stop)
        processor.process(start, end)
        result.seconds["process"] = time.perf_counter() - began
    except RunStopped as exc:
        result.stopped = True
        if exc.interrupted:
            result.status, result.error = RunStatus.INTERRUPTED, str(exc)
            abandon_in_flight(ctx, result.error, "run_interrupted")
        else:
            result.status, result.error = RunStatus.FAILED, f"RunStopped: {exc}"
            abandon_in_flight(ctx, result.error)
    except KeyboardInterrupt:
        result.status, result.error = RunStatus.INTERRUPTED, "interrupted"
    except BaseException as exc:
        result.status, result.error, failure = RunStatus.FAILED, f"{type(exc).__name__}: {exc}", exc
        abandon_in_flight(ctx, result.error)
    if processor is not None:
        result.stats = processor.stats
    closed, close_failure = sinks.close(failure)
    if close_failure is not None and result.status == RunStatus.COMPLETED:
        result.status, result.error = RunStatus.FAILED, f"{type(close_failure).__name__}: {close_failure}"
    result.parts = {name: (str(artifact.path), artifact.rows) for name, artifact in closed.items()}
    result.failed_sinks = sinks.failed  # their parts keep what reached them; the parent joins them, no artifact
    rec.close()
    result.seconds["total"] = time.perf_counter() - began
    result.outcome_counts = dict(ctx.outcome_counts)
    result.records = dict(rec.records_written)
    conn.send(result)
    conn.close()


def _exit_with_parent(parent: int) -> None:
    """A worker never outlives the run that started it."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(70)
