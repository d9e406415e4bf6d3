"""`tally project`, `tally projections rebuild|checksum` and `tally db migrate`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from runtime.commands import (
    Subparsers,
    add_group,
    port_number,
    positive_int,
    run_until_signalled,
    settings,
)


def _project(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from projections.projector import Projector
    from runtime.gc_tuning import tune_gc

    s = settings()
    s.require_database()
    # No check of Postgres or the broker here: the projector is a service, it waits for
    # both (and creates the topics) once started.
    start_http_server(args.metrics_port, addr=s.projector_metrics_host)
    tune_gc()  # a batch's decoded events kept the default collector busy: ~30% of the CPU
    run_until_signalled(lambda: Projector(s, max_records=args.max_records,
                                          bounds_check_seconds=args.offsets_check_seconds))
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    from projections.rebuild import checksum, rebuild
    from runtime.postgres import connect

    s = settings()
    report = asyncio.run(rebuild(s, max_records=args.max_records,
                                 progress=lambda p: print(p.line(), file=sys.stderr,
                                                          flush=True)))
    print(f"rebuilt from offset 0: {report.records} records in {report.seconds:.1f}s;"
          " swapped into schema tally")
    with connect(s.require_database()) as conn:
        _print_checksums(checksum(conn))
    return 0


def _checksum(args: argparse.Namespace) -> int:
    from projections.rebuild import checksum
    from runtime.postgres import connect

    with connect(settings().require_database()) as conn:
        _print_checksums(checksum(conn))
    return 0


def _print_checksums(digests: dict[str, tuple[int, str]]) -> None:
    for table, (rows, digest) in digests.items():
        print(f"{table:<16} {rows:>12} {digest}")


def _db_migrate(args: argparse.Namespace) -> int:
    from runtime.postgres import migrate

    applied = migrate(settings().require_database())
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


def register(sub: Subparsers) -> None:
    project = sub.add_parser("project", help="run the projector into Postgres")
    project.add_argument("--metrics-port", type=port_number, default=9466)
    project.add_argument("--max-records", type=positive_int, default=20000,
                         help="Kafka records per transaction at most")
    project.add_argument("--offsets-check-seconds", type=float, default=30.0,
                         help="how often, while nothing arrives, the stored offsets are"
                              " checked against the log's bounds (docs/operations.md,"
                              " TallyOffsetsOutsideLog)")
    project.set_defaults(func=_project)

    projections = add_group(sub, "projections", "the Postgres read models")
    rebuild = projections.add_parser(
        "rebuild", help="rebuild the read models from offset 0 beside the live ones, then swap")
    rebuild.add_argument("--max-records", type=positive_int, default=1000,
                         help="Kafka records per transaction at most (smaller: steadier"
                              " progress, and decoding overlaps the writes)")
    rebuild.set_defaults(func=_rebuild)
    projections.add_parser(
        "checksum", help="a digest per finance-facing table (equal after a rebuild)"
    ).set_defaults(func=_checksum)

    db = add_group(sub, "db", "the Postgres schema")
    db.add_parser("migrate", help="apply pending migrations").set_defaults(func=_db_migrate)
