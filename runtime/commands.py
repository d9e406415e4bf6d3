"""Command plumbing every stage uses to expose its `tally` subcommands.

A stage's `cli.py` has `register(subparsers)`; the roof (`tally.cli`) assembles them. Errors
are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from runtime.settings import Settings, SettingsError


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"tally: error: {message}\n")


Subparsers = Any  # argparse's _SubParsersAction, which typeshed keeps private


def add_group(sub: Subparsers, name: str, help_text: str) -> Subparsers:
    """A command with its own subcommands (`tally <name> <action>`)."""
    return sub.add_parser(name, help=help_text).add_subparsers(
        dest="action", required=True, parser_class=Parser)


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


def settings() -> Settings:
    """The settings every command uses (environment over .tally/dev.env)."""
    return Settings.load()


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """`--json` for a listing command: the same rows as a JSON array."""
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def print_json(rows: list[dict[str, Any]]) -> None:
    """Rows of a listing as one JSON array (decimals as strings, times in RFC 3339)."""
    from schemas.codec import dumps

    print(dumps(rows).decode())


def iso_time(text: str) -> datetime:
    """An argparse `type` for `--now` and the like: an ISO 8601 time (UTC when it names no
    zone), or a one-line usage error that shows the form expected."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time: write it like 2026-11-21T10:00:00Z "
            "or 2026-11-21") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def positive_int(text: str) -> int:
    """An argparse `type` for counts and limits: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def port_number(text: str) -> int:
    """An argparse `type` for ports: 0 (any free port, where allowed) to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return value


_MIGRATE = "the database has no Tally tables yet: run `tally db migrate` first"
_START = "start the dev stack with `tally dev up`, or point {var} at a running server"


def explain(error: BaseException) -> str | None:
    """One line telling a user what to do about a driver error their setup caused (no
    broker or database there, a database not migrated); None for anything else.

    The drivers are looked up only when already imported: a command that never loaded
    psycopg cannot have raised one of its errors, and the client install has no psycopg.
    """
    if "aiokafka" in sys.modules:
        from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

        if isinstance(error, KafkaConnectionError | KafkaTimeoutError):
            return (f"cannot reach Kafka at {_setting('kafka_bootstrap_servers')}: "
                    + _START.format(var="KAFKA_BOOTSTRAP_SERVERS"))
    if "psycopg" in sys.modules:
        import psycopg

        if isinstance(error, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName
                      | psycopg.errors.UndefinedFunction | psycopg.errors.UndefinedColumn):
            return f"{_MIGRATE} ({first_line(str(error))})"
        if isinstance(error, psycopg.OperationalError):
            return (f"cannot reach Postgres ({first_line(str(error))}): "
                    + _START.format(var="DATABASE_URL"))
    if "psycopg_pool" in sys.modules:
        from psycopg_pool import PoolTimeout

        if isinstance(error, PoolTimeout):
            return "cannot reach Postgres in time: " + _START.format(var="DATABASE_URL")
    return None


def first_line(text: str) -> str:
    """The first non-blank line of a driver's message (theirs run over several)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _setting(name: str) -> str:
    try:
        return str(getattr(Settings.load(), name) or "(not set)")
    except SettingsError:
        return "(invalid settings)"
