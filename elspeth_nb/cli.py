"""The ``elspeth-nb`` command line: run, demo, report, check, verify, import, rebuild, sync.

Each verb is a small function; errors we raise on purpose print as one clear message and exit 2, an
interrupt (Ctrl-C) one line and exit 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from elspeth_nb.errors import Error, InputError

DEMO_PIPELINE = Path("data/demo/pipeline.yaml")


def _run(args: argparse.Namespace) -> int:
    from elspeth_nb.engine.runner import RunFailedError, run_pipeline

    try:
        result = run_pipeline(args.pipeline, audit=args.audit, payloads=args.payloads)
    except RunFailedError as failed:
        print(failed.result)
        return 1
    print(result)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from elspeth_nb.engine.runner import RunFailedError, run_pipeline

    pipeline = Path(args.pipeline)
    if not pipeline.exists():
        hint = "; run `make demo` from the repository root" if pipeline == DEMO_PIPELINE else ""
        raise InputError(f"demo pipeline {pipeline} does not exist{hint}")
    try:
        result, status = run_pipeline(pipeline, audit=args.audit), 0
    except RunFailedError as failed:  # the run and its trail exist: report them, exit 1 as `run` does
        result, status = failed.result, 1
    print(result)
    print(f"\nAudit store: {Path(result.audit_path).resolve()}")
    if args.no_report:
        return status
    report = _write_report(result.audit_path, result.run_id, Path(args.report))
    print(f"Audit report: {report.resolve()}")
    return status


def _write_report(audit: str | Path, run_id: str, output: str | Path, payloads: str | None = None) -> Path:
    from elspeth_nb.report import render_report

    return render_report(audit, run_id=run_id, output=output, payloads=payloads)


def _report(args: argparse.Namespace) -> int:
    path = _write_report(args.audit, args.run, args.output, args.payloads)
    print(f"wrote {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from elspeth_nb.analysis.audit import open_audit

    audit = open_audit(args.audit, mark_interrupted=True)
    result = audit.check(args.run)
    print(result)
    return 0 if result.ok else 1


def _verify(args: argparse.Namespace) -> int:
    from elspeth_nb.analysis.audit import open_audit

    audit = open_audit(args.audit)
    result = audit.verify(args.run, expected_root=args.root)
    print(result)
    orphans = audit.orphaned_runs
    for run_id, tables in orphans.items():
        print(f"run {run_id} has records in {', '.join(tables)} but no runs row: its runs partition was removed "
              "(tampered with?)", file=sys.stderr)
    return 0 if result.ok and not orphans else 1


def _import(args: argparse.Namespace) -> int:
    from elspeth_nb.audit.importers.elspeth import import_into_store

    when: dict[str, bool | str] = {"now": True, "background": "background", "later": False}
    report = import_into_store(args.database, args.audit, payloads=args.payloads,
                               run_ids=[args.run] if args.run else None, sync_duckdb=when[args.duckdb])
    print(report)
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    from elspeth_nb.audit.store import AuditStore

    result = AuditStore.open(args.audit).rebuild_duckdb()
    print(f"rebuilt {Path(args.audit) / 'audit.duckdb'} from Parquet: {len(result.synced)} run(s) "
          f"in {result.seconds:.2f}s")
    if result.message:
        print(result.message)
    return 0 if result.ok else 1


def _sync(args: argparse.Namespace) -> int:
    from elspeth_nb.audit.store import AuditStore

    result = AuditStore.open(args.audit).sync_duckdb([])
    print(result.message or f"audit.duckdb up to date: {len(result.synced)} run(s) in {result.seconds:.2f}s")
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elspeth-nb", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, handler: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_, description=help_)
        sub.set_defaults(handler=handler)
        return sub

    run = verb("run", _run, "run a pipeline and write its audit trail")
    run.add_argument("pipeline")
    run.add_argument("--audit", help="audit store folder (default: the pipeline's audit.path)")
    run.add_argument("--payloads", choices=["all", "boundaries", "hashes"])

    demo = verb("demo", _demo, "run the demo pipeline and write its audit report")
    demo.add_argument("--pipeline", default=str(DEMO_PIPELINE))
    demo.add_argument("--audit", default="data/demo/audit")
    demo.add_argument("--report", default="data/demo/report.html")
    demo.add_argument("--no-report", action="store_true")

    report = verb("report", _report, "render the audit report of one run to a static HTML file")
    report.add_argument("--audit", default="audit", help="audit store folder, its audit.duckdb or an ELSPETH .db "
                        "(default: ./audit)")
    report.add_argument("--run", default="latest")
    report.add_argument("-o", "--output", default="report.html")
    report.add_argument("--payloads", help="ELSPETH payload store folder, when --audit is a Landscape .db")

    check = verb("check", _check, "check the audit invariants of a run (and flag interrupted runs)")
    check.add_argument("--audit", default="audit", help="audit store folder (default: ./audit)")
    check.add_argument("--run", default="latest")

    verify = verb("verify", _verify, "recompute a run's hashes and Merkle root")
    verify.add_argument("--audit", default="audit", help="audit store folder (default: ./audit)")
    verify.add_argument("--run", default="latest")
    verify.add_argument("--root", help="a Merkle root saved earlier, to prove the run is unchanged")

    imp = verb("import", _import, "import an ELSPETH Landscape SQLite database into an audit store")
    imp.add_argument("database")
    imp.add_argument("--payloads", help="ELSPETH payload store folder")
    imp.add_argument("--audit", default="audit", help="audit store folder to import into (default: ./audit)")
    imp.add_argument("--run", help="only this run id")
    imp.add_argument("--duckdb", choices=("now", "background", "later"), default="now",
                     help="when audit.duckdb gets the runs: before returning (default), in a background "
                          "process, or at the next `elspeth-nb sync`")

    rebuild = verb("rebuild", _rebuild, "recreate audit.duckdb from the Parquet segments")
    rebuild.add_argument("--audit", default="audit", help="audit store folder (default: ./audit)")

    sync = verb("sync", _sync, "copy runs still pending into audit.duckdb")
    sync.add_argument("--audit", default="audit", help="audit store folder (default: ./audit)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except Error as exc:
        print(f"elspeth-nb {args.verb}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a run records itself interrupted before this reaches us
        print(f"elspeth-nb {args.verb}: interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `elspeth-nb ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
