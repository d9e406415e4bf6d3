"""`tally worker` and `tally plans publish`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from tally.cli import Subparsers, add_group, settings


def _worker(args: argparse.Namespace) -> int:
    from streams.app import run_worker
    from tally import kafka

    s = settings()
    asyncio.run(kafka.ensure_topics(s))
    run_worker(s, args.web_port, args.loglevel)
    return 0


def _plans_publish(args: argparse.Namespace) -> int:
    from tally.plans_publish import publish_file

    count = asyncio.run(publish_file(settings(), Path(args.file)))
    print(f"published {count} catalog records from {args.file}")
    return 0


def register(sub: Subparsers) -> None:
    worker = sub.add_parser("worker", help="run the stream processor (Faust)")
    worker.add_argument("--web-port", type=int, default=6066,
                        help="port of /metrics, /healthz, /quota (default 6066)")
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=_worker)

    plans = add_group(sub, "plans", "the plan catalog")
    publish = plans.add_parser("publish", help="validate FILE and publish it to tally.plans")
    publish.add_argument("file")
    publish.set_defaults(func=_plans_publish)
