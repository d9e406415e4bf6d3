"""`tally ingest serve`: the HTTP ingest gateway."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from runtime.commands import Subparsers, add_group, settings
from runtime.settings import SettingsError
from schemas.codec import loads


def _read_tokens(path: Path) -> dict[str, str]:
    try:
        tokens = loads(path.read_bytes())
    except FileNotFoundError as e:
        raise SettingsError(f"{path}: no such file") from e
    except ValueError as e:
        raise SettingsError(f"{path}: not JSON: {e}") from e
    if not isinstance(tokens, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tokens.items()
    ):
        raise SettingsError(f'{path}: expected {{"<token>": "<service name>", ...}}')
    return tokens


def _serve(args: argparse.Namespace) -> int:
    from producers.gateway import serve

    tokens = _read_tokens(Path(args.tokens))
    asyncio.run(serve(settings(), args.host, args.port, tokens,
                      max_body_bytes=args.max_body_bytes))
    return 0


def register(sub: Subparsers) -> None:
    ingest = add_group(sub, "ingest", "the HTTP ingest gateway")
    serve = ingest.add_parser("serve", help="accept CloudEvents over HTTP (POST /v1/events)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--tokens", required=True,
                       help='JSON file {"<bearer token>": "<service name>"}')
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20)
    serve.set_defaults(func=_serve)
