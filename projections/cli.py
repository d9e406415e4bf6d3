"""`tally project` and `tally db ...`."""

from __future__ import annotations

import argparse
import asyncio

from tally.cli import Subparsers, add_group, run_until_signalled, settings


def _project(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from projections.projector import Projector
    from tally import kafka

    s = settings()
    s.require_database()
    asyncio.run(kafka.ensure_topics(s))
    start_http_server(args.metrics_port, addr="127.0.0.1")
    run_until_signalled(lambda: Projector(s))
    return 0


def _db_migrate(args: argparse.Namespace) -> int:
    from projections.migrations import migrate

    applied = migrate(settings().require_database())
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


def register(sub: Subparsers) -> None:
    project = sub.add_parser("project", help="run the projector into Postgres")
    project.add_argument("--metrics-port", type=int, default=9466)
    project.set_defaults(func=_project)

    db = add_group(sub, "db", "the Postgres schema")
    db.add_parser("migrate", help="apply pending migrations").set_defaults(func=_db_migrate)
