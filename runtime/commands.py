"""Command plumbing every stage uses to expose its `tally` subcommands.

A stage's `cli.py` has `register(subparsers)`; the roof (`tally.cli`) assembles them. Errors
are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable
from typing import Any, Protocol

from runtime.settings import Settings


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
