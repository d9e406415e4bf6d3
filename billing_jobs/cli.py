"""`tally jobs ...` (push-usage, invoice, reconcile, schedule, journal), `tally invoices
list/show` and `tally coupons ...` (`billing_cli.py`) and `tally stripe ...` (sync-catalog,
webhooks serve). Every job is one pass, resumable and safe to run twice; exit 0 when it did
everything, 1 when something failed (the journal says what), 2 on a setup error."""

from __future__ import annotations

import argparse
import dataclasses
import signal
from datetime import datetime, timedelta
from types import FrameType

from billing_jobs.billing_cli import register_billing
from runtime.commands import (
    Subparsers,
    add_group,
    add_json_flag,
    iso_time,
    port_number,
    positive_int,
    print_json,
    settings,
)


def _now(args: argparse.Namespace) -> datetime | None:
    now: datetime | None = getattr(args, "now", None)
    return now


def _push_usage(args: argparse.Namespace) -> int:
    from billing_jobs.push_usage import run_push_usage

    result = run_push_usage(settings(), _now(args), high_volume=args.high_volume,
                            create_missing=not args.no_create)
    print(result.summary())
    return 0 if not result.failed else 1


def _invoice(args: argparse.Namespace) -> int:
    from billing_jobs.invoice_run import parse_now, run_invoices

    now = args.now or parse_now(None)  # a bad --now was a usage error (iso_time)
    result = run_invoices(settings(), now, create_missing=not args.no_create)
    print(result.summary())
    return 0 if not result.failed and not result.skipped else 1


def _reconcile(args: argparse.Namespace) -> int:
    from billing_jobs.reconcile import run_reconcile

    result = run_reconcile(settings(), _now(args))
    print(result.summary())
    return 0 if not result.mismatches else 1


def _sync_catalog(args: argparse.Namespace) -> int:
    from billing_jobs.push_usage import load_catalog
    from billing_jobs.stripe_catalog import sync_catalog

    s = settings()
    result = sync_catalog(s, load_catalog(s))
    print(result.summary())
    return 0 if not result.failed else 1


def _journal(args: argparse.Namespace) -> int:
    from billing_jobs.journal import entries
    from runtime.postgres import connect

    statuses = ["failed", "pending"] if not args.all else [
        "failed", "pending", "succeeded", "replaced"]
    with connect(settings().require_database()) as conn:
        rows = entries(conn, statuses, args.limit)
    if args.json:
        print_json([dataclasses.asdict(e) for e in rows])
    for e in rows if not args.json else ():
        print(f"{e.updated_at:%Y-%m-%d %H:%M:%S} {e.status:<9} {e.kind:<16} {e.tenant_id:<20}"
              f" {e.idempotency_key} (attempts {e.attempts}) {e.detail}")
    return 1 if any(e.status == "failed" for e in rows) else 0


def _schedule(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from billing_jobs.invoice_run import parse_now, run_invoices
    from billing_jobs.push_usage import load_catalog, run_push_usage
    from billing_jobs.reconcile import run_reconcile
    from billing_jobs.scheduler import Job, Scheduler
    from billing_jobs.stripe_catalog import sync_catalog

    s = settings()
    minutes = timedelta(minutes=1)
    jobs = [
        Job("sync-catalog", args.catalog_every * minutes,
            lambda: not sync_catalog(s, load_catalog(s)).failed),
        Job("push-usage", args.push_every * minutes,
            lambda: not run_push_usage(s, high_volume=args.high_volume).failed),
        Job("invoice", args.invoice_every * minutes,
            lambda: not run_invoices(s, parse_now(None)).failed),
        Job("reconcile", args.reconcile_every * minutes,
            lambda: not run_reconcile(s).mismatches),
    ]
    scheduler = Scheduler(s.require_database(), jobs)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        scheduler.stop()  # the job under way finishes; jobs are resumable anyway

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=s.scheduler_metrics_host)
    scheduler.run(once=args.once)
    return 0


def _webhooks_serve(args: argparse.Namespace) -> int:
    import asyncio

    from billing_jobs.webhooks import serve

    asyncio.run(serve(settings(), args.port, args.host))
    return 0


def register(sub: Subparsers) -> None:
    jobs = add_group(sub, "jobs", "billing jobs")
    push = jobs.add_parser("push-usage", help="send period usage to Stripe as meter events")
    push.add_argument("--high-volume", action="store_true",
                      help="use the v2 meter event stream (batches of 100)")
    invoice = jobs.add_parser("invoice", help="issue every invoice due (docs/billing.md) and "
                              "send it to Stripe")
    reconcile = jobs.add_parser("reconcile", help="compare Tally's totals with Stripe's; "
                                "exit 1 on any mismatch")
    for p in (push, invoice, reconcile):
        p.add_argument("--now", type=iso_time, help="ISO time to act as of (default: now)")
    for p in (push, invoice):
        p.add_argument("--no-create", action="store_true",
                       help="never create Stripe customers or meters on demand")
    push.set_defaults(func=_push_usage)
    invoice.set_defaults(func=_invoice)
    reconcile.set_defaults(func=_reconcile)

    journal = jobs.add_parser("journal", help="the Stripe calls that failed or are pending"
                              " (meter events Stripe rejected later included)")
    journal.add_argument("--all", action="store_true", help="succeeded and replaced calls too")
    journal.add_argument("--limit", type=positive_int, default=50)
    add_json_flag(journal)
    journal.set_defaults(func=_journal)

    schedule = jobs.add_parser("schedule", help="run the jobs on their intervals")
    schedule.add_argument("--metrics-port", type=port_number, default=0)
    schedule.add_argument("--catalog-every", type=float, default=60, metavar="MINUTES")
    schedule.add_argument("--push-every", type=float, default=5, metavar="MINUTES")
    schedule.add_argument("--invoice-every", type=float, default=60, metavar="MINUTES")
    schedule.add_argument("--reconcile-every", type=float, default=60, metavar="MINUTES")
    schedule.add_argument("--high-volume", action="store_true")
    schedule.add_argument("--once", action="store_true", help="run each job once, then exit")
    schedule.set_defaults(func=_schedule)

    register_billing(sub)

    stripe_group = add_group(sub, "stripe", "Stripe catalog and webhooks")
    stripe_group.add_parser("sync-catalog", help="create Stripe meters and prices for the "
                            "catalog").set_defaults(func=_sync_catalog)
    webhooks = add_group(stripe_group, "webhooks", "the Stripe webhook receiver")
    serve = webhooks.add_parser("serve", help="serve POST /stripe/webhook "
                                "(secret: STRIPE_WEBHOOK_SECRET)")
    serve.add_argument("--port", type=port_number, default=8088)
    serve.add_argument("--host", default=None,
                       help="address to listen on (default: $TALLY_WEBHOOKS_HOST, 127.0.0.1)")
    serve.set_defaults(func=_webhooks_serve)
