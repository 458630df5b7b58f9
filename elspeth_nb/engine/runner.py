"""Run a pipeline and record the whole trail: ``run_pipeline`` and the :class:`Engine` behind it.

The engine checks everything it can before a run starts (source readable, sinks writable, store
writable), records the run, nodes and edges, processes the rows (in this process, or sharded over
worker processes for large inputs, see :mod:`elspeth_nb.engine.parallel`), then records artifacts,
operations and the final run revision, and brings audit.duckdb up to date.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from elspeth_nb._arguments import path_argument
from elspeth_nb._version import __version__
from elspeth_nb.audit.hashing import canonical_json, stable_hash
from elspeth_nb.audit.integrity import run_root
from elspeth_nb.audit.recorder import Recorder
from elspeth_nb.audit.schema import CANONICAL_VERSION, SCHEMA_VERSION, CoalesceEventType, RunStatus
from elspeth_nb.audit.store import AuditStore, check_duckdb_update, mark_interrupted
from elspeth_nb.audit.writer import Adopted, ParquetSegmentWriter, SegmentWriter
from elspeth_nb.engine.clock import Clock, SystemClock
from elspeth_nb.engine.dag import Pipeline, load_pipeline
from elspeth_nb.engine.plugins import build_sink, build_source, build_transform
from elspeth_nb.engine.plugins.sinks import Artifact, CsvSink, OpenSinks, ParquetSink
from elspeth_nb.engine.processor import ProcessStats, RowProcessor, RunStopped
from elspeth_nb.engine.tokens import EngineContext
from elspeth_nb.errors import AuditStoreError, ConfigError, Error, InputError

PRODUCER = f"elspeth-nb {__version__}"
INTERRUPTED_BY_USER = "interrupted by the user (KeyboardInterrupt)"
#: Inputs at least this large are sharded over worker processes when ``workers`` is left automatic.
SHARD_MIN_BYTES = 4 * 1024 * 1024
#: A run id names a folder of the store (``run_id=<id>``, a hive partition), so only these characters.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class RunResult:
    """What a run did: its id, status, counts and where its audit trail is."""

    run_id: str
    status: str
    audit_path: Path
    duration_s: float
    rows: int
    quarantined: int
    outcomes: Mapping[str, int]
    coalesce: Mapping[str, Mapping[str, int]]
    artifacts: tuple[str, ...]
    duckdb: str
    warnings: tuple[str, ...] = ()
    error: str | None = None
    counts: Mapping[str, int] = field(default_factory=dict)
    workers: int = 1
    #: Seconds spent writing the trail (until the Parquet segments were complete) and updating audit.duckdb.
    trail_s: float = 0.0
    duckdb_s: float = 0.0
    #: The run's Merkle root over all its segments (None when the trail was not written to Parquet).
    merkle_root: str | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.duration_s if self.duration_s > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "status": self.status, "audit_path": str(self.audit_path),
            "duration_s": round(self.duration_s, 3), "rows": self.rows, "quarantined": self.quarantined,
            "outcomes": dict(self.outcomes), "coalesce": {k: dict(v) for k, v in self.coalesce.items()},
            "artifacts": list(self.artifacts), "duckdb": self.duckdb, "warnings": list(self.warnings),
            "error": self.error, "workers": self.workers, "merkle_root": self.merkle_root,
        }

    def __repr__(self) -> str:
        outcomes = ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        lines = [
            f"Run {self.run_id}: {self.status} in {self.duration_s:.2f}s "
            f"({self.rows} source rows, {self.rows_per_second:,.0f} rows/s"
            f"{f', {self.workers} workers' if self.workers > 1 else ''})",
            f"  audit store: {self.audit_path}",
            f"  outcomes: {outcomes}",
        ]
        for name, stats in self.coalesce.items():
            lines.append(f"  coalesce {name}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
        if self.merkle_root:
            lines.append(f"  merkle root: {self.merkle_root}")
        if self.duckdb:
            lines.append(f"  audit.duckdb: {self.duckdb}")
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.error:
            lines.append(f"  error: {self.error}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from html import escape

        rows = "".join(f"<tr><th style='text-align:left'>{escape(k)}</th><td>{escape(str(v))}</td></tr>"
                       for k, v in self.to_dict().items())
        return f"<table><caption>elspeth-nb run</caption>{rows}</table>"

    def to_polars(self) -> Any:
        """The run's terminal outcomes: run_id, outcome, count (one row per outcome, by name)."""
        import polars as pl

        outcomes = sorted(self.outcomes.items())
        return pl.DataFrame({"run_id": [self.run_id] * len(outcomes), "outcome": [o for o, _ in outcomes],
                             "count": [n for _, n in outcomes]},
                            schema={"run_id": pl.String, "outcome": pl.String, "count": pl.Int64})


class RunFailedError(Error, RuntimeError):
    """The run started, its audit trail is complete and marked failed, and it did not finish."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class RunOutcome:
    """What processing produced, whether in this process or merged from workers."""

    stats: ProcessStats
    outcome_counts: dict[str, int]
    records: dict[str, int]
    artifacts: dict[str, tuple[Artifact, int | None]]  # sink -> (artifact, first sink state id)
    error: str | None = None
    status: str = RunStatus.COMPLETED
    shard_seconds: list[dict[str, float]] = field(default_factory=list)
    #: Workers of a sharded run that died without reporting (their unwritten records are lost).
    lost_workers: list[int] = field(default_factory=list)


def run_pipeline(
    pipeline: str | os.PathLike[str] | Pipeline | Mapping[str, Any],
    *,
    audit: str | os.PathLike[str] | None = None,
    clock: Clock | None = None,
    payloads: str | None = None,
    max_in_flight: int | None = None,
    workers: int | None = None,
    run_id: str | None = None,
    sync_duckdb: bool | str = True,
    writer: SegmentWriter | None = None,
    segment_rows: int = 200_000,
    flush_interval_s: float = 5.0,
) -> RunResult:
    """Run a pipeline (YAML path, mapping or :class:`Pipeline`) and write its audit trail.

    ``workers`` > 1 shards large inputs over worker processes (default: automatic, two on a
    multi-core machine for inputs over 4 MB with the system clock, one otherwise).
    ``sync_duckdb``: True brings audit.duckdb up to date before returning; ``"background"`` returns
    as soon as the Parquet trail is complete and updates audit.duckdb in a detached process (the run
    stays listed as pending until it is done); False leaves it pending.

    >>> result = run_pipeline("data/demo/pipeline.yaml", audit="/tmp/enb-doctest")  # doctest: +SKIP
    >>> result.status  # doctest: +SKIP
    'completed'
    """
    check_duckdb_update(sync_duckdb)
    loaded = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline)
    audit_root = loaded.resolve_path(loaded.config.audit.path) if audit is None else path_argument(audit, "audit")
    engine = Engine(
        loaded,
        audit_root=audit_root,
        clock=clock or SystemClock(),
        payload_mode=payloads or loaded.config.audit.payloads,
        max_in_flight=max_in_flight or loaded.config.engine.max_in_flight,
        run_id=uuid.uuid4().hex if run_id is None else run_id,
        workers=workers,
    )
    return engine.run(sync_duckdb=sync_duckdb, writer=writer, segment_rows=segment_rows,
                      flush_interval_s=flush_interval_s)


class Engine:
    """One run of one pipeline."""

    def __init__(self, pipeline: Pipeline, *, audit_root: Path, clock: Clock, payload_mode: str,
                 max_in_flight: int, run_id: str, workers: int | None = None) -> None:
        if payload_mode not in ("all", "boundaries", "hashes"):
            raise ConfigError([f"payloads: must be all, boundaries or hashes (got {payload_mode!r})"])
        check_run_id(run_id)
        self.pipeline = pipeline
        self.graph = pipeline.graph
        self.audit_root = audit_root
        self.clock = clock
        self.payload_mode = payload_mode
        self.max_in_flight = max(1, int(max_in_flight))
        self.run_id = run_id
        config = pipeline.config
        pipeline.check_paths(audit_root)
        self.source = build_source(config.source, pipeline.resolve_path, pipeline.where(("source", "options", "path")))
        self.source.check_readable()
        self.plugins = {t.name: build_transform(t, pipeline.base_dir,
                                                pipeline.where(("transforms", i, "options", "function")))
                        for i, t in enumerate(config.transforms)}
        self.sinks = {name: build_sink(s, pipeline.resolve_path) for name, s in config.sinks.items()}
        for create in (False, True):  # every sink checked before any folder is made for one
            for name, sink in self.sinks.items():
                check_writable(sink.path, pipeline.where(("sinks", name, "options", "path")), create=create)
        self.settings = self._effective_settings()
        self.workers = self._choose_workers(workers)

    def _effective_settings(self) -> dict[str, Any]:
        """The settings as this run applies them: arguments that override the file (payloads, max_in_flight,
        the audit path) replace its values, so settings_json and config_hash say what the run did."""
        config = self.pipeline.config
        settings = config.model_dump(mode="json", exclude_none=True)
        settings["audit"]["payloads"] = self.payload_mode
        if self.audit_root.resolve() != self.pipeline.resolve_path(config.audit.path).resolve():
            settings["audit"]["path"] = str(self.audit_root.resolve())  # "store" means nothing without the cwd
        settings["engine"]["max_in_flight"] = self.max_in_flight
        return settings

    def _choose_workers(self, requested: int | None) -> int:
        """Shard only when it pays and is safe: big input, real clock, sinks whose parts concatenate."""
        if requested is not None:
            wanted = max(1, int(requested))
        elif not isinstance(self.clock, SystemClock) or self.source.path.stat().st_size < SHARD_MIN_BYTES:
            wanted = 1
        else:
            wanted = min(2, os.cpu_count() or 1)
        if any(isinstance(s, CsvSink | ParquetSink) for s in self.sinks.values()):
            return 1  # a CSV header or Parquet schema comes from the first row written; keep one writer
        return wanted

    # -- the run --------------------------------------------------------------------------------
    def run(self, *, sync_duckdb: bool | str, writer: SegmentWriter | None, segment_rows: int,
            flush_interval_s: float) -> RunResult:
        store = AuditStore.create(self.audit_root)
        if any(store.parquet_root.glob(f"*/run_id={self.run_id}")) or store.lock_path(self.run_id).exists():
            raise AuditStoreError(f"run_id: {store.root} already holds a run {self.run_id!r}; a run id names one run "
                                  "(leave run_id out for a fresh one)")
        mark_interrupted(store, found_by="the next run in this store")
        self.store = store
        self.segment_rows, self.flush_interval_s = segment_rows, flush_interval_s
        started = time.perf_counter()
        with store.writing(self.run_id):
            # A sharded run forks: no thread of ours may hold a library lock then, so the parent writes inline.
            rec = self.recorder(writer, before_flush=None, background=self.workers == 1)
            ctx = EngineContext(self.run_id, rec, self.clock, self.payload_mode)
            self.edge_ids = self._record_run_start(ctx)
            rec.flush()
            try:
                if self.workers > 1:
                    from elspeth_nb.engine.parallel import run_sharded

                    outcome = run_sharded(self, self.workers)
                else:
                    outcome = self._run_here(ctx)
            except KeyboardInterrupt:
                outcome = self._empty_outcome(RunStatus.INTERRUPTED, INTERRUPTED_BY_USER)
            except BaseException as exc:
                outcome = self._empty_outcome(RunStatus.FAILED, f"{type(exc).__name__}: {exc}")
            counts = self._finalize(ctx, outcome)
        trail_s = time.perf_counter() - started
        message, duckdb_s = "", 0.0
        if writer is None:  # a run written elsewhere (tests' memory writer) has no audit.duckdb to update
            update = store.update_duckdb([self.run_id], sync_duckdb)
            message, duckdb_s = update.message, update.seconds
        result = RunResult(
            run_id=self.run_id, status=outcome.status, audit_path=self.audit_root,
            duration_s=time.perf_counter() - started, rows=outcome.stats.rows, quarantined=outcome.stats.quarantined,
            outcomes=dict(sorted(outcome.outcome_counts.items())), coalesce=outcome.stats.coalesce,
            artifacts=tuple(str(a.path) for a, _ in outcome.artifacts.values()), duckdb=message,
            warnings=self.pipeline.warnings, error=outcome.error, counts=counts, workers=self.workers,
            trail_s=trail_s, duckdb_s=duckdb_s, merkle_root=getattr(self, "merkle_root", None),
        )
        if outcome.status == RunStatus.INTERRUPTED and not outcome.lost_workers:
            raise KeyboardInterrupt(f"run {self.run_id} interrupted; its trail is complete up to that point")
        if outcome.status != RunStatus.COMPLETED:
            raise RunFailedError(f"run {self.run_id} {outcome.status}: {outcome.error}", result)
        return result

    def recorder(self, writer: SegmentWriter | None, before_flush: Any, part_prefix: str = "",
                 background: bool = True) -> Recorder:
        """A recorder for this run, writing Parquet segments unless ``writer`` is given."""
        target = writer or ParquetSegmentWriter(self.store.parquet_root, part_prefix=part_prefix)
        return Recorder(self.run_id, target, segment_rows=self.segment_rows, flush_interval_s=self.flush_interval_s,
                        before_flush=before_flush, time_offset=self.clock.offset, background=background)

    def _run_here(self, ctx: EngineContext) -> RunOutcome:
        """Process every record in this process, with the run's own recorder."""
        sinks = OpenSinks(self.sinks)
        ctx.rec.before_flush = sinks.flush  # sink bytes reach the OS before the audit says they were written
        processor: RowProcessor | None = None
        status, error, failure = RunStatus.COMPLETED, None, None
        try:
            sinks.open()
            with InterruptBetweenRows() as interrupt:
                processor = RowProcessor(self.pipeline, ctx, source=self.source, plugins=self.plugins,
                                         sinks=self.sinks, edge_ids=self.edge_ids, max_in_flight=self.max_in_flight,
                                         should_stop=interrupt.should_stop)
                processor.process()
        except RunStopped as stopped:  # a Ctrl-C, taken between rows: nothing is half recorded
            status, error = RunStatus.INTERRUPTED, str(stopped)
            abandon_in_flight(ctx, error, "run_interrupted")
        except KeyboardInterrupt:  # a second Ctrl-C, or one a plugin raised: where it stopped is unknown
            status, error = RunStatus.INTERRUPTED, INTERRUPTED_BY_USER
        except BaseException as exc:  # SystemExit from a plugin too: record it, then report it
            status, error, failure = RunStatus.FAILED, f"{type(exc).__name__}: {exc}", exc
            abandon_in_flight(ctx, error)
        stats = processor.stats if processor is not None else ProcessStats()
        closed, close_failure = sinks.close(failure)
        if close_failure is not None and status == RunStatus.COMPLETED:
            status, error = RunStatus.FAILED, f"{type(close_failure).__name__}: {close_failure}"
        artifacts = {name: (artifact, stats.first_sink_states.get(name)) for name, artifact in closed.items()}
        return RunOutcome(stats, dict(ctx.outcome_counts), {}, artifacts, error, status)

    @staticmethod
    def _empty_outcome(status: str, error: str | None) -> RunOutcome:
        return RunOutcome(ProcessStats(), {}, {}, {}, error, status)

    # -- run records ------------------------------------------------------------------------------
    def _record_run_start(self, ctx: EngineContext) -> dict[tuple[str, str], int]:
        rec = ctx.rec
        started = ctx.now()
        self._run_row: dict[str, Any] = {
            "started_at": started, "config_hash": stable_hash(self.settings),
            "settings_json": canonical_json(self.settings), "reproducibility_grade": self._grade(),
            "canonical_version": CANONICAL_VERSION, "source_schema_json": None,
            "source_field_resolution_json": None, "schema_version": SCHEMA_VERSION, "producer": PRODUCER,
            "pipeline_path": str(self.pipeline.source_path) if self.pipeline.source_path else None,
            "payload_mode": self.payload_mode,
        }
        rec.runs(completed_at=None, status=RunStatus.RUNNING, revision=0, **self._run_row)
        for node in self.graph.nodes:
            config = dict(node.config)
            schema: dict[str, Any] = config["schema"] if isinstance(config.get("schema"), dict) else {}
            rec.nodes(node.node_id, node.plugin_name, node.node_type, node.plugin_version, node.determinism,
                      node.config_hash, canonical_json(config), None, node.step, started, schema.get("mode"),
                      canonical_json(schema["fields"]) if schema.get("fields") else None, None, None, node.name)
        edge_ids: dict[tuple[str, str], int] = {}
        names = {n.name: n.node_id for n in self.graph.nodes}
        for edge in self.graph.edges:
            edge_id = edge_ids[(edge.from_node, edge.label)] = ctx.new_edge_id()
            rec.edges(edge_id, names[edge.from_node], names[edge.to_node], edge.label, edge.mode, started)
        return edge_ids

    def _grade(self) -> str:
        kinds = {n.determinism for n in self.graph.nodes if n.node_type not in ("source", "sink")}
        return "full_reproducible" if kinds <= {"deterministic", "seeded"} else "replay_reproducible"

    def _finalize(self, ctx: EngineContext, outcome: RunOutcome) -> dict[str, int]:
        """Artifacts, operations and the final run revision; returns records per table."""
        rec, now = ctx.rec, ctx.now()
        for name, (artifact, first_state) in outcome.artifacts.items():
            node_id = self.graph.node(name).node_id
            uri = artifact.path.resolve().as_uri()
            rec.artifacts(ctx.new_artifact_id(), first_state, node_id, artifact.artifact_type, uri,
                          artifact.content_hash, artifact.size_bytes, None, now, artifact.rows)
            rec.operations(ctx.new_operation_id(), node_id, "sink_write", now, now, "completed", None, None, uri,
                           artifact.content_hash, None, None)
        stats = outcome.stats
        adopted = self._adopt_lost_segments(rec, outcome)
        _count_adopted(outcome, adopted)
        started, ended = stats.source_started or now, stats.source_ended or now
        rec.operations(ctx.new_operation_id(), self.graph.nodes[0].node_id, "source_load", started, ended,
                       "completed" if outcome.status == RunStatus.COMPLETED else "failed",
                       self.source.path.resolve().as_uri(), None, None, None, outcome.error, (ended - started) * 1000.0)
        records = {t: n + outcome.records.get(t, 0) + adopted.records.get(t, 0)
                   for t, n in rec.pending_counts().items()}
        counts = {"rows": stats.rows, "quarantined": stats.quarantined,
                  "outcomes": dict(sorted(outcome.outcome_counts.items())), "coalesce": stats.coalesce,
                  "records": records, "workers": self.workers}
        final = {**self._run_row, "status": outcome.status, "revision": 1, "counts_json": orjson.dumps(counts).decode(),
                 "error_message": outcome.error}
        self.merkle_root = self._seal_trail(rec, final)
        rec.runs(completed_at=ctx.now(), merkle_root=self.merkle_root, **final)
        rec.close()
        return records

    def _adopt_lost_segments(self, rec: Recorder, outcome: RunOutcome) -> Adopted:
        """Digest what the workers that died left on disk, so the run's root and counts cover it."""
        if not outcome.lost_workers or not isinstance(rec.writer, ParquetSegmentWriter):
            return Adopted()
        listed = {(d.table_name, d.part_file) for d in self.store.segment_digests(self.run_id)}
        return rec.writer.adopt(self.run_id, [f"w{i}-" for i in outcome.lost_workers], listed)

    def _seal_trail(self, rec: Recorder, final: dict[str, Any]) -> str | None:
        """Write every record but the final run revision, then compute the run's Merkle root (over that row too)."""
        rec.drain()
        if not isinstance(rec.writer, ParquetSegmentWriter):
            return None
        rec.writer.write_digests(self.run_id)
        return run_root(self.store.segment_digests(self.run_id), (self.run_id, final))


def _count_adopted(outcome: RunOutcome, adopted: Adopted) -> None:
    """Add the rows, outcomes and decisions in dead workers' segments to the run's counts."""
    stats = outcome.stats
    stats.rows += adopted.records.get("rows", 0)
    for name, n in adopted.outcomes.items():
        outcome.outcome_counts[name] = outcome.outcome_counts.get(name, 0) + n
    for coalesce, events in adopted.decisions.items():
        decided = stats.coalesce.setdefault(coalesce, {"merged": 0, "failed": 0, "late_arrivals": 0})
        for event_type, n in events.items():
            key = "late_arrivals" if event_type == CoalesceEventType.LATE_ARRIVAL else event_type
            decided[key] = decided.get(key, 0) + n


def abandon_in_flight(ctx: EngineContext, error: str, reason: str = "run_failed") -> None:
    """A stopped run ends its tokens in flight as failed; if the trail itself is what failed, it cannot say more.

    A Ctrl-C meanwhile stops the ending (the tokens left keep no outcome), never the closing of sinks and trail.
    """
    with suppress(Exception, KeyboardInterrupt):
        ctx.abandon(error, reason)


class InterruptBetweenRows:
    """Within it (in the main thread), a first Ctrl-C asks the run to stop before its next source row.

    A KeyboardInterrupt lands anywhere, even between two records of one node visit; a request taken
    between rows lets the run end every token in flight with its outcome. A second Ctrl-C interrupts at
    once, for a run stuck inside a plugin.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> InterruptBetweenRows:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def should_stop(self) -> RunStopped | None:
        return RunStopped(INTERRUPTED_BY_USER, interrupted=True) if self.requested else None


def check_run_id(run_id: str) -> None:
    """A run id must be usable as a folder name and as a value: letters, digits, '.', '_', '-'; not 'latest'."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id) or run_id == "latest":
        raise ConfigError([f"run_id: must start with an ASCII letter or digit and contain only ASCII letters, digits, "
                           f"'.', '_' and '-' (at most 128 characters), and not be 'latest' (got {run_id!r})"])


def check_writable(path: Path, where: str, *, create: bool = True) -> None:
    """Fail before the run starts if a sink cannot write ``path``; ``create`` makes its folder once it can."""
    if path.is_dir():
        raise InputError(f"{where}: {path} is a directory; a sink writes a file")
    existing = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InputError(f"{where}: cannot create the folder for {path}: {existing} is a file")
    if (existing is not None and not os.access(existing, os.W_OK)) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{where}: {path} is not writable")
    if not create:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{where}: cannot create the folder for {path}: {exc.strerror or exc}") from exc
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{where}: {path} is not writable")
