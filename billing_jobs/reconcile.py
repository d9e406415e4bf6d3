"""`tally jobs reconcile`: do Tally's totals and Stripe's agree?

Compares, read-only:
- usage: for every (tenant, meter, period) of `usage_by_period` whose tenant has a Stripe
  customer, the whole units Tally counted against Stripe's meter event summary for that
  customer, meter and period (sum meters: the total; gauges: the last reading);
- invoices: every invoice Tally sent against the Stripe invoice (total, and that Stripe
  has it finalized when Tally does).
A mismatch is printed as one line; the job exits non-zero when there is any. Periods
older than Stripe keeps meter events for (35 days) cannot be pushed and are skipped
with a note rather than reported as mismatches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import stripe

from billing_jobs import journal, metrics, stripe_api, stripe_catalog
from billing_jobs.push_usage import STRIPE_MAX_AGE
from runtime.postgres import connect, migrate
from runtime.settings import Settings


@dataclass
class ReconcileResult:
    checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        head = f"checked {self.checked}, mismatches {len(self.mismatches)}"
        return "\n".join([head, *[f"MISMATCH {m}" for m in self.mismatches],
                          *[f"note: {n}" for n in self.notes]])


def _minute_floor(moment: datetime) -> int:
    return int(moment.timestamp()) // 60 * 60


def _minute_ceil(moment: datetime) -> int:
    return -(-int(moment.timestamp()) // 60) * 60


def run_reconcile(settings: Settings, now: datetime | None = None,
                  policy: journal.RetryPolicy | None = None) -> ReconcileResult:
    now = now or datetime.now(UTC)
    policy = policy or journal.RetryPolicy()
    client = stripe_api.client(settings, policy.timeout)
    database_url = settings.require_database()
    migrate(database_url)
    result = ReconcileResult()
    with connect(database_url, autocommit=True) as conn:
        customers = {str(t): str(c) for t, c in conn.execute(
            "SELECT tenant_id, stripe_object_id FROM tally.stripe_pushes"
            " WHERE kind = 'customer' AND status = 'succeeded'")}
        customers.update({str(t): str(c) for t, c in conn.execute(
            "SELECT tenant_id, stripe_customer_id FROM tally.subscriptions"
            " WHERE stripe_customer_id IS NOT NULL")})
        meters: dict[str, str | None] = {}
        usage = conn.execute(
            "SELECT tenant_id, meter, period_start, period_end, quantity"
            " FROM tally.usage_by_period ORDER BY 1, 2, 3").fetchall()
        for tenant, meter, start, end, quantity in usage:
            what = f"usage {tenant} {meter} {start:%Y-%m-%d}"
            customer = customers.get(tenant)
            if meter not in meters:
                meters[meter] = journal.succeeded_object(conn, stripe_catalog.meter_key(meter))
            meter_id = meters[meter]
            if end < now - STRIPE_MAX_AGE + timedelta(hours=1):
                result.notes.append(f"{what}: older than Stripe meter events, not compared")
                continue
            result.checked += 1
            if customer is None or meter_id is None:
                if int(quantity):
                    result.mismatches.append(
                        f"{what}: Tally {int(quantity)}, Stripe has no "
                        f"{'customer' if customer is None else 'meter'}")
                continue
            try:
                theirs = journal.read(functools.partial(
                    stripe_api.meter_total, client, meter_id, customer, _minute_floor(start),
                    _minute_ceil(end)), policy)
            except stripe.StripeError as e:
                result.mismatches.append(f"{what}: cannot read Stripe's summary: {e}")
                continue
            if theirs != int(quantity):
                result.mismatches.append(f"{what}: Tally {int(quantity)}, Stripe {theirs}")
        invoices = conn.execute(
            "SELECT invoice_id, total_cents, status, stripe_invoice_id FROM tally.invoices"
            " WHERE stripe_invoice_id IS NOT NULL ORDER BY 1").fetchall()
        for inv, total, status, stripe_id in invoices:
            result.checked += 1
            try:
                theirs_inv = journal.read(
                    functools.partial(stripe_api.retrieve_invoice, client, stripe_id), policy)
            except stripe.StripeError as e:
                result.mismatches.append(f"invoice {inv}: cannot read {stripe_id}: {e}")
                continue
            if Decimal(theirs_inv.total) != total:
                result.mismatches.append(
                    f"invoice {inv}: Tally total {total}, Stripe {theirs_inv.total}")
            if status != "draft" and theirs_inv.status == "draft":
                result.mismatches.append(f"invoice {inv}: Tally {status}, Stripe still draft")
    metrics.RECONCILE_MISMATCHES.set(len(result.mismatches))
    return result
