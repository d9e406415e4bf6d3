"""`tally jobs push-usage`: send each tenant's period usage to Stripe as meter events.

Stripe meter events add up, so Tally sends deltas: for every (tenant, meter, period) in
`usage_by_period`, what has not been sent yet. Each event's `identifier` (and idempotency
key) is `tenant:meter:period_start:cumulative_total` — a pure function of what is being
reported — so a retry or a re-run after a crash can never count twice at Stripe, and late
usage arrives as a new delta with a new identifier rather than a change to a sent event.
Gauge meters (a kind's `gauge`, domain/meters.py) use Stripe's `last` formula and send the
value itself.

Stripe accepts meter events with whole values and timestamps at most 35 days old: the
fractional part of a total waits until it makes a whole unit, and a period too old for
meter events is reported as an error (it belongs on an invoice as an adjustment).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import stripe

from billing_jobs import journal, metrics, stripe_api, stripe_catalog
from billing_jobs.errors import BillingError
from domain.meters import KINDS
from runtime.plans import read_catalog
from runtime.postgres import Connection, connect, migrate
from runtime.settings import Settings
from schemas.plans import Catalog

log = logging.getLogger(__name__)

STRIPE_MAX_AGE = timedelta(days=35)
SAFETY = timedelta(hours=1)


@dataclass
class PushResult:
    """What one run sent and what it could not."""

    events_sent: int = 0
    pushed: dict[tuple[str, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    failed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"meter events sent: {self.events_sent}"]
        lines += [f"  {t} {m}: {v}" for (t, m), v in sorted(self.pushed.items())]
        lines += [f"FAILED: {f}" for f in self.failed]
        return "\n".join(lines)


def identifier(tenant: str, meter: str, period_start: datetime, cumulative: int) -> str:
    """The deterministic meter event identifier (see the module docstring)."""
    return f"{tenant}:{meter}:{period_start.strftime('%Y%m%dT%H%M%SZ')}:{cumulative}"


def event_timestamp(period_start: datetime, period_end: datetime, now: datetime) -> int | None:
    """A timestamp inside the period that Stripe still accepts, or None if none is."""
    latest = min(now, period_end - timedelta(seconds=1))
    if latest < now - STRIPE_MAX_AGE + SAFETY or latest < period_start:
        return None
    return int(latest.timestamp())


@dataclass(frozen=True)
class Send:
    """One meter event to send, journaled under `key` (= its identifier)."""

    key: str
    tenant: str
    meter: str
    customer_id: str
    summary: dict[str, Any]


class UsagePusher:
    """Pushes every tenant's unsent usage; one tenant's failure does not stop the others.

    Concurrency: ONE call at a time per (customer, meter), as Stripe asks. The job is
    sequential: rows are read ordered by (tenant, meter, period) and each send finishes
    (journaled, retried) before the next starts; the stream mode sends one batch at a
    time. Two runs never overlap: the scheduler holds the job's advisory lock.
    """

    def __init__(self, settings: Settings, catalog: Catalog,
                 policy: journal.RetryPolicy | None = None, *, high_volume: bool = False,
                 create_missing: bool = True) -> None:
        self.policy = policy or journal.RetryPolicy()
        self.client = stripe_api.client(settings, self.policy.timeout)
        self.catalog = catalog
        self.database_url = settings.require_database()
        self.high_volume = high_volume
        self.create_missing = create_missing

    def run(self, now: datetime | None = None) -> PushResult:
        now = now or datetime.now(UTC)
        result = PushResult()
        migrate(self.database_url)
        with connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT u.tenant_id, u.meter, u.period_start, u.period_end, u.quantity,"
                " s.stripe_customer_id FROM tally.usage_by_period u"
                " LEFT JOIN tally.subscriptions s USING (tenant_id)"
                " ORDER BY u.tenant_id, u.meter, u.period_start"
            ).fetchall()
            customers: dict[str, str] = {}
            sends: list[Send] = []
            for tenant, meter, start, end, quantity, customer_id in rows:
                try:
                    stripe_catalog.ensure_meter(conn, self.client, self.catalog, meter,
                                                self.policy, create=self.create_missing)
                    if tenant not in customers:
                        customers[tenant] = stripe_catalog.ensure_customer(
                            conn, self.client, tenant, customer_id, self.policy,
                            create=self.create_missing)
                    sends += self._unsent(conn, tenant, meter, start, end, quantity,
                                          customers[tenant], now)
                except (BillingError, stripe.StripeError) as e:
                    self._failed(result, f"{tenant} {meter} {start:%Y-%m-%d}", e)
            if self.high_volume:
                self._stream(conn, result, sends)
            else:
                for send in sends:
                    try:
                        self._send(conn, send)
                        self._sent(result, [send])
                    except (BillingError, stripe.StripeError) as e:
                        self._failed(result, f"{send.tenant} {send.meter} {send.key}", e)
        return result

    @staticmethod
    def _sent(result: PushResult, sends: list[Send]) -> None:
        for send in sends:
            result.events_sent += 1
            if not send.summary.get("resent"):
                result.pushed[(send.tenant, send.meter)] += Decimal(send.summary["value"])

    @staticmethod
    def _failed(result: PushResult, what: str, e: Exception) -> None:
        metrics.PUSH_ERRORS.labels("push_usage", type(e).__name__).inc()
        result.failed.append(f"{what}: {e}")

    def _unsent(
        self, conn: Connection, tenant: str, meter: str, start: datetime, end: datetime,
        quantity: Decimal, customer_id: str, now: datetime,
    ) -> list[Send]:
        """What is unsent for one tenant, meter and period, oldest first."""
        prefix = identifier(tenant, meter, start, 0).rsplit(":", 1)[0] + ":"
        sent_rows = conn.execute(
            "SELECT idempotency_key, status, request_summary FROM tally.stripe_pushes"
            " WHERE kind = 'meter_event' AND idempotency_key LIKE %s ORDER BY created_at",
            (prefix.replace("%", r"\%") + "%",),
        ).fetchall()
        # 1. calls a crashed (or failed) run left unfinished, with their own identifiers
        sends = [Send(key, tenant, meter, customer_id, {**summary, "resent": True})
                 for key, status, summary in sent_rows if status != "succeeded"]
        cumulative = max((int(s["cumulative"]) for _, _, s in sent_rows), default=0)
        last_value = next((int(s["value"]) for _, _, s in reversed(sent_rows)), None)
        # 2. the new delta (or the new gauge reading). Late usage of a period already
        # pushed raises its total, so it goes out as one more delta with a new identifier.
        total = int(quantity)
        gauge = KINDS[self.catalog.meters[meter].aggregation].gauge
        value = total if gauge else total - cumulative
        if (gauge and total == last_value) or (not gauge and value <= 0) or total == 0:
            return sends
        timestamp = event_timestamp(start, end, now)
        if timestamp is None:
            raise BillingError(f"period {start:%Y-%m-%d} is older than Stripe accepts for "
                               "meter events; bill it as an invoice adjustment")
        summary = {"meter": meter, "value": value, "cumulative": total, "timestamp": timestamp,
                   "period_start": start.isoformat()}
        return [*sends, Send(identifier(tenant, meter, start, total), tenant, meter,
                             customer_id, summary)]

    def _send(self, conn: Connection, send: Send) -> None:
        journal.call(
            conn, key=send.key, kind="meter_event", tenant_id=send.tenant,
            summary={k: v for k, v in send.summary.items() if k != "resent"},
            request=lambda k: stripe_api.send_meter_event(
                self.client, send.meter, send.customer_id, int(send.summary["value"]),
                int(send.summary["timestamp"]), k),
            policy=self.policy,
        )

    def _stream(self, conn: Connection, result: PushResult, sends: list[Send]) -> None:
        """`--high-volume`: the v2 meter event stream, up to 100 events per request.

        Same journal keys as the v1 path, so either mode finishes the other's crashed run.
        Stripe validates stream events asynchronously: an event it drops (say, for an
        unknown customer) is journaled as sent and surfaces in `tally jobs reconcile`.
        """
        stream = stripe_api.MeterEventStream(self.client)
        for i in range(0, len(sends), stripe_api.STREAM_BATCH):
            batch = sends[i:i + stripe_api.STREAM_BATCH]
            events = [(s.meter, s.customer_id, int(s.summary["value"]),
                       int(s.summary["timestamp"]), s.key) for s in batch]
            try:
                journal.call_batch(
                    conn, kind="meter_event",
                    items=[(s.key, s.tenant, {k: v for k, v in s.summary.items()
                                              if k != "resent"}) for s in batch],
                    request=functools.partial(stream.send, events),
                    policy=self.policy,
                )
                self._sent(result, batch)
            except (BillingError, stripe.StripeError) as e:
                self._failed(result, f"stream batch of {len(batch)} from {batch[0].key}", e)


def load_catalog(settings: Settings) -> Catalog:
    """The current plan catalog, from the compacted plans topic."""
    catalog = asyncio.run(read_catalog(settings))
    if catalog is None:
        raise BillingError("no plan catalog on the plans topic: run `tally plans publish`")
    return catalog


def run_push_usage(settings: Settings, now: datetime | None = None,
                   policy: journal.RetryPolicy | None = None, *, high_volume: bool = False,
                   create_missing: bool = True, catalog: Catalog | None = None) -> PushResult:
    """`tally jobs push-usage`: one pass over `usage_by_period`; safe to run again."""
    catalog = catalog or load_catalog(settings)
    started = time.monotonic()
    result = UsagePusher(settings, catalog, policy, high_volume=high_volume,
                         create_missing=create_missing).run(now)
    log.info("push-usage: %d events in %.1fs", result.events_sent, time.monotonic() - started)
    return result

