"""`tally api serve` and `tally report`."""

from __future__ import annotations

import argparse

from runtime.commands import Subparsers, add_group, iso_time, port_number, settings


def _serve(args: argparse.Namespace) -> int:
    from api.server import serve

    s = settings()
    s.require_database()
    s.require_kafka()
    serve(s, args.host or s.api_host, args.port)
    return 0


def _report(args: argparse.Namespace) -> int:
    from api.report import run_report

    return run_report(settings(), tenant=args.tenant, cycle=args.cycle, fmt=args.format)


def register(sub: Subparsers) -> None:
    api = add_group(sub, "api", "the usage and billing HTTP API")
    serve = api.add_parser("serve", help="serve the API (OpenAPI document: /openapi.json)")
    serve.add_argument("--host", default=None,
                       help="address to listen on (default: $TALLY_API_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=port_number, default=8090)
    serve.set_defaults(func=_serve)

    report = sub.add_parser("report", help="usage against limits, quota states, recent "
                            "invoices and pipeline lag, per tenant")
    report.add_argument("--tenant", help="only this tenant")
    report.add_argument("--cycle", type=iso_time, default=None,
                        help="the cycle containing this ISO time (default: now)")
    report.add_argument("--format", choices=["table", "json", "csv"], default="table")
    report.add_argument("--json", dest="format", action="store_const", const="json",
                        help="the same as --format json")
    report.set_defaults(func=_report)
