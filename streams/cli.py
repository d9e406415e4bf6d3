"""`tally worker`, `tally notify serve|channels|dead-letters` and `tally plans publish`."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from runtime.commands import (
    Subparsers,
    add_group,
    add_json_flag,
    port_number,
    positive_int,
    print_json,
    settings,
)
from runtime.settings import Settings, SettingsError


def _worker(args: argparse.Namespace) -> int:
    from streams.app import run_worker

    s = settings()
    if not asyncio.run(_wait_for_broker(s)):
        return 0  # stopped (SIGTERM) while waiting
    run_worker(s, args.web_port, args.loglevel)
    return 0


async def _wait_for_broker(s: Settings) -> bool:
    """Create the topics and restore a lost catalog, waiting with backoff for a broker that
    is not reachable yet: the worker is a service, started perhaps before its broker.
    False when stopped by a signal meanwhile."""
    import logging
    import signal

    from aiokafka.errors import KafkaError

    from runtime import kafka
    from runtime.backoff import Backoff, first_line
    from runtime.plans import restore_catalog

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    backoff = Backoff()
    try:
        while True:
            try:
                await kafka.ensure_topics(s)
                await restore_catalog(s)  # the broker lost tally.plans: its Postgres copy
                return True
            except (kafka.KafkaUnavailable, KafkaError, OSError) as e:
                delay = backoff.next_delay()
                logging.getLogger("streams.worker").warning(
                    "the worker waits for the broker at %s (%s); retrying in %.1fs",
                    s.kafka_bootstrap_servers, first_line(e), delay)
                if not await backoff.sleep(stopping, delay):
                    return False
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _plans_publish(args: argparse.Namespace) -> int:
    from runtime.plans import publish_file

    count = asyncio.run(publish_file(settings(), Path(args.file)))
    print(f"published {count} catalog records from {args.file}")
    return 0


def _notify_serve(args: argparse.Namespace) -> int:
    from runtime.commands import run_until_signalled
    from streams.notifier import Channels, NotifierOptions, NotifierService

    secret = ""
    if args.webhook_url:
        secret = args.secret or os.environ.get("TALLY_WEBHOOK_SECRET", "")
        if not secret:
            raise SettingsError("no webhook secret: pass --secret or set TALLY_WEBHOOK_SECRET")
    s = settings()
    channels: Channels | None = None
    if s.database_url and not args.no_channels:
        from streams.channels.delivery import ChannelDelivery, ChannelOptions

        channels = ChannelDelivery(s, ChannelOptions(max_attempts=args.channel_max_attempts))
    if not args.webhook_url and channels is None:
        raise SettingsError("nothing to deliver to: pass --webhook-url, or set DATABASE_URL "
                            "for the tenants' channels (`tally notify channels add`)")
    options = NotifierOptions(args.webhook_url or "", secret, max_attempts=args.max_attempts)
    run_until_signalled(lambda: NotifierService(s, options, args.web_port, channels))
    return 0


def _channels_add(args: argparse.Namespace) -> int:
    from runtime.postgres import connect
    from streams.channels.store import add_channel

    with connect(settings().require_database()) as conn:
        channel, created = add_channel(conn, args.tenant, args.kind, args.target,
                                       enabled=not args.disabled)
    state = "" if channel.enabled else " (disabled)"
    if not created:
        print(f"channel {channel.channel_id} exists: {channel.tenant_id} {channel.kind} "
              f"{channel.shown()}{state}")
        return 0
    print(f"added channel {channel.channel_id}: {channel.tenant_id} {channel.kind} "
          f"{channel.shown()}{state}")
    if channel.signing_secret:
        print(f"signing secret (shown once; the receiver verifies X-Tally-Signature with it): "
              f"{channel.signing_secret}")
    return 0


def _channels_list(args: argparse.Namespace) -> int:
    from runtime.postgres import connect
    from streams.channels.store import list_channels

    with connect(settings().require_database()) as conn:
        channels = list_channels(conn, args.tenant)
    if args.json:  # never the signing secret: it is shown once, when the channel is added
        print_json([{"channel_id": c.channel_id, "tenant_id": c.tenant_id, "kind": c.kind,
                     "enabled": c.enabled, "target": c.shown()} for c in channels])
    for c in channels if not args.json else ():
        print(f"{c.channel_id:>6}  {c.tenant_id:<20} {c.kind:<8} "
              f"{'enabled ' if c.enabled else 'disabled'} {c.shown()}")
    return 0


def _channels_remove(args: argparse.Namespace) -> int:
    from runtime.postgres import connect
    from streams.channels.store import remove_channel

    with connect(settings().require_database()) as conn:
        c = remove_channel(conn, args.channel_id)
    print(f"removed channel {c.channel_id}: {c.tenant_id} {c.kind} {c.shown()}")
    return 0


def _channels_enable(args: argparse.Namespace) -> int:
    from runtime.postgres import connect
    from streams.channels.store import set_enabled

    enabled = args.action == "enable"
    with connect(settings().require_database()) as conn:
        c = set_enabled(conn, args.channel_id, enabled)
    print(f"{'enabled' if enabled else 'disabled'} channel {c.channel_id}: {c.tenant_id} "
          f"{c.kind} {c.shown()}")
    return 0


def _dead_letters(args: argparse.Namespace) -> int:
    from runtime.postgres import connect
    from streams.channels.store import dead_letters

    with connect(settings().require_database()) as conn:
        rows = dead_letters(conn, args.tenant, args.limit)
    if args.json:
        print_json([{"failed_at": d.failed_at, "tenant_id": d.tenant_id, "kind": d.kind,
                     "channel_id": d.channel_id, "notification_key": d.notification_key,
                     "reason": d.reason, "attempts": d.attempts, "last_error": d.last_error}
                    for d in rows])
    for d in rows if not args.json else ():
        print(f"{d.failed_at:%Y-%m-%d %H:%M:%S} {d.tenant_id:<20} {d.kind:<8} channel "
              f"{d.channel_id} {d.notification_key} {d.reason} after {d.attempts} attempts: "
              f"{d.last_error}")
    return 1 if rows else 0


def register(sub: Subparsers) -> None:
    worker = sub.add_parser("worker", help="run the stream processor (Faust)")
    worker.add_argument("--web-port", type=port_number, default=6066,
                        help="port of /metrics, /healthz, /quota (default 6066)")
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=_worker)

    notify = add_group(sub, "notify", "deliver threshold notifications: tenants' channels "
                       "(e-mail, Slack, webhooks) and an operator webhook")
    serve = notify.add_parser("serve", help="deliver tally.notifications (at least once)")
    serve.add_argument("--webhook-url", help="the operator's Slack-compatible webhook, which "
                       "gets every notification (optional with DATABASE_URL)")
    serve.add_argument("--secret", help="HMAC key of X-Tally-Signature "
                       "(default: $TALLY_WEBHOOK_SECRET, which keeps it out of `ps`)")
    serve.add_argument("--max-attempts", type=positive_int, default=None,
                       help="give up on a notification after N attempts (default: never)")
    serve.add_argument("--web-port", type=port_number, default=6067,
                       help="port of /metrics and /healthz (default 6067; 0: none)")
    serve.add_argument("--channel-max-attempts", type=positive_int, default=8,
                       help="attempts at a tenant channel's delivery before it goes to the "
                       "dead letters (default 8, about 2 minutes)")
    serve.add_argument("--no-channels", action="store_true",
                       help="the operator webhook only, even with DATABASE_URL set")
    serve.set_defaults(func=_notify_serve)

    channels = add_group(notify, "channels", "where each tenant hears about its limits")
    add = channels.add_parser("add", help="add a channel (again: shows the existing one)")
    add.add_argument("tenant")
    add.add_argument("kind", choices=["email", "slack", "webhook"])
    add.add_argument("target", help="an e-mail address, or the https URL of a "
                     "Slack-compatible incoming webhook or of the tenant's webhook")
    add.add_argument("--disabled", action="store_true", help="add it disabled")
    add.set_defaults(func=_channels_add)
    listing = channels.add_parser("list", help="the channels (webhook URLs shortened)")
    listing.add_argument("--tenant")
    add_json_flag(listing)
    listing.set_defaults(func=_channels_list)
    for action, func, help_text in [
        ("remove", _channels_remove, "delete a channel and its delivery records"),
        ("enable", _channels_enable, "deliver to a channel again"),
        ("disable", _channels_enable, "stop delivering to a channel, keeping its records"),
    ]:
        p = channels.add_parser(action, help=help_text)
        p.add_argument("channel_id", type=int)
        p.set_defaults(func=func)
    dead = notify.add_parser("dead-letters", help="channel deliveries given up on, newest "
                             "first (exit 1 if any)")
    dead.add_argument("--tenant")
    dead.add_argument("--limit", type=positive_int, default=50)
    add_json_flag(dead)
    dead.set_defaults(func=_dead_letters)

    plans = add_group(sub, "plans", "the plan catalog")
    publish = plans.add_parser("publish", help="validate FILE and publish it to tally.plans")
    publish.add_argument("file")
    publish.set_defaults(func=_plans_publish)
