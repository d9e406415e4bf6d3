"""`tally jobs push-usage`: send each tenant's period usage to Stripe as meter events.

Stripe meter events add up, so Tally sends deltas: for every (tenant, meter, period) in
`usage_by_period`, what has not been sent yet. Gauge meters (a kind's `gauge`,
domain/meters.py) use Stripe's `last` formula and send each new reading itself — every
reading that differs from the one sent before, 0 and a return to an earlier value
included.

Each event's `identifier` (also its idempotency key) is a pure function of what it reports
(`stripe_ids.meter_event_identifier`): `tenant:meter:period_start:reading`, the reading
being the cumulative total for summed meters (`130`) and position and value for gauges
(`g3=5`), hashed to Stripe's 100 characters when longer. So a retry or a re-run after a
crash can never count twice while Stripe remembers the identifier, and late usage goes
out as a new delta with a new identifier rather than a change to a sent event.

Stripe remembers identifiers and keys for at least 24 hours, no promise beyond. An event
whose first try is older than that, or whose key holds a stored error, or that Stripe
rejected after accepting it (a meter error report, `webhooks.py`), is not sent again as
it was: the job reads Stripe's meter event summary for the period, works out which of
the period's unfinished events arrived (summed meters: how much of their total Stripe
has beyond the events known to have arrived; gauges: whether Stripe's last reading is
the newest one), marks those `succeeded` and the others `replaced`, and sends what is
missing as one event under a new identifier (`#n`). Stripe computes summaries
asynchronously, so it does this only once the period's last send is `summary_lag` old;
until then the period waits (reported, not failed).

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

from billing_jobs import journal, metrics, stripe_api, stripe_catalog, stripe_ids
from billing_jobs.errors import BillingError
from domain.meters import KINDS
from runtime.plans import read_catalog
from runtime.postgres import Connection, connect, migrate
from runtime.settings import Settings
from schemas.plans import Catalog

log = logging.getLogger(__name__)

STRIPE_MAX_AGE = timedelta(days=35)
SAFETY = timedelta(hours=1)
# How long after a period's last send its Stripe summary is trusted to include it.
SUMMARY_LAG = timedelta(minutes=10)
KIND = "meter_event"


@dataclass
class PushResult:
    """What one run sent, what it could not, and what waits for Stripe's summaries."""

    events_sent: int = 0
    pushed: dict[tuple[str, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    failed: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    found: int = 0  # unfinished events a summary showed had arrived

    def summary(self) -> str:
        lines = [f"meter events sent: {self.events_sent}"]
        lines += [f"  {t} {m}: {v}" for (t, m), v in sorted(self.pushed.items())]
        if self.found:
            lines.append(f"unfinished events found at Stripe: {self.found}")
        lines += [f"WAITING: {w}" for w in self.waiting]
        lines += [f"FAILED: {f}" for f in self.failed]
        return "\n".join(lines)


def identifier(tenant: str, meter: str, period_start: datetime, reading: int | str,
               generation: int = 0) -> str:
    """The deterministic meter event identifier (see the module docstring)."""
    return stripe_ids.meter_event_identifier(tenant, meter, period_start, str(reading),
                                             generation)


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
    series: str  # the journal's logical key: tenant, meter and period
    generation: int
    summary: dict[str, Any]
    resent: bool = False  # usage attempted before: not counted again in the result


@dataclass(frozen=True)
class Period:
    """One (tenant, meter, period) row of `usage_by_period`, with its Stripe ids."""

    tenant: str
    meter: str
    start: datetime
    end: datetime
    quantity: Decimal
    customer_id: str
    meter_id: str
    gauge: bool

    @property
    def series(self) -> str:
        return stripe_ids.meter_series(self.tenant, self.meter, self.start)


class UsagePusher:
    """Pushes every tenant's unsent usage; one tenant's failure does not stop the others.

    Concurrency: ONE call at a time per (customer, meter), as Stripe asks. The job is
    sequential: rows are read ordered by (tenant, meter, period) and each send finishes
    (journaled, retried) before the next starts; the stream mode sends one batch at a
    time. Two runs never overlap: the scheduler holds the job's advisory lock.
    """

    def __init__(self, settings: Settings, catalog: Catalog,
                 policy: journal.RetryPolicy | None = None, *, high_volume: bool = False,
                 create_missing: bool = True, summary_lag: timedelta = SUMMARY_LAG) -> None:
        self.policy = policy or journal.RetryPolicy()
        self.client = stripe_api.client(settings, self.policy.timeout)
        self.catalog = catalog
        self.database_url = settings.require_database()
        self.high_volume = high_volume
        self.create_missing = create_missing
        self.summary_lag = summary_lag
        self.now = datetime.now(UTC)  # the run's clock (`run(now)`)

    def run(self, now: datetime | None = None) -> PushResult:
        now = self.now = now or datetime.now(UTC)
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
                    meter_id = stripe_catalog.ensure_meter(
                        conn, self.client, self.catalog, meter, self.policy,
                        create=self.create_missing)
                    if tenant not in customers:
                        customers[tenant] = stripe_catalog.ensure_customer(
                            conn, self.client, tenant, customer_id, self.policy,
                            create=self.create_missing)
                    period = Period(tenant, meter, start, end, quantity, customers[tenant],
                                    meter_id, KINDS[self.catalog.meters[meter].aggregation].gauge)
                    sends += self._unsent(conn, period, now, result)
                except (BillingError, stripe.StripeError) as e:
                    self._failed(result, f"{tenant} {meter} {start:%Y-%m-%d}", e)
            if self.high_volume:
                self._stream(conn, result, sends, now)
            else:
                for send in sends:
                    try:
                        self._send(conn, send, now)
                        self._sent(result, [send])
                    except (BillingError, stripe.StripeError) as e:
                        self._failed(result, f"{send.tenant} {send.meter} {send.key}", e)
        return result

    @staticmethod
    def _sent(result: PushResult, sends: list[Send]) -> None:
        for send in sends:
            result.events_sent += 1
            if not send.resent:
                result.pushed[(send.tenant, send.meter)] += Decimal(send.summary["value"])

    @staticmethod
    def _failed(result: PushResult, what: str, e: Exception) -> None:
        metrics.PUSH_ERRORS.labels("push_usage", type(e).__name__).inc()
        result.failed.append(f"{what}: {e}")

    # -- what to send for one period ------------------------------------------------------

    def _unsent(self, conn: Connection, p: Period, now: datetime,
                result: PushResult) -> list[Send]:
        """What is unsent for one tenant, meter and period, oldest first:
        1. unfinished events Stripe still remembers, under their own identifiers;
        2. what a summary shows missing of events it may have forgotten or refused;
        3. the new delta (or the new gauge reading)."""
        rows = journal.series(conn, KIND, p.series)
        live = [r for r in rows if r.status != "replaced"]
        unfinished = [r for r in live if r.status != "succeeded"]
        fresh = [r for r in unfinished if r.resendable(now)]
        stale = [r for r in unfinished if not r.resendable(now)]
        sends = [self._again(p, r) for r in fresh]
        if stale:
            if fresh or not self._settled(rows, now) or not all(r.due(now) for r in stale):
                # A lookup now could miss events Stripe has not summed yet; a call failing
                # again and again waits longer between new keys (journal.retry_after).
                result.waiting.append(
                    f"{p.tenant} {p.meter} {p.start:%Y-%m-%d}: {len(stale)} unfinished "
                    "event(s) wait before a lookup of Stripe's summary")
                return sends
            sends += self._resolve(conn, p, live, stale, result)
        return sends + self._new(p, rows, now)

    def _settled(self, rows: list[journal.Row], now: datetime) -> bool:
        return all(r.last_tried_at <= now - self.summary_lag for r in rows)

    def _again(self, p: Period, row: journal.Row) -> Send:
        return Send(row.idempotency_key, p.tenant, p.meter, p.customer_id, p.series,
                    row.generation, row.request_summary, resent=True)

    def _resolve(self, conn: Connection, p: Period, live: list[journal.Row],
                 stale: list[journal.Row], result: PushResult) -> list[Send]:
        """Step 2 of `_unsent`: look up what Stripe has of the stale events."""
        if p.gauge and live[-1] not in stale:
            # Only the newest reading counts for `last`, and it arrived: older unfinished
            # readings are superseded by it, nothing to look up or send.
            for row in stale:
                journal.replace(conn, row.idempotency_key, live[-1].idempotency_key)
            return []
        stripe_has = journal.read(functools.partial(
            stripe_api.meter_total, self.client, p.meter_id, p.customer_id,
            _minute_floor(p.start), _minute_ceil(p.end)), self.policy)
        found = (_gauge_arrivals if p.gauge else _sum_arrivals)(live, stale, stripe_has)
        for row in found.arrived:
            journal.found_at_stripe(conn, row.idempotency_key, row.idempotency_key)
            result.found += 1
        if not found.missing:
            return []
        last = found.missing[-1]
        generation = max(r.generation for r in live) + 1
        key = identifier(p.tenant, p.meter, p.start, _reading(last.request_summary, p.gauge),
                         generation)
        if found.value <= 0:  # superseded gauge readings: the newest one arrived
            key = live[-1].idempotency_key
        for row in found.missing:
            journal.replace(conn, row.idempotency_key, key)
        if found.value <= 0:
            return []
        summary = {**last.request_summary, "value": int(found.value)}
        if datetime.fromtimestamp(int(summary["timestamp"]), UTC) < (
                self.now - STRIPE_MAX_AGE + SAFETY):
            raise BillingError(f"period {p.start:%Y-%m-%d}: {found.value} of its usage is "
                               "missing at Stripe and too old for meter events; bill it as "
                               "an invoice adjustment")
        return [Send(key, p.tenant, p.meter, p.customer_id, p.series, generation, summary,
                     resent=True)]

    def _new(self, p: Period, rows: list[journal.Row], now: datetime) -> list[Send]:
        """Step 3 of `_unsent`. Late usage of a period already pushed raises its total,
        so it goes out as one more delta with a new identifier."""
        total = int(p.quantity)
        summaries = [r.request_summary for r in rows]
        if p.gauge:
            readings = [s for s in summaries if "value" in s]
            newest = readings[-1] if readings else None
            if newest is not None and int(newest["value"]) == total:
                return []
            seq = max((int(s.get("reading", i + 1)) for i, s in enumerate(readings)),
                      default=0) + 1
            value, reading = total, f"g{seq}={total}"
            extra: dict[str, Any] = {"reading": seq}
        else:
            cumulative = max((int(s["cumulative"]) for s in summaries), default=0)
            value, reading, extra = total - cumulative, str(total), {}
            if value <= 0:
                return []
        timestamp = event_timestamp(p.start, p.end, now)
        if timestamp is None:
            raise BillingError(f"period {p.start:%Y-%m-%d} is older than Stripe accepts for "
                               "meter events; bill it as an invoice adjustment")
        summary = {"meter": p.meter, "value": value, "cumulative": total,
                   "timestamp": timestamp, "period_start": p.start.isoformat(), **extra}
        return [Send(identifier(p.tenant, p.meter, p.start, reading), p.tenant, p.meter,
                     p.customer_id, p.series, 0, summary)]

    # -- sending --------------------------------------------------------------------------

    def _send(self, conn: Connection, send: Send, now: datetime) -> None:
        journal.send_once(
            conn, key=send.key, logical_key=send.series, kind=KIND, tenant_id=send.tenant,
            summary=send.summary, generation=send.generation, now=now,
            request=lambda k: stripe_api.send_meter_event(
                self.client, send.meter, send.customer_id, int(send.summary["value"]),
                int(send.summary["timestamp"]), k),
            policy=self.policy,
        )

    def _stream(self, conn: Connection, result: PushResult, sends: list[Send],
                now: datetime) -> None:
        """`--high-volume`: the v2 meter event stream, up to 100 events per request.

        Same journal keys as the v1 path, so either mode finishes the other's crashed run.
        Stripe validates stream events asynchronously: an event it drops (say, for an
        unknown customer) is journaled as sent until its meter error report arrives
        (`webhooks.py`), and shows in `tally jobs reconcile`.
        """
        stream = stripe_api.MeterEventStream(self.client)
        for i in range(0, len(sends), stripe_api.STREAM_BATCH):
            batch = sends[i:i + stripe_api.STREAM_BATCH]
            events = [(s.meter, s.customer_id, int(s.summary["value"]),
                       int(s.summary["timestamp"]), s.key) for s in batch]
            try:
                journal.call_batch(
                    conn, kind=KIND, items=[(s.key, s.tenant, s.summary) for s in batch],
                    logical_keys=[s.series for s in batch],
                    request=functools.partial(stream.send, events),
                    policy=self.policy, now=now,
                )
                self._sent(result, batch)
            except (BillingError, stripe.StripeError) as e:
                self._failed(result, f"stream batch of {len(batch)} from {batch[0].key}", e)


def _reading(summary: dict[str, Any], gauge: bool) -> str:
    if gauge:
        return f"g{summary.get('reading', 0)}={summary['value']}"
    return str(summary["cumulative"])


def _value(row: journal.Row) -> Decimal:
    return Decimal(row.request_summary["value"])


@dataclass(frozen=True)
class Arrivals:
    """Which stale events a summary shows arrived, which are missing, and the value of
    the one event that makes up for the missing ones."""

    arrived: list[journal.Row]
    missing: list[journal.Row]
    value: Decimal


def _sum_arrivals(live: list[journal.Row], stale: list[journal.Row],
                  stripe_has: Decimal) -> Arrivals:
    """Summed meters: Stripe's total beyond the events known to have arrived is what
    arrived of the stale ones; they count as arrived oldest first while it covers them,
    and what it covers of the rest is subtracted from what is sent for them."""
    extra = stripe_has - sum((_value(r) for r in live if r.status == "succeeded"), Decimal(0))
    arrived: list[journal.Row] = []
    missing: list[journal.Row] = []
    for row in stale:
        if not missing and _value(row) <= extra:
            arrived.append(row)
            extra -= _value(row)
        else:
            missing.append(row)
    value = sum((_value(r) for r in missing), Decimal(0)) - max(extra, Decimal(0))
    return Arrivals(arrived, missing, value)


def _gauge_arrivals(live: list[journal.Row], stale: list[journal.Row],
                    stripe_has: Decimal) -> Arrivals:
    """Gauges, when the newest reading is stale: it arrived if Stripe's last reading is
    its value (consecutive readings differ; a first reading of 0 cannot be told from no
    reading, so it is sent again — harmless for `last`). Older stale readings are then
    superseded by it either way: they count as missing and are replaced by its resend,
    or by it."""
    newest = live[-1]
    older = [r for r in stale if r is not newest]
    succeeded_before = any(r.status == "succeeded" for r in live[:-1])
    if stripe_has == _value(newest) and (stripe_has != 0 or succeeded_before):
        return Arrivals([newest], older, Decimal(0))
    return Arrivals([], [*older, newest], _value(newest))


def _minute_floor(moment: datetime) -> int:
    return int(moment.timestamp()) // 60 * 60


def _minute_ceil(moment: datetime) -> int:
    return -(-int(moment.timestamp()) // 60) * 60


def load_catalog(settings: Settings) -> Catalog:
    """The current plan catalog, from the compacted plans topic."""
    catalog = asyncio.run(read_catalog(settings))
    if catalog is None:
        raise BillingError("no plan catalog on the plans topic: run `tally plans publish`")
    return catalog


def run_push_usage(settings: Settings, now: datetime | None = None,
                   policy: journal.RetryPolicy | None = None, *, high_volume: bool = False,
                   create_missing: bool = True, catalog: Catalog | None = None,
                   summary_lag: timedelta = SUMMARY_LAG) -> PushResult:
    """`tally jobs push-usage`: one pass over `usage_by_period`; safe to run again."""
    catalog = catalog or load_catalog(settings)
    started = time.monotonic()
    result = UsagePusher(settings, catalog, policy, high_volume=high_volume,
                         create_missing=create_missing, summary_lag=summary_lag).run(now)
    log.info("push-usage: %d events in %.1fs", result.events_sent, time.monotonic() - started)
    return result
