"""`ChannelDelivery`: a notification to each enabled channel of its tenant, once, with
retries and dead letters. The protocol, and what "once" means, is in
streams/channels/__init__.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass

import aiohttp
import psycopg
from prometheus_client import Counter, Histogram

from runtime.backoff import first_line
from runtime.postgres import DatabaseUnavailable, connect_async
from runtime.settings import Settings
from schemas.records import Notification
from streams.channels import store
from streams.channels.mail import MailSender
from streams.channels.model import Channel, Refused, Sender
from streams.channels.slack import SlackSender
from streams.channels.webhook import WebhookSender
from streams.errors import ChannelError
from streams.links import Links
from streams.notifier import backoff_delay, idempotency_key

log = logging.getLogger(__name__)

DELIVERED = Counter("tally_notifier_channel_delivered_total",
                    "Notifications a tenant's channel accepted", ["channel", "kind"])
RETRIED = Counter("tally_notifier_channel_retried_total",
                  "Channel delivery attempts that will be retried", ["channel", "cause"])
DEAD_LETTERS = Counter("tally_notifier_dead_letters_total",
                       "Channel deliveries given up on, recorded in "
                       "tally.notification_dead_letters", ["channel", "reason"])
DUPLICATES = Counter("tally_notifier_channel_duplicates_total",
                     "Channel deliveries skipped because the notification had been handled "
                     "for that channel before (a replay)", ["channel"])
DELIVERY_SECONDS = Histogram(
    "tally_notifier_channel_delivery_seconds",
    "From the first attempt at a channel delivery to the channel accepting it", ["channel"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600),
)


@dataclass(frozen=True)
class ChannelOptions:
    """How channel deliveries are retried. A delivery that fails `max_attempts` times goes
    to the dead letters; so does one refused for good at any attempt."""

    max_attempts: int = 8
    request_timeout: float = 10.0
    backoff_base: float = 0.5
    backoff_max: float = 60.0


class ChannelDelivery:
    """Delivers notifications to tenants' channels (the notifier's `channels`)."""

    def __init__(self, settings: Settings, options: ChannelOptions | None = None) -> None:
        self.settings = settings
        self.database_url = settings.require_database()
        self.options = options or ChannelOptions()
        self.delivered = 0  # channel deliveries this process made
        self.dead_letters = 0
        self.last_error: str | None = None
        self._http: aiohttp.ClientSession | None = None
        self._senders: dict[str, Sender] = {}
        self._rng = random.Random()
        self._links = Links("postgres")  # the notifier's, given to open()

    async def open(self, links: Links) -> None:
        """Check the tables are there, and start the HTTP client the senders share (inside
        the running loop). Postgres being down is not fatal: deliveries wait for it."""
        self._links = links
        try:
            async with await connect_async(self.database_url, autocommit=True) as conn:
                await store.enabled_channels(conn, "")
            links.up("postgres")
        except psycopg.errors.UndefinedTable as e:
            raise ChannelError("no table tally.notification_channels: run `tally db migrate` "
                               "(or pass --no-channels)") from e
        except (DatabaseUnavailable, psycopg.Error) as e:
            links.down("postgres", first_line(e))
        timeout = aiohttp.ClientTimeout(total=self.options.request_timeout)
        self._http = aiohttp.ClientSession(timeout=timeout)
        self._senders = {
            "email": MailSender(self.settings, self.options.request_timeout),
            "slack": SlackSender(self._http),
            "webhook": WebhookSender(self._http),
        }
        if not self.settings.smtp_host:
            log.warning("no mail server (TALLY_SMTP_HOST): e-mail channels get nothing, "
                        "their deliveries go to the dead letters")

    async def probe(self) -> None:
        """Whether Postgres answers, into the links (the notifier asks now and then)."""
        try:
            async with await connect_async(self.database_url, autocommit=True,
                                           connect_timeout=5) as conn:
                await conn.execute("SELECT 1")
            self._links.up("postgres")
        except (DatabaseUnavailable, psycopg.Error) as e:
            self._links.down("postgres", first_line(e))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def deliver(self, n: Notification, stopping: asyncio.Event) -> bool:
        """Deliver `n` to every enabled channel of its tenant (delivered or dead-lettered
        each); False when stopping before that, so the notification stays uncommitted."""
        channels = await self._channels(n, stopping)
        if channels is None:
            return False
        done = await asyncio.gather(*(self._deliver(n, c, stopping) for c in channels))
        return all(done)

    async def _channels(self, n: Notification, stopping: asyncio.Event) -> list[Channel] | None:
        """The tenant's enabled channels; Postgres errors are waited out (None if stopped)."""
        failures = 0
        while True:
            try:
                async with await connect_async(self.database_url, autocommit=True) as conn:
                    found = await store.enabled_channels(conn, n.tenant_id)
                self._links.up("postgres")
                return found
            except (DatabaseUnavailable, psycopg.Error) as e:
                self._links.down("postgres", first_line(e))
                failures += 1
                self.last_error = f"postgres: {e}"
                RETRIED.labels("all", "postgres").inc()
                log.warning("cannot read the channels of %s (%s); retrying", n.tenant_id, e)
                if not await self._wait(failures, None, stopping):
                    return None

    async def _deliver(self, n: Notification, channel: Channel, stopping: asyncio.Event) -> bool:
        """One channel: attempts in their own transactions until delivered or dead."""
        key = idempotency_key(n)
        sender = self._senders[channel.kind]
        started = time.perf_counter()
        attempts = 0  # sends made
        waits = 0
        while True:
            outcome: str
            refused: Refused | None = None
            try:
                async with (await connect_async(self.database_url, autocommit=True) as conn,
                            conn.transaction()):
                    if not await store.claim(conn, key, channel.channel_id):
                        DUPLICATES.labels(channel.kind).inc()
                        return True
                    attempts += 1
                    refused = await sender.send(channel, n, attempts)
                    if refused is None:
                        await store.record_delivery(conn, key, channel.channel_id, attempts)
                        outcome = "delivered"
                    elif refused.permanent or attempts >= self.options.max_attempts:
                        reason = "refused" if refused.permanent else "attempts_exhausted"
                        await store.record_dead_letter(conn, key, channel, n, reason, attempts,
                                                       refused.cause)
                        outcome = reason
                    else:
                        outcome = "retry"
                self._links.up("postgres")
            except (DatabaseUnavailable, psycopg.Error) as e:
                self._links.down("postgres", first_line(e))
                # Nothing recorded: the next attempt checks again (and sends again if this
                # one had been accepted: the narrow at-least-once window).
                refused = Refused(f"postgres {type(e).__name__}")
                outcome = "retry"
                log.warning("recording delivery %s to channel %d failed: %s", key,
                            channel.channel_id, e)
            if outcome == "delivered":
                DELIVERED.labels(channel.kind, n.kind).inc()
                DELIVERY_SECONDS.labels(channel.kind).observe(time.perf_counter() - started)
                self.delivered += 1
                return True
            assert refused is not None
            self.last_error = f"{key} to channel {channel.channel_id}: {refused.cause}"
            if outcome != "retry":
                DEAD_LETTERS.labels(channel.kind, outcome).inc()
                self.dead_letters += 1
                log.error("gave up on notification %s for %s to %s channel %d after %d "
                          "attempts (%s): %s", key, n.tenant_id, channel.kind,
                          channel.channel_id, attempts, outcome, refused.cause)
                return True
            RETRIED.labels(channel.kind, refused.cause.split(" ", 1)[0]).inc()
            waits += 1
            if not await self._wait(waits, refused.retry_after, stopping):
                return False

    async def _wait(self, failures: int, retry_after: float | None,
                    stopping: asyncio.Event) -> bool:
        """Back off after the `failures`-th failure; False if stopping meanwhile."""
        delay = backoff_delay(failures, self.options.backoff_base, self.options.backoff_max,
                              self._rng)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.options.backoff_max))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)
        return not stopping.is_set()
