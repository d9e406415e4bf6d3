"""`tally worker`, `tally notify serve` and `tally plans publish`."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from runtime.commands import Subparsers, add_group, settings
from runtime.settings import SettingsError


def _worker(args: argparse.Namespace) -> int:
    from runtime import kafka
    from streams.app import run_worker

    s = settings()
    asyncio.run(kafka.ensure_topics(s))
    run_worker(s, args.web_port, args.loglevel)
    return 0


def _plans_publish(args: argparse.Namespace) -> int:
    from runtime.plans import publish_file

    count = asyncio.run(publish_file(settings(), Path(args.file)))
    print(f"published {count} catalog records from {args.file}")
    return 0


def _notify_serve(args: argparse.Namespace) -> int:
    from runtime.commands import run_until_signalled
    from streams.notifier import NotifierOptions, NotifierService

    secret = args.secret or os.environ.get("TALLY_WEBHOOK_SECRET", "")
    if not secret:
        raise SettingsError("no webhook secret: pass --secret or set TALLY_WEBHOOK_SECRET")
    options = NotifierOptions(args.webhook_url, secret, max_attempts=args.max_attempts)
    run_until_signalled(lambda: NotifierService(settings(), options, args.web_port))
    return 0


def register(sub: Subparsers) -> None:
    worker = sub.add_parser("worker", help="run the stream processor (Faust)")
    worker.add_argument("--web-port", type=int, default=6066,
                        help="port of /metrics, /healthz, /quota (default 6066)")
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=_worker)

    notify = add_group(sub, "notify", "deliver threshold notifications to a webhook")
    serve = notify.add_parser("serve", help="deliver tally.notifications (at least once)")
    serve.add_argument("--webhook-url", required=True, help="Slack-compatible webhook URL")
    serve.add_argument("--secret", help="HMAC key of X-Tally-Signature "
                       "(default: $TALLY_WEBHOOK_SECRET, which keeps it out of `ps`)")
    serve.add_argument("--max-attempts", type=int, default=None,
                       help="give up on a notification after N attempts (default: never)")
    serve.add_argument("--web-port", type=int, default=6067,
                       help="port of /metrics and /healthz (default 6067; 0: none)")
    serve.set_defaults(func=_notify_serve)

    plans = add_group(sub, "plans", "the plan catalog")
    publish = plans.add_parser("publish", help="validate FILE and publish it to tally.plans")
    publish.add_argument("file")
    publish.set_defaults(func=_plans_publish)
