"""The `tally` command. Errors are one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from schemas.errors import TallyError
from tally.settings import Settings, read_env_file, state_dir


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"tally: error: {message}\n")


def _settings() -> Settings:
    return Settings.load()


def _dev_up(args: argparse.Namespace) -> int:
    from tally import devstack

    home = state_dir()
    env_file = home / "dev.env"
    recorded = read_env_file(env_file)
    if recorded and all(devstack.is_running(recorded).values()):
        print(f"dev stack already running: kafka {recorded['KAFKA_BOOTSTRAP_SERVERS']}, "
              f"postgres {recorded['DATABASE_URL']}")
        return 0
    stack = devstack.up(home)
    env_file.write_text("".join(f"{k}={v}\n" for k, v in stack.env().items()))
    print(f"kafka     {stack.kafka_bootstrap_servers}\npostgres  {stack.database_url}\n"
          f"settings written to {env_file}")
    return 0


def _dev_down(args: argparse.Namespace) -> int:
    from tally import devstack

    env_file = state_dir() / "dev.env"
    devstack.down(read_env_file(env_file))
    env_file.unlink(missing_ok=True)
    print("dev stack stopped")
    return 0


def _dev_status(args: argparse.Namespace) -> int:
    from tally import devstack

    recorded = read_env_file(state_dir() / "dev.env")
    if not recorded:
        print("dev stack: not started (run `tally dev up`)")
        return 1
    running = devstack.is_running(recorded)
    print(f"kafka     {recorded.get('KAFKA_BOOTSTRAP_SERVERS')}  "
          f"{'up' if running['kafka'] else 'DOWN'}")
    print(f"postgres  {recorded.get('DATABASE_URL')}  {'up' if running['postgres'] else 'DOWN'}")
    return 0 if all(running.values()) else 1


def _worker(args: argparse.Namespace) -> int:
    from streams.app import run_worker
    from tally import kafka

    settings = _settings()
    asyncio.run(kafka.ensure_topics(settings))
    run_worker(settings, args.web_port, args.loglevel)
    return 0


def _run_until_signalled(make: Callable[[], object]) -> None:
    """Run a service's `run()` until SIGTERM/SIGINT, then let it finish its batch."""

    async def main() -> None:
        service = make()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)  # type: ignore[attr-defined]
        await service.run()  # type: ignore[attr-defined]

    asyncio.run(main())


def _project(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from projections.projector import Projector
    from tally import kafka

    settings = _settings()
    settings.require_database()
    asyncio.run(kafka.ensure_topics(settings))
    start_http_server(args.metrics_port, addr="127.0.0.1")
    _run_until_signalled(lambda: Projector(settings))
    return 0


def _db_migrate(args: argparse.Namespace) -> int:
    from projections.migrations import migrate

    applied = migrate(_settings().require_database())
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


def _plans_publish(args: argparse.Namespace) -> int:
    from tally.plans_publish import publish_file

    count = asyncio.run(publish_file(_settings(), Path(args.file)))
    print(f"published {count} catalog records from {args.file}")
    return 0


def _push_usage(args: argparse.Namespace) -> int:
    from billing_jobs.push_usage import run_push_usage

    result = run_push_usage(_settings())
    print(result.summary())
    return 0 if not result.failed else 1


def _demo(args: argparse.Namespace) -> int:
    from tally.demo import run_demo

    return run_demo(tenants=args.tenants, events=args.events)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tally", description="Tally: usage metering on Kafka")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    dev = sub.add_parser("dev", help="the embedded dev stack").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    dev.add_parser("up", help="start Tansu and Postgres").set_defaults(func=_dev_up)
    dev.add_parser("down", help="stop them").set_defaults(func=_dev_down)
    dev.add_parser("status", help="what runs where").set_defaults(func=_dev_status)

    worker = sub.add_parser("worker", help="run the stream processor (Faust)")
    worker.add_argument("--web-port", type=int, default=6066,
                        help="port of /metrics, /healthz (default 6066)")
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=_worker)

    project = sub.add_parser("project", help="run the projector into Postgres")
    project.add_argument("--metrics-port", type=int, default=9466)
    project.set_defaults(func=_project)

    db = sub.add_parser("db", help="database").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    db.add_parser("migrate", help="apply pending migrations").set_defaults(func=_db_migrate)

    plans = sub.add_parser("plans", help="the plan catalog").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    publish = plans.add_parser("publish", help="validate FILE and publish it to tally.plans")
    publish.add_argument("file")
    publish.set_defaults(func=_plans_publish)

    jobs = sub.add_parser("jobs", help="billing jobs").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    jobs.add_parser("push-usage", help="send period usage to Stripe as meter events"
                    ).set_defaults(func=_push_usage)

    demo = sub.add_parser("demo", help="run the whole pipeline on synthetic traffic")
    demo.add_argument("--tenants", type=int, default=8)
    demo.add_argument("--events", type=int, default=60000)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("TALLY_LOGLEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return int(args.func(args))
    except TallyError as e:
        print(f"tally: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
