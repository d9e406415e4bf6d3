"""`tally jobs push-usage`: send each tenant's period usage to Stripe as meter events.

Stripe meter events add up, so Tally sends deltas: for every (tenant, meter, period) in
`usage_by_period`, what has not been sent yet. Each event's `identifier` (and idempotency
key) is `tenant:meter:period_start:cumulative_total` — a pure function of what is being
reported — so a retry or a re-run after a crash can never count twice at Stripe, and late
usage arrives as a new delta with a new identifier rather than a change to a sent event.
Gauge meters (`max`, `latest`) use Stripe's `last` formula and send the value itself.

Stripe accepts meter events with whole values and timestamps at most 35 days old: the
fractional part of a total waits until it makes a whole unit, and a period too old for
meter events is reported as an error (it belongs on an invoice as an adjustment).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import stripe

from billing_jobs import journal, metrics, stripe_api
from billing_jobs.errors import BillingError
from projections.migrations import connect, migrate
from schemas.plans import Catalog
from streams.catalog_follower import read_catalog
from tally.settings import Settings

log = logging.getLogger(__name__)

STRIPE_MAX_AGE = timedelta(days=35)
SAFETY = timedelta(hours=1)
GAUGES = {"max", "latest", "unique_count"}


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


class UsagePusher:
    """Pushes every tenant's unsent usage; one tenant's failure does not stop the others."""

    def __init__(self, settings: Settings, catalog: Catalog,
                 policy: journal.RetryPolicy | None = None) -> None:
        self.client = stripe_api.client(settings)
        self.catalog = catalog
        self.policy = policy or journal.RetryPolicy()
        self.database_url = settings.require_database()

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
            for tenant, meter, start, end, quantity, customer_id in rows:
                try:
                    if tenant not in customers:
                        customers[tenant] = customer_id or self._customer(conn, tenant)
                    sent = self._push(conn, result, tenant, meter, start, end, quantity,
                                      customers[tenant], now)
                    result.events_sent += sent
                except (BillingError, stripe.StripeError) as e:
                    reason = type(e).__name__
                    metrics.PUSH_ERRORS.labels("push_usage", reason).inc()
                    result.failed.append(f"{tenant} {meter} {start:%Y-%m-%d}: {e}")
        return result

    def _customer(self, conn: journal.Conn, tenant: str) -> str:
        key = f"tally-customer-{tenant}"
        return journal.call(
            conn, key=key, kind="customer", tenant_id=tenant, summary={"tenant": tenant},
            request=lambda k: stripe_api.create_customer(self.client, tenant, k),
            policy=self.policy,
        )

    def _ensure_meter(self, conn: journal.Conn, meter: str) -> None:
        spec = self.catalog.meters.get(meter)
        if spec is None:
            raise BillingError(f"meter {meter!r} is not in the plan catalog")
        journal.call(
            conn, key=f"tally-meter-{meter}", kind="meter", tenant_id="*",
            summary={"meter": meter, "aggregation": spec.aggregation},
            request=lambda k: stripe_api.create_meter(self.client, meter, spec.aggregation, k),
            policy=self.policy,
        )

    def _push(
        self, conn: journal.Conn, result: PushResult, tenant: str, meter: str,
        start: datetime, end: datetime, quantity: Decimal, customer_id: str, now: datetime,
    ) -> int:
        """Send what is unsent for one tenant, meter and period; return events sent."""
        self._ensure_meter(conn, meter)
        prefix = identifier(tenant, meter, start, 0).rsplit(":", 1)[0] + ":"
        sent_rows = conn.execute(
            "SELECT idempotency_key, status, request_summary FROM tally.stripe_pushes"
            " WHERE kind = 'meter_event' AND idempotency_key LIKE %s ORDER BY created_at",
            (prefix.replace("%", r"\%") + "%",),
        ).fetchall()
        sent = 0
        # 1. finish calls a crashed run left pending, with their own identifiers
        for key, status, summary in sent_rows:
            if status != "succeeded":
                self._send(conn, tenant, meter, customer_id, summary, key)
                sent += 1
        cumulative = max((int(s["cumulative"]) for _, _, s in sent_rows), default=0)
        last_value = next((int(s["value"]) for _, _, s in reversed(sent_rows)), None)
        # 2. the new delta (or the new gauge reading)
        total = int(quantity)
        gauge = self.catalog.meters[meter].aggregation in GAUGES
        value = total if gauge else total - cumulative
        if (gauge and total == last_value) or (not gauge and value <= 0) or total == 0:
            return sent
        timestamp = event_timestamp(start, end, now)
        if timestamp is None:
            raise BillingError(f"period {start:%Y-%m-%d} is older than Stripe accepts for "
                               "meter events; bill it as an invoice adjustment")
        key = identifier(tenant, meter, start, total)
        summary = {"meter": meter, "value": value, "cumulative": total, "timestamp": timestamp,
                   "period_start": start.isoformat()}
        self._send(conn, tenant, meter, customer_id, summary, key)
        result.pushed[(tenant, meter)] += value
        return sent + 1

    def _send(self, conn: journal.Conn, tenant: str, meter: str, customer_id: str,
              summary: dict[str, Any], key: str) -> None:
        journal.call(
            conn, key=key, kind="meter_event", tenant_id=tenant, summary=summary,
            request=lambda k: stripe_api.send_meter_event(
                self.client, meter, customer_id, int(summary["value"]),
                int(summary["timestamp"]), k),
            policy=self.policy,
        )


def run_push_usage(settings: Settings, now: datetime | None = None,
                   policy: journal.RetryPolicy | None = None) -> PushResult:
    catalog = asyncio.run(read_catalog(settings))
    if catalog is None:
        raise BillingError("no plan catalog on the plans topic: run `tally plans publish`")
    started = time.monotonic()
    result = UsagePusher(settings, catalog, policy).run(now)
    log.info("push-usage: %d events in %.1fs", result.events_sent, time.monotonic() - started)
    return result

