"""`POST /stripe/webhook`: Stripe's events into Tally (`tally stripe webhooks serve`).

1. Verify: `stripe.WebhookSignature.verify_header` checks the `Stripe-Signature` HMAC
   with the endpoint secret (env STRIPE_WEBHOOK_SECRET); the signed timestamp must lie
   within `tolerance` (Stripe's default, 300 s) of now in either direction (Stripe's
   library only refuses old ones; a timestamp far in the future would let a captured
   request be replayed until then). A body that is not UTF-8, or a missing, forged, stale
   or future signature gets 400: Stripe keeps retrying, and an attacker learns nothing.
2. Dedup: an event id already in `tally.stripe_webhook_events` was handled: 200, nothing
   done again (Stripe redelivers until it sees a 2xx, and may deliver twice anyway).
3. Apply, idempotently (a signed event Tally cannot use is step 5, not an error):
   - `customer.subscription.created/updated/deleted` become Tally subscription events on
     Kafka through the producer SDK, with event id `stripe-<Stripe event id>`, so a
     redelivery that slips past step 2 (a crash between 3 and 4) is the same event
     downstream too. The 200 goes out only after Kafka acknowledged it.
   - `invoice.finalized/paid/payment_succeeded/payment_failed/voided/marked_uncollectible`
     update `tally.invoices.status`. Stripe does not order deliveries, so a status only
     moves forward (a late `finalized` never turns `paid` back into `open`).
     `invoice.finalized` and `invoice.paid` also carry the customer's copy
     (`hosted_invoice_url`, `invoice_pdf`), stored on `tally.invoices`.
   - anything else is acknowledged and recorded as ignored.
4. Record the event id (step 2's table), in the same transaction as the status update.
5. A signed event Tally cannot use — not JSON, not shaped like a Stripe event, data of an
   unexpected shape, a subscription of no known tenant or plan — is recorded in
   `tally.stripe_webhook_unusable` (with its payload and the reason) and in step 2's table,
   counted in `tally_billing_webhooks_unusable_total`, and answered 200: redelivering it
   cannot change it, so a 5xx would only make Stripe retry for days. Only failures of
   Tally's own (Postgres or Kafka away) answer 5xx, so that Stripe retries.

`POST /stripe/events` is the event destination for Stripe's thin (v2) events: the meter
error reports (`meter_errors.py`). Same steps: the signature is verified as in 1 (secret
`STRIPE_EVENTS_SECRET`, else `STRIPE_WEBHOOK_SECRET`), a redelivered event id is
acknowledged and not applied again, and the report's data is fetched from Stripe (a thin
event carries none) and journaled, in one transaction with the event id.

Metric labels come from fixed sets: event types Tally handles, else "other".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import stripe
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from billing_jobs import invoice_records, meter_errors, metrics, stripe_api
from billing_jobs.errors import BillingError
from producers import ProducerOptions, SubscriptionKind, UsageProducer
from runtime.postgres import VALUE_ERRORS, AsyncConnection, connect, connect_async, migrate
from runtime.settings import Settings

log = logging.getLogger(__name__)

TOLERANCE = 300
# How far each invoice status is along its life; updates never move backwards.
_INVOICE_STATUS = {"invoice.finalized": "open", "invoice.payment_failed": "payment_failed",
                   "invoice.paid": "paid", "invoice.payment_succeeded": "paid",
                   "invoice.voided": "void", "invoice.marked_uncollectible": "uncollectible"}
_RANK = {"draft": 0, "no_charge": 0, "open": 1, "payment_failed": 2, "paid": 3, "void": 3,
         "uncollectible": 3}
_SUBSCRIPTION_EVENTS = ("customer.subscription.created", "customer.subscription.updated",
                        "customer.subscription.deleted")
_HANDLED_TYPES = frozenset((*_INVOICE_STATUS, *_SUBSCRIPTION_EVENTS, *meter_errors.EVENT_TYPES))
# Errors of an event's content: redelivering the same event cannot get past them. Anything
# else (Postgres or Kafka unavailable) is Tally's own failure and answered 5xx.
_DATA_ERRORS: tuple[type[Exception], ...] = (
    BillingError, KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError,
    *VALUE_ERRORS)
_MAX_REASON_CHARS = 1000
# Stripe's ids and event types are short ASCII ("evt_1NG8Du2eZvKYlo2C...",
# "customer.subscription.updated"); anything else is not an event Tally can key on.
_EVENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,255}")
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_.]{1,255}")
# Unix times Tally takes from Stripe: up to the year 2200 (datetime overflows far later,
# but no period of a subscription does).
_LATEST_TIMESTAMP = 7_258_118_400


class UnusableEvent(BillingError):
    """A signed event Tally cannot use: not retryable by redelivery."""


@dataclass(frozen=True)
class StripeEvent:
    """What Tally reads of a Stripe event, checked at the edge."""

    id: str
    type: str
    created: int
    object: dict[str, Any]

    @classmethod
    def parse(cls, document: Any) -> StripeEvent:
        """The event of a decoded webhook body; UnusableEvent says what is missing."""
        if not isinstance(document, dict):
            raise UnusableEvent("not a JSON object")
        data = document.get("data")
        obj = data.get("object") if isinstance(data, dict) else None
        event_id, event_type = document.get("id"), document.get("type")
        problems = [f"no valid {name}" for name, ok in (
            ("id", isinstance(event_id, str) and _EVENT_ID.fullmatch(event_id)),
            ("type", isinstance(event_type, str) and _EVENT_TYPE.fullmatch(event_type)),
            ("created", _is_timestamp(document.get("created"))),
            ("data.object", isinstance(obj, dict))) if not ok]
        if problems:
            raise UnusableEvent("not a Stripe event: " + ", ".join(problems))
        assert isinstance(event_id, str) and isinstance(event_type, str)
        assert isinstance(obj, dict)
        return cls(event_id, event_type, document["created"], obj)


def _identity(document: Any, body: bytes) -> tuple[str, str]:
    """The id and type an unreadable event is recorded under: its own where they are
    usable, else the body's digest and "unknown"."""
    fields = document if isinstance(document, dict) else {}
    event_id, event_type = fields.get("id"), fields.get("type")
    if not (isinstance(event_id, str) and _EVENT_ID.fullmatch(event_id)):
        event_id = "sha256:" + hashlib.sha256(body).hexdigest()
    if not (isinstance(event_type, str) and _EVENT_TYPE.fullmatch(event_type)):
        event_type = "unknown"
    return event_id, event_type


def _is_timestamp(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _LATEST_TIMESTAMP


def _moment(value: Any, what: str) -> datetime:
    """A Unix time of the event's data as a UTC datetime; UnusableEvent when it is none."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not _is_timestamp(value):
        raise UnusableEvent(f"{what} is not a Unix time: {str(value)[:50]!r}")
    return datetime.fromtimestamp(value, UTC)


def type_label(event_type: str) -> str:
    """The metric label of an event type: one Tally handles, else "other" (a fixed set)."""
    return event_type if event_type in _HANDLED_TYPES else "other"


def _signed_at(header: str) -> int:
    """The `t=` of a Stripe-Signature header already verified (the last one, as Stripe's
    library reads it)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    return int(fields["t"])


def _text(value: str, limit: int | None = None) -> str:
    """Text Postgres stores: no NUL characters (text columns refuse them), bounded."""
    value = value.replace("\x00", "\\u0000")
    return value if limit is None or len(value) <= limit else value[:limit] + "..."


def webhook_secret() -> str:
    secret = os.environ.get("STRIPE_WEBHOOK_SECRET", "")
    if not secret:
        raise BillingError("set STRIPE_WEBHOOK_SECRET (the endpoint's whsec_... secret)")
    return secret


class WebhookReceiver:
    """The aiohttp application behind `POST /stripe/webhook` (plus /healthz, /metrics)."""

    def __init__(self, settings: Settings, secret: str, tolerance: int = TOLERANCE,
                 thin_secret: str | None = None) -> None:
        self.settings = settings
        self.secret = secret
        self.thin_secret = thin_secret or os.environ.get("STRIPE_EVENTS_SECRET") or secret
        self.stripe_client: stripe.StripeClient | None = None  # fetches thin events' data
        self.tolerance = tolerance
        self.database_url = settings.require_database()
        self.producer: UsageProducer | None = None
        self.conn: AsyncConnection | None = None
        self.lock = asyncio.Lock()  # one connection: requests take turns on it

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/stripe/webhook", self.handle)
        app.router.add_post("/stripe/events", self.handle_thin)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        await asyncio.to_thread(migrate, self.database_url)
        self.conn = await connect_async(self.database_url, autocommit=True)
        self.producer = UsageProducer(self.settings, ProducerOptions(source="stripe/webhooks"))
        await self.producer.start()

    async def _stop(self, _app: web.Application) -> None:
        if self.producer is not None:
            await self.producer.close()
        if self.conn is not None:
            await self.conn.close()

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _verify(self, body: bytes, header: str | None, secret: str) -> str:
        """The payload of a request signed with `secret` at a time within the tolerance of
        now, in either direction (step 1); ValueError or SignatureVerificationError else."""
        payload = body.decode("utf-8")
        stripe.WebhookSignature.verify_header(payload, header, secret, self.tolerance)
        assert header is not None  # verify_header refuses a missing one
        if (signed_at := _signed_at(header)) > time.time() + self.tolerance:
            raise ValueError(f"Timestamp outside the tolerance zone ({signed_at}): "
                             "in the future")
        return payload

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload = self._verify(body, request.headers.get("Stripe-Signature"), self.secret)
        except (ValueError, stripe.SignatureVerificationError) as e:
            return self._rejected(str(e))
        document: Any = None
        try:
            document = json.loads(payload)
            event = StripeEvent.parse(document)
        except (ValueError, UnusableEvent) as e:
            # Signed by Stripe, yet not an event Tally can read: kept under its id when it
            # has a usable one, else under the payload's digest.
            event_id, event_type = _identity(document, body)
            return await self._unusable(event_id, event_type, payload, e)
        assert self.conn is not None
        async with self.lock:
            seen = await (await self.conn.execute(
                "SELECT outcome FROM tally.stripe_webhook_events WHERE event_id = %s",
                (event.id,))).fetchone()
            if seen is not None:
                metrics.WEBHOOKS.labels(type_label(event.type), "duplicate").inc()
                return web.json_response({"received": True, "duplicate": True})
            try:
                async with self.conn.transaction():
                    outcome = await self._apply(event)
                    await self.conn.execute(
                        "INSERT INTO tally.stripe_webhook_events (event_id, type, outcome)"
                        " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                        (event.id, event.type, outcome))
            except _DATA_ERRORS as e:
                return await self._unusable(event.id, event.type, payload, e, locked=True)
        metrics.WEBHOOKS.labels(type_label(event.type), outcome.split(":")[0]).inc()
        return web.json_response({"received": True, "outcome": outcome})

    @staticmethod
    def _rejected(reason: str) -> web.Response:
        metrics.WEBHOOKS.labels("other", "rejected").inc()
        return web.json_response({"error": f"invalid webhook: {reason}"}, status=400)

    async def _unusable(self, event_id: str, event_type: str, payload: str, error: Exception,
                        *, locked: bool = False) -> web.Response:
        """Record a signed event Tally cannot use and acknowledge it (step 5)."""
        assert self.conn is not None
        unmapped = isinstance(error, BillingError) and not isinstance(error, UnusableEvent)
        cause = "unmapped" if unmapped else "malformed"
        reason = _text(str(error) if isinstance(error, BillingError)
                       else f"{type(error).__name__}: {error}", _MAX_REASON_CHARS)
        event_id, event_type = _text(event_id, 255), _text(event_type, 255)
        log.error("stripe webhook %s (%s) cannot be used, recorded in "
                  "tally.stripe_webhook_unusable: %s", event_id, event_type, reason)
        async with contextlib.AsyncExitStack() as stack:
            if not locked:
                await stack.enter_async_context(self.lock)
            async with self.conn.transaction():
                recorded = await self.conn.execute(
                    "INSERT INTO tally.stripe_webhook_unusable (event_id, type, reason, payload)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (event_id, event_type, reason, _text(payload)))
                await self.conn.execute(
                    "INSERT INTO tally.stripe_webhook_events (event_id, type, outcome)"
                    " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    (event_id, event_type, f"unusable: {reason}"))
        if not recorded.rowcount:  # a redelivery of one recorded before
            metrics.WEBHOOKS.labels(type_label(event_type), "duplicate").inc()
            return web.json_response({"received": True, "duplicate": True})
        metrics.WEBHOOKS.labels(type_label(event_type), "unusable").inc()
        metrics.WEBHOOKS_UNUSABLE.labels(cause).inc()
        return web.json_response({"received": True, "outcome": f"unusable: {reason}"})

    async def _apply(self, event: StripeEvent) -> str:
        assert self.conn is not None
        data = event.object
        if event.type in _INVOICE_STATUS:
            texts = {k: data.get(k) for k in ("id", "hosted_invoice_url", "invoice_pdf")}
            if not isinstance(texts["id"], str) or any(
                    v is not None and not isinstance(v, str) for v in texts.values()):
                raise UnusableEvent(f"{event.type}: no invoice id, or links that are not text")
            await self._invoice_links(event.type, data)
            status = _INVOICE_STATUS[event.type]
            rank_case = " ".join(f"WHEN '{s}' THEN {r}" for s, r in _RANK.items())
            updated = await self.conn.execute(
                "UPDATE tally.invoices SET status = %s, updated_at = now()"
                f" WHERE stripe_invoice_id = %s AND (CASE status {rank_case} ELSE 0 END) <= %s",
                (status, data.get("id"), _RANK[status]))
            return f"invoice {status}" if updated.rowcount else "invoice unchanged"
        if event.type in _SUBSCRIPTION_EVENTS:
            return await self._subscription(event, data)
        return "ignored"

    async def _invoice_links(self, event_type: str, data: dict[str, Any]) -> None:
        """The customer's copy of a finalized or paid invoice, kept on `tally.invoices`."""
        assert self.conn is not None
        if event_type in ("invoice.finalized", "invoice.paid") and data.get("id"):
            await self.conn.execute(invoice_records.RECORD_LINKS, (
                data.get("hosted_invoice_url"), data.get("invoice_pdf"), data["id"]))

    # -- thin events (meter error reports) -------------------------------------------------

    async def handle_thin(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload = self._verify(body, request.headers.get("Stripe-Signature"),
                                   self.thin_secret)
            client = self._stripe()
            notification = client.parse_event_notification_without_verification(payload)
        except (ValueError, stripe.SignatureVerificationError) as e:
            metrics.WEBHOOKS.labels("other", "rejected").inc()
            return web.json_response({"error": f"invalid event notification: {e}"},
                                     status=400)
        except BillingError as e:  # no Stripe key to fetch the event with: Stripe retries
            return web.json_response({"error": str(e)}, status=503)
        if notification.type not in meter_errors.EVENT_TYPES:
            outcome = "ignored"
            async with self.lock:
                await self._record_event(notification.id, notification.type, outcome)
        else:
            try:
                async with self.lock:  # one report at a time: a redelivery sees the first
                    outcome = await asyncio.to_thread(self._meter_errors, notification)
            except stripe.StripeError as e:
                # Stripe redelivers a notification that was not acknowledged: try again then.
                metrics.WEBHOOKS.labels(type_label(notification.type), "retry").inc()
                return web.json_response({"error": f"cannot fetch the event: {e}"},
                                         status=503)
        metrics.WEBHOOKS.labels(type_label(notification.type), outcome.split(":")[0]).inc()
        return web.json_response({"received": True, "outcome": outcome})

    def _stripe(self) -> stripe.StripeClient:
        if self.stripe_client is None:
            self.stripe_client = stripe_api.client(self.settings)
        return self.stripe_client

    def _meter_errors(self, notification: Any) -> str:
        """Fetch a meter error report and journal it, once per event id (in a thread: the
        SDK and the journal are synchronous)."""
        with connect(self.database_url, autocommit=True) as conn:
            seen = conn.execute("SELECT outcome FROM tally.stripe_webhook_events"
                                " WHERE event_id = %s", (notification.id,)).fetchone()
            if seen is not None:
                return "duplicate"
            event = notification.fetch_event().to_dict()
            with conn.transaction():
                outcome = meter_errors.record_report(conn, notification.id, event).outcome()
                conn.execute(
                    "INSERT INTO tally.stripe_webhook_events (event_id, type, outcome)"
                    " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    (notification.id, notification.type, outcome))
        return outcome

    async def _record_event(self, event_id: str, event_type: str, outcome: str) -> None:
        assert self.conn is not None
        await self.conn.execute(
            "INSERT INTO tally.stripe_webhook_events (event_id, type, outcome)"
            " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", (event_id, event_type, outcome))

    async def _subscription(self, event: StripeEvent, data: dict[str, Any]) -> str:
        assert self.conn is not None and self.producer is not None
        customer = str(data.get("customer") or "")
        tenant = (data.get("metadata") or {}).get("tally_tenant_id")
        if not tenant:
            row = await (await self.conn.execute(
                "SELECT tenant_id FROM tally.stripe_pushes WHERE kind = 'customer'"
                " AND stripe_object_id = %s", (customer,))).fetchone()
            tenant = row[0] if row else None
        if not tenant:
            raise BillingError(f"subscription {data.get('id')}: customer {customer!r} is not a"
                               " Tally tenant (no tally_tenant_id metadata)")
        items = (data.get("items") or {}).get("data") or [{}]
        price = items[0].get("price") or {}
        plan_id = ((data.get("metadata") or {}).get("tally_plan_id")
                   or (price.get("metadata") or {}).get("tally_plan_id"))
        if not plan_id:
            raise BillingError(f"subscription {data.get('id')}: no tally_plan_id metadata on it"
                               " or its price")
        # API versions from 2025 keep the period on the items, older ones on the subscription.
        start = data.get("current_period_start") or items[0].get("current_period_start")
        end = data.get("current_period_end") or items[0].get("current_period_end")
        if not start or not end:
            raise BillingError(f"subscription {data.get('id')}: no current period")
        period_start = _moment(start, "current_period_start")
        period_end = _moment(end, "current_period_end")
        kind = await self._kind(event.type, data, str(tenant), plan_id, period_start)
        await self.producer.subscription_event(
            kind, str(tenant), plan_id, period_start, period_end,
            stripe_customer_id=customer or None, stripe_subscription_id=data.get("id"),
            cancel_at_period_end=data.get("cancel_at_period_end"),
            trial_end=_moment(data["trial_end"], "trial_end") if data.get("trial_end") else None,
            event_id=f"stripe-{event.id}", time=_moment(event.created, "created"))
        await self.producer.flush()  # acknowledged by Kafka before Stripe hears 200
        return f"subscription {kind}"

    async def _kind(self, event_type: str, data: dict[str, Any], tenant: str, plan_id: str,
                    period_start: datetime) -> SubscriptionKind:
        if event_type.endswith(".created"):
            return "created"
        if event_type.endswith(".deleted") or data.get("status") == "canceled":
            return "canceled"
        assert self.conn is not None
        row = await (await self.conn.execute(
            "SELECT plan_id, current_period_start FROM tally.subscriptions WHERE tenant_id = %s",
            (tenant,))).fetchone()
        if row is not None and row[0] == plan_id and row[1] != period_start:
            return "renewed"
        return "plan_changed"  # a new plan, or other terms (cancel_at_period_end, trial)


async def serve(settings: Settings, port: int, host: str | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (SIGTERM/SIGINT when run from the CLI), on `host`, by
    default the setting `webhooks_host` (loopback unless set)."""
    host = host or settings.webhooks_host
    runner = web.AppRunner(WebhookReceiver(settings, webhook_secret()).app())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("stripe webhooks on %s:%d/stripe/webhook", host, port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
