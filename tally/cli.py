"""The `tally` command. Errors are one line on stderr and exit code 2, never a traceback.

Each package registers its own subcommands (`<package>/cli.py: register(subparsers)`), so
the command grows with the packages without one file knowing them all.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from schemas.errors import TallyError
from tally.settings import Settings, read_env_file, state_dir


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"tally: error: {message}\n")


Subparsers = Any  # argparse's _SubParsersAction, which typeshed keeps private


def add_group(sub: Subparsers, name: str, help_text: str) -> Subparsers:
    """A command with its own subcommands (`tally <name> <action>`)."""
    return sub.add_parser(name, help=help_text).add_subparsers(
        dest="action", required=True, parser_class=_Parser)


class Service(Protocol):
    async def run(self) -> None: ...
    def stop(self) -> None: ...


def run_until_signalled(make: Callable[[], Service]) -> None:
    """Run a service until SIGTERM/SIGINT; it finishes its current batch, then returns."""

    async def main() -> None:
        service = make()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        await service.run()

    asyncio.run(main())


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
    for name, key in (("kafka", "KAFKA_BOOTSTRAP_SERVERS"), ("postgres", "DATABASE_URL")):
        print(f"{name:<9} {recorded.get(key)}  {'up' if running[name] else 'DOWN'}")
    return 0 if all(running.values()) else 1


def _demo(args: argparse.Namespace) -> int:
    from tally.demo import run_demo

    return run_demo(tenants=args.tenants, events=args.events)


def build_parser() -> argparse.ArgumentParser:
    from billing_jobs import cli as billing_cli
    from producers import cli as producers_cli
    from projections import cli as projections_cli
    from streams import cli as streams_cli

    parser = _Parser(prog="tally", description="Tally: usage metering on Kafka")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    dev = add_group(sub, "dev", "the embedded dev stack (Tansu + Postgres)")
    dev.add_parser("up", help="start it; addresses go to .tally/dev.env").set_defaults(
        func=_dev_up)
    dev.add_parser("down", help="stop it").set_defaults(func=_dev_down)
    dev.add_parser("status", help="what runs where").set_defaults(func=_dev_status)

    producers_cli.register(sub)
    streams_cli.register(sub)
    projections_cli.register(sub)
    billing_cli.register(sub)

    demo = sub.add_parser("demo", help="run the whole pipeline on synthetic traffic")
    demo.add_argument("--tenants", type=int, default=8)
    demo.add_argument("--events", type=int, default=60000)
    demo.set_defaults(func=_demo)
    return parser


def settings() -> Settings:
    """The settings every command uses (environment over .tally/dev.env)."""
    return Settings.load()


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
