"""The notifier: deliver `tally.notifications` to a webhook (Slack-compatible), at least once.

    tally notify serve --webhook-url https://hooks.example.com/T0/B0 --secret "$SECRET"

Delivery protocol, per notification record, in partition order (partitions are delivered
concurrently, so a notification that cannot get through holds up only the later ones of its
own partition):
1. decode it (a record that is not a Notification is logged, counted as failed and skipped:
   retrying cannot fix it);
2. POST the payload; on a network error, a timeout or any non-2xx answer, wait with
   exponential backoff and jitter and POST again, until it succeeds (or `max_attempts`, when
   set, is used up: then it is logged and counted as failed, and skipped). Redirects are
   never followed: a 3xx is a failed attempt, so no receiver can send the request elsewhere;
3. only then commit the record's offset (consumer group `<topic prefix>notifier`).
A crash or stop between 2 and 3 sends the notification again on restart: at-least-once.
Receivers dedup by the `Idempotency-Key` header, which is derived from the notification's
identity (tenant, meter, period start, kind, threshold percent) and is therefore the same on
every attempt and every redelivery.

The request
    POST <webhook-url>
    Content-Type: application/json
    Idempotency-Key: ntf_<32 hex>
    X-Tally-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>
    X-Tally-Delivery-Attempt: <1, 2, ...>

    {"text": "<a line for humans; Slack shows it>", "idempotency_key": "ntf_...",
     "tenant_id": ..., "meter": ..., "plan_id": ..., "period_start": ..., "kind": ...,
     "threshold_percent": ..., "used": ..., "limit": ...}

Verifying a delivery (the receiver's side; the same scheme as Stripe's webhooks)
1. Split `X-Tally-Signature` on "," into `t=<timestamp>` and one or more `v1=<signature>`.
2. Compute HMAC-SHA256 with the shared secret over the exact bytes `f"{t}." + raw body`
   (the body as received, before any JSON parsing) and hex-encode it.
3. Compare it with each v1 value in constant time (`hmac.compare_digest`); accept on a
   match.
4. Reject when |now - t| exceeds a tolerance (5 minutes here): this bounds replays of a
   captured request. Every attempt is signed afresh, so retries carry a current `t`.
5. Dedup on `Idempotency-Key` and answer 2xx only once the notification is stored or
   handled; any other answer makes the notifier retry.
`verify_signature` below implements 1-4 for Python receivers.

Outages: the notifier outlives the broker and Postgres going away, at start or later. It
waits for them with backoff instead of exiting: a record is committed only after its
delivery, so what arrives meanwhile is delivered once they are back, and the guarantee
stays at least once as above (channels: once, but for the window in streams/channels).
`tally_notifier_up{dependency="kafka"|"postgres"}` reads 0 and `/healthz` answers 503
(readiness) while either is down, `tally_notifier_reconnects_total{dependency}` counts
the returns, and `/livez` (liveness) answers 200 throughout. Both are asked every
`probe_seconds` even when no notification flows (streams/links.py).

A broker that comes back may hold another log: one restarted without its disks (the
embedded broker always is) has every partition start again at offset 0, and no group
offsets. A consumer that lived through the outage would fetch the new log from its old
positions, skipping the new log's first records, and commit offsets of the new log past
them (seen: a restart under a running notifier lost the first records of every partition
for good). So once the notifier sees the broker fail (a probe, a fetch or a commit), it
drops its consumer: deliveries in progress stop (what they delivered and had not committed
is delivered again: at least once), and a new consumer joins the group once the broker
answers, from the group's committed offsets, or from the log's start when the broker has
none. An outage shorter than a probe that no fetch or commit noticed is not seen: a broker
restarted that fast can still cost the records the old positions skip.

Stopping: SIGTERM finishes the POST in flight (bounded by the request timeout), commits
what was delivered and exits 0; a notification waiting for its next attempt is left
uncommitted and is delivered after the restart.

Customer alerts: with `channels` (streams/channels, given by `tally notify serve` when
Postgres is configured) each notification also goes to every enabled channel of its
tenant — e-mail, Slack-compatible webhooks, the tenant's own signed webhook — once each,
deduplicated in Postgres across restarts, before its offset is committed. The webhook
above (`webhook_url`, the operator's) is then optional: "" sends none.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import ValidationError

from runtime import kafka
from runtime.backoff import Backoff, first_line
from runtime.settings import Settings
from schemas.codec import dumps
from schemas.records import Notification
from streams.links import Links

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Tally-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
ATTEMPT_HEADER = "X-Tally-Delivery-Attempt"
SIGNATURE_TOLERANCE_SECONDS = 300

DELIVERED = Counter("tally_notifier_delivered_total", "Notifications delivered (2xx)", ["kind"])
FAILED = Counter("tally_notifier_failed_total",
                 "Notifications given up on: undecodable, or out of attempts", ["reason"])
RETRIED = Counter("tally_notifier_retried_total", "Delivery attempts that will be retried",
                  ["cause"])
DELIVERY_SECONDS = Histogram(
    "tally_notifier_delivery_seconds", "From the first attempt to a 2xx answer",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600),
)


# --- pure parts: identity, payload, signature, backoff ---------------------------------


def idempotency_key(n: Notification) -> str:
    """A stable key from the notification's identity; the same on every redelivery.

    Decimals are normalised (80 and 80.0 are one threshold) and times put in UTC, so two
    encodings of the same notification agree. Hashed to keep the header ASCII and short
    whatever the tenant id contains.
    """
    percent = "-" if n.threshold_percent is None else _plain(n.threshold_percent)
    start = n.period_start.astimezone(UTC).isoformat()
    identity = "\x1f".join((n.tenant_id, n.meter, start, n.kind, percent))
    return "ntf_" + hashlib.sha256(identity.encode()).hexdigest()[:32]


def _plain(d: Decimal) -> str:
    return format(d.normalize(), "f")


def render_text(n: Notification) -> str:
    """The human line of a notification (Slack's `text`)."""
    who = f"Tenant {n.tenant_id} (plan {n.plan_id})"
    used = _plain(n.used)
    if n.kind == "soft_limit":
        pct = "?" if n.threshold_percent is None else _plain(n.threshold_percent)
        return f"{who} reached {pct}% of its included {n.meter}: {used} used."
    if n.kind == "exceeded":
        return f"{who} exceeded its included {n.meter}: {used} used; overage applies."
    if n.kind == "blocked":
        limit = "?" if n.limit is None else _plain(n.limit)
        return (f"{who} reached the hard limit of {limit} {n.meter}; further usage is "
                f"blocked until the period ends.")
    return f"{who}: the trial ends soon."


def payload(n: Notification) -> bytes:
    """The request body: Slack's `text` plus every field of the notification."""
    return dumps({"text": render_text(n), "idempotency_key": idempotency_key(n),
                  **n.model_dump(mode="json")})


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-Tally-Signature` value for a body sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(secret: str, body: bytes, header: str, *,
                     tolerance: float = SIGNATURE_TOLERANCE_SECONDS,
                     now: float | None = None) -> bool:
    """Whether `header` is a valid, fresh signature of `body` (the receiver's check)."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, c) for c in candidates)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based).

    Exponential (base * 2^(attempt-1)), capped, with "equal jitter" (half fixed, half
    random) so many notifiers retrying at once do not hit a recovering receiver in step.
    """
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


# --- the service -----------------------------------------------------------------------


class Channels(Protocol):
    """Delivery to tenants' own channels (streams/channels.ChannelDelivery)."""

    async def open(self, links: Links) -> None: ...
    async def close(self) -> None: ...

    async def probe(self) -> None:
        """Check Postgres answers (updating the links given to open)."""
        ...

    async def deliver(self, n: Notification, stopping: asyncio.Event) -> bool:
        """Deliver to every channel (or give up on it); False if stopping before that."""
        ...


@dataclass(frozen=True)
class NotifierOptions:
    """How the notifier delivers. `max_attempts` None: retry until delivered.
    `webhook_url` "": no operator webhook (tenants' channels only)."""

    webhook_url: str
    secret: str
    group_id: str | None = None  # default: "<topic prefix>notifier"
    request_timeout: float = 10.0
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    max_attempts: int | None = None
    probe_seconds: float = 5.0  # how often the broker (and Postgres) are asked if they answer


class Notifier:
    """Consumes `tally.notifications` and delivers each one to the webhook; see module docs."""

    def __init__(self, settings: Settings, options: NotifierOptions,
                 channels: Channels | None = None) -> None:
        self.settings = settings
        self.options = options
        self.channels = channels
        self.topic = settings.topics.notifications
        self.group_id = options.group_id or f"{settings.topic_prefix}notifier"
        self.delivered = 0
        self.last_error: str | None = None
        self._stopping = asyncio.Event()
        self._rng = random.Random()
        self.links = Links("kafka", *(["postgres"] if channels is not None else []))
        self._kafka_backoff = Backoff(options.backoff_base, options.backoff_max)
        # The consumer in use (None while replacing it), and whether the broker failed
        # since it started: then it is replaced (module docstring, on another log).
        self._consumer: Any = None
        self._kafka_lost = asyncio.Event()

    def stop(self) -> None:
        """Ask the notifier to stop (safe from a signal handler); run() then returns."""
        self._stopping.set()

    async def run(self) -> None:
        """Deliver notifications until stop() is called.

        Neither the broker nor Postgres being down ends it, at start or later: it waits for
        them with backoff, `tally_notifier_up{dependency}` reads 0 and `/healthz` answers
        503 meanwhile (`streams/links.py`); a notification is committed only once delivered,
        so what waits is delivered after the outage (module docstring).
        """
        timeout = aiohttp.ClientTimeout(total=self.options.request_timeout)
        if self.channels is not None:
            await self.channels.open(self.links)
        consumer = await self._start_consumer()
        if consumer is None:  # stopped while waiting for the broker
            if self.channels is not None:
                await self.channels.close()
            return
        probing = asyncio.create_task(self._probe())
        # One task per partition with records to deliver; the partition is paused (nothing
        # more fetched for it) until its task is done.
        delivering: dict[TopicPartition, asyncio.Task[None]] = {}
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                while not self._stopping.is_set():
                    if self._kafka_lost.is_set():
                        consumer = await self._replace_consumer(consumer, delivering)
                        if consumer is None:  # stopped while waiting for the broker
                            break
                    try:
                        batches = await consumer.getmany(timeout_ms=100)
                    except KafkaError as e:
                        self._lose_kafka(f"fetch: {first_line(e)}")
                        continue
                    if self._kafka_lost.is_set():
                        continue  # fetched by a consumer that lived through the failure
                    for tp, records in batches.items():
                        consumer.pause(tp)
                        # A partition given back after a rebalance may still have a task:
                        # the new one starts after it, keeping the partition's order.
                        delivering[tp] = asyncio.create_task(self._deliver_partition(
                            consumer, http, tp, records, delivering.get(tp)))
                    for tp in [tp for tp, task in delivering.items() if task.done()]:
                        delivering.pop(tp).result()  # raises what the task raised
                        if tp in consumer.assignment():
                            consumer.resume(tp)
                # Stopping: each task ends after its POST in flight, or at once if waiting
                # to retry (that notification stays uncommitted).
                await asyncio.gather(*delivering.values())
        finally:
            probing.cancel()
            for task in delivering.values():
                task.cancel()
            if consumer is not None:
                await consumer.stop()
            if self.channels is not None:
                await self.channels.close()

    def _lose_kafka(self, why: str) -> None:
        """The broker failed: report it, and have run() replace the consumer."""
        self.links.down("kafka", why)
        self._kafka_lost.set()

    async def _replace_consumer(self, consumer: Any,
                                delivering: dict[TopicPartition, asyncio.Task[None]]) -> Any:
        """Drop a consumer that lived through a broker failure and start another once the
        broker answers (module docstring: the broker may come back with another log).
        Returns the new consumer (None: stopped before the broker answered)."""
        self._consumer = None  # its tasks commit nothing more
        for task in delivering.values():
            task.cancel()
        await asyncio.gather(*delivering.values(), return_exceptions=True)
        delivering.clear()
        try:  # leaving the group cannot succeed while the broker is away: do not wait long
            await asyncio.wait_for(kafka.stop(consumer), 5)
        except (KafkaError, OSError, TimeoutError) as e:
            log.info("the consumer of the lost broker did not stop cleanly: %s", first_line(e))
        self._kafka_lost.clear()
        log.warning("the broker failed: starting a new consumer, from the group's committed "
                    "offsets (or the log's start) once it answers")
        return await self._start_consumer()

    async def _start_consumer(self) -> Any:
        """The started consumer, once the broker answers (None: stopped before that)."""
        while not self._stopping.is_set():
            consumer = kafka.consumer(
                self.settings, self.topic, group_id=self.group_id,
                # The embedded broker holds a group join for half the session timeout.
                session_timeout_ms=4000, heartbeat_interval_ms=500,
                # A notification may wait long for a receiver that is down; leaving the
                # group meanwhile would only hand the same wait to another notifier.
                max_poll_interval_ms=3_600_000,
            )
            try:
                await kafka.start(consumer)
                self._kafka_backoff.reset()
                self._consumer = consumer
                self.links.up("kafka")
                return consumer
            except (KafkaError, OSError) as e:
                self.links.down("kafka", f"start: {first_line(e)}")
                await self._kafka_backoff.sleep(self._stopping)
        return None

    async def _probe(self) -> None:
        """Every `probe_seconds`, ask the broker (and Postgres) whether they answer, so that
        metrics and `/healthz` tell an outage even when no notification flows. (While the
        consumer is being replaced, its start asks the broker.)"""
        while True:
            consumer = self._consumer
            try:
                if consumer is not None:
                    await asyncio.wait_for(consumer.topics(), self.options.probe_seconds * 2)
                    if consumer is self._consumer and not self._kafka_lost.is_set():
                        self.links.up("kafka")
                        self._kafka_backoff.reset()
            except (KafkaError, OSError, TimeoutError) as e:
                self._lose_kafka(first_line(e))
            if self.channels is not None:
                await self.channels.probe()
            await asyncio.sleep(self.options.probe_seconds)

    async def _deliver_partition(self, consumer: Any, http: aiohttp.ClientSession,
                                 tp: TopicPartition, records: list[Any],
                                 after: asyncio.Task[None] | None) -> None:
        """Deliver one partition's records in order, committing each once delivered."""
        if after is not None:
            await after
        for r in records:
            if consumer is not self._consumer:
                return  # replaced after a broker failure: it fetches these again
            if not await self._handle(http, r.value, r.offset):
                return  # stopping mid-retry: this one stays uncommitted
            if not await self._commit(consumer, tp, r.offset + 1):
                return  # the broker failed: the rest is fetched again by a new consumer

    async def _handle(self, http: aiohttp.ClientSession, value: bytes | None,
                      offset: int) -> bool:
        """Deliver one record; False only when stopping before it was delivered."""
        try:
            notification = Notification.model_validate_json(value or b"")
        except ValidationError as e:
            FAILED.labels("invalid").inc()
            log.error("skipping notification record at offset %d that is not a Notification: %s",
                      offset, e)
            return True
        if self.options.webhook_url and not await self.deliver(http, notification):
            return False
        if self.channels is not None:
            return await self.channels.deliver(notification, self._stopping)
        return True

    async def deliver(self, http: aiohttp.ClientSession, n: Notification) -> bool:
        """POST one notification until it is accepted; False if stopped before that."""
        body = payload(n)
        key = idempotency_key(n)
        started = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            cause = await self._attempt(http, body, key, attempt)
            if cause is None:
                DELIVERED.labels(n.kind).inc()
                DELIVERY_SECONDS.observe(time.perf_counter() - started)
                self.delivered += 1
                return True
            self.last_error = f"{key}: {cause}"
            max_attempts = self.options.max_attempts
            if max_attempts is not None and attempt >= max_attempts:
                FAILED.labels("attempts_exhausted").inc()
                log.error("giving up on notification %s for %s after %d attempts: %s",
                          key, n.tenant_id, attempt, cause)
                return True
            RETRIED.labels(cause.split(" ", 1)[0]).inc()
            delay = backoff_delay(attempt, self.options.backoff_base, self.options.backoff_max,
                                  self._rng)
            log.warning("notification %s attempt %d failed (%s); retrying in %.2fs",
                        key, attempt, cause, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return False

    async def _attempt(self, http: aiohttp.ClientSession, body: bytes, key: str,
                       attempt: int) -> str | None:
        """One POST; None on success, else the cause ("http 503", "network ...")."""
        headers = {
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: key,
            SIGNATURE_HEADER: sign(self.options.secret, body, int(time.time())),
            ATTEMPT_HEADER: str(attempt),
        }
        try:
            # Never follow a redirect: the receiver would choose where a signed request
            # goes, and an answer of 3xx pointing at an internal port would reach services
            # the notifier can see and the receiver cannot. A 3xx is a failed attempt.
            async with http.post(self.options.webhook_url, data=body, headers=headers,
                                 allow_redirects=False) as resp:
                await resp.read()
                return None if 200 <= resp.status < 300 else f"http {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as e:
            return f"network {type(e).__name__}"

    async def _commit(self, consumer: Any, tp: TopicPartition, offset: int) -> bool:
        """Commit a delivered record's offset; False when the broker failed. The record
        then stays uncommitted and is delivered again by the consumer that replaces this
        one (at least once: receivers dedup); this one commits nothing more: its offsets
        may belong to a log the broker no longer has (module docstring)."""
        if consumer is not self._consumer:
            return False
        try:
            await asyncio.wait_for(consumer.commit({tp: offset}), 15)
            if not self._kafka_lost.is_set():
                self.links.up("kafka")
        except (CommitFailedError, IllegalStateError) as e:
            # The partition moved to another notifier during a rebalance: it resumes from
            # the last committed offset and sends this one again (receivers dedup).
            log.warning("commit of %s@%d failed after delivery: %s", tp, offset, e)
        except (KafkaError, OSError, TimeoutError) as e:
            self._lose_kafka(f"commit: {first_line(e)}")
            return False
        return True


# --- running it ------------------------------------------------------------------------


def web_app(notifier: Notifier) -> web.Application:
    """`/metrics` (Prometheus) and `/healthz` of a running notifier."""

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(),
                            content_type=CONTENT_TYPE_LATEST.split(";")[0])

    async def health(request: web.Request) -> web.Response:
        """Ready (200) only while the broker and Postgres answer; 503 while it waits."""
        ready = notifier.links.ready
        return web.Response(body=dumps({"ok": ready, "delivered": notifier.delivered,
                                        "waiting_for": notifier.links.waiting_for(),
                                        "last_error": notifier.last_error}),
                            status=200 if ready else 503, content_type="application/json")

    async def alive(request: web.Request) -> web.Response:
        """Liveness: the process serves; waiting for a dependency is no reason to kill it."""
        return web.Response(body=b'{"ok": true}', content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", health)
    app.router.add_get("/livez", alive)
    return app


class NotifierService:
    """A notifier with its web port, as `tally notify serve` runs it; the port listens on
    the setting `notifier_web_host` (loopback unless set)."""

    def __init__(self, settings: Settings, options: NotifierOptions, web_port: int,
                 channels: Channels | None = None) -> None:
        self.notifier = Notifier(settings, options, channels)
        self.web_host = settings.notifier_web_host
        self.web_port = web_port

    def stop(self) -> None:
        self.notifier.stop()

    async def run(self) -> None:
        runner = web.AppRunner(web_app(self.notifier))
        await runner.setup()
        if self.web_port:
            await web.TCPSite(runner, self.web_host, self.web_port).start()
        try:
            await self.notifier.run()
        finally:
            await runner.cleanup()
