"""`tally ingest serve`: the HTTP ingest gateway."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from runtime.commands import Subparsers, add_group, port_number, positive_int, settings
from runtime.credentials import Tokens
from runtime.settings import SettingsError


def _serve(args: argparse.Namespace) -> int:
    from producers.gateway import serve

    s = settings()
    path = Path(args.tokens) if args.tokens else s.tokens_file
    if path is None:
        raise SettingsError("no tokens file: set TALLY_TOKENS_FILE or pass --tokens FILE "
                            "(README: Security)")
    tokens = Tokens.load(path)
    asyncio.run(serve(s, args.port, tokens, host=args.host,
                      max_body_bytes=args.max_body_bytes))
    return 0


def register(sub: Subparsers) -> None:
    ingest = add_group(sub, "ingest", "the HTTP ingest gateway")
    serve = ingest.add_parser("serve", help="accept CloudEvents over HTTP (POST /v1/events)")
    serve.add_argument("--host", default=None,
                       help="address to listen on (default: $TALLY_GATEWAY_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=port_number, default=8080)
    serve.add_argument("--tokens", default=None, metavar="FILE",
                       help='tokens file {"<token>": {"service": ..., "tenants": [...] | "*", '
                            '"scopes": [...]}} (default: $TALLY_TOKENS_FILE)')
    serve.add_argument("--max-body-bytes", type=positive_int, default=1 << 20)
    serve.set_defaults(func=_serve)
