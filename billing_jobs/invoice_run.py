"""`tally jobs invoice --now T`: issue every invoice due at T, from the subscriptions.

The amounts are the billing model's (docs/billing.md, `domain/invoices.py`); this job is
its adapter. Per tenant, in one pass:

1. Know only what had reached Tally by the run's instant: the ledger's ingestion watermark
   caps T (an invoice counts the usage ingested up to its due time, so the job may only
   look at a time up to which the ledger holds every event), and only the subscription
   events whose record timestamp is at or before it are history.
2. `derive_subscriptions` of the history (its segments stored for finance in
   `subscription_segments`), then `invoices_due` with the tenant's usage, coupons and the
   ids of its invoices already issued: the new invoices due at T.
3. Store each (invoice + lines, one transaction, keyed by its id: `billing_store`). A
   zero total is stored as `no_charge` and never sent to Stripe.
4. Bill every stored `draft` through the Stripe side of `invoicing.py` (create, one item
   per line, finalize; idempotency keys derived from the invoice id, every call
   journaled on the run's clock, with a lookup at Stripe for a resume after any delay;
   collection method, Stripe status and the customer's copy stored). A negative total
   goes to Stripe as it is: finalizing it puts the credit on the customer's balance.

A tenant whose history cannot be billed (a `DomainError`: unknown plan, a period that is
neither a month nor a year, a contradicting event, a meter its plan lacks), or whose
history changed under an invoice already issued (a subscription event that reached Tally
after the invoice it affects: `LateHistoryError`), is journaled, counted in
`tally_billing_tenants_skipped_total` and skipped; every other tenant is invoiced.
Subscriptions billed by Stripe (`stripe_subscription_id` set) never get a Tally invoice.

Running it again at the same T changes nothing: the ids of stored invoices are passed in,
the model returns nothing new, and Stripe calls already journaled are not repeated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import stripe

from billing_jobs import billing_store, journal, metrics
from billing_jobs.errors import BillingError
from billing_jobs.invoicing import Invoicer
from billing_jobs.push_usage import load_catalog
from domain.cycles import whole_second
from domain.errors import DomainError
from domain.invoices import Invoice, UsageRecord, invoice_schedule, invoices_due
from domain.subscriptions import Subscription, derive_subscriptions
from runtime import read_models
from runtime.postgres import Connection, connect, migrate
from runtime.settings import Settings
from schemas.plans import Catalog

log = logging.getLogger(__name__)


class LateHistoryError(BillingError):
    """A subscription event reached Tally after an invoice it changes had been issued."""


@dataclass
class InvoiceRunResult:
    """What one run did; `failed` and `skipped` make the command exit 1."""

    now: datetime
    known_through: datetime  # `now`, capped by the ledger's ingestion watermark
    issued: list[Invoice] = field(default_factory=list)
    billed: dict[str, int] = field(default_factory=dict)  # invoice id -> total sent
    skipped: dict[str, str] = field(default_factory=dict)  # tenant -> why
    failed: list[str] = field(default_factory=list)  # Stripe side

    def summary(self) -> str:
        lines = [f"invoicing as of {self.known_through.isoformat()}"
                 + ("" if self.known_through == self.now else
                    f" (the ledger is complete only up to then; asked {self.now.isoformat()})"),
                 f"invoices issued: {len(self.issued)}"]
        lines += [f"  {i.invoice_id}: {i.total_cents / 100:.2f} {i.currency}"
                  for i in self.issued]
        lines.append(f"sent to Stripe: {len(self.billed)}")
        lines += [f"SKIPPED tenant {t}: {why}" for t, why in sorted(self.skipped.items())]
        return "\n".join(lines + [f"FAILED: {f}" for f in self.failed])


def run_invoices(settings: Settings, now: datetime, policy: journal.RetryPolicy | None = None,
                 *, catalog: Catalog | None = None,
                 create_missing: bool = True) -> InvoiceRunResult:
    """One pass of `tally jobs invoice` at `now` (see the module docstring)."""
    catalog = catalog or load_catalog(settings)
    policy = policy or journal.RetryPolicy()
    database_url = settings.require_database()
    migrate(database_url)
    with connect(database_url, autocommit=True) as conn:
        watermark = billing_store.ledger_complete_through(conn)
        # Nothing projected yet: no usage to wait for.
        known = now if watermark is None else min(now, watermark)
        result = InvoiceRunResult(now=now, known_through=known)
        for tenant in billing_store.billed_tenants(conn, known):
            try:
                due = _due(conn, tenant, catalog, known)
            except (DomainError, LateHistoryError) as e:
                _skip(conn, result, tenant, e)
                continue
            billing_store.forget_skip(conn, _skip_key(tenant))  # invoiceable again
            for invoice, subscription in due:
                interval = subscription.interval
                if billing_store.store_invoice(conn, invoice, _plan_of(invoice, subscription),
                                               interval, known):
                    result.issued.append(invoice)
        _bill_drafts(conn, settings, catalog, policy, create_missing, result)
    return result


def _due(conn: Connection, tenant: str, catalog: Catalog,
         known: datetime) -> list[tuple[Invoice, Subscription]]:
    """The tenant's new invoices due at `known`, each with its subscription."""
    history = [e for e in read_models.fetch(conn, read_models.subscription_history(tenant))
               if e.record_timestamp <= known]
    subscriptions = derive_subscriptions(tenant, [e.event for e in history], catalog)
    billing_store.store_segments(conn, tenant, [
        segment for s in subscriptions for segment in s.segments(catalog)])
    usage = read_models.fetch(conn, read_models.usage_records(tenant, known, UsageRecord))
    coupons = billing_store.redemptions(conn, tenant)
    issued = billing_store.issued_invoices(conn, tenant)
    def late_for(invoice: billing_store.IssuedInvoice) -> list[str]:
        """Events that reached Tally after `invoice` was issued and may change it."""
        return [e.event.id for e in history if e.record_timestamp > invoice.issued_by_run
                and whole_second(e.event.time) <= invoice.issued_at]

    affected = {i.invoice_id: i for i in issued if late_for(i)}
    if affected:
        # Events arrived after invoices they may change: issue nothing more for the tenant
        # if the history now gives those invoices other amounts.
        now_gives = {i.invoice_id: i.total_cents for i in invoice_schedule(
            tenant, subscriptions, catalog, usage, coupons, known)}
        changed = sorted(i for i, stored in affected.items()
                         if now_gives.get(i) != stored.total_cents)
        if changed:
            late = sorted({event for i in changed for event in late_for(affected[i])})
            raise LateHistoryError(
                f"subscription event(s) {', '.join(late)} reached Tally after invoice(s) "
                f"{', '.join(changed)} were issued and change them; the tenant is not "
                "invoiced until that is resolved by hand")
    new = invoices_due(tenant, subscriptions, catalog, usage, coupons,
                       {i.invoice_id for i in issued}, known)
    by_id = {s.subscription_id: s for s in subscriptions}
    return [(invoice, by_id[invoice.subscription_id]) for invoice in new]


def _plan_of(invoice: Invoice, subscription: Subscription) -> str:
    """The plan whose Stripe prices the invoice's lines refer to: the plan charged in
    advance on an opening invoice, else the plan in force up to the invoice's date."""
    if invoice.kind == "opening":
        return subscription.plan_at(invoice.issued_at)
    return subscription.plan_before(invoice.issued_at)


def _skip_key(tenant: str) -> str:
    return f"tally-billing-{tenant}"


def _skip(conn: Connection, result: InvoiceRunResult, tenant: str, error: Exception) -> None:
    """Journal why a tenant is not invoiced (until a run invoices it again), count it, and
    go on with the others."""
    kind = type(error).__name__
    metrics.BILLING_SKIPPED.labels(kind).inc()
    journal.record_failure(conn, key=_skip_key(tenant), kind="invoice",
                           tenant_id=tenant, summary={"tenant": tenant,
                                                      "as_of": result.known_through.isoformat()},
                           error=f"{kind}: {error}", reason="not_invoiced")
    log.error("invoice job: tenant %s skipped: %s: %s", tenant, kind, error)
    result.skipped[tenant] = f"{kind}: {error}"


def _bill_drafts(conn: Connection, settings: Settings, catalog: Catalog,
                 policy: journal.RetryPolicy, create_missing: bool,
                 result: InvoiceRunResult) -> None:
    """Send every stored draft to Stripe (new ones, and any a crashed run left)."""
    pending = billing_store.drafts(conn)
    if not pending:
        return
    try:
        # The journal's clock is the run's: a call a run left unfinished more than Stripe's
        # 24 hours before is looked up at Stripe before it is sent again.
        invoicer = Invoicer(settings, catalog, policy, create_missing=create_missing,
                            now=result.now)
    except BillingError as e:  # no Stripe configured: the invoices wait, stored as drafts
        result.failed += [f"{invoice_id}: {e}" for invoice_id, _, _ in pending]
        return
    for invoice_id, tenant, customer in pending:
        try:
            result.billed[invoice_id] = invoicer.bill(conn, invoice_id, tenant, customer)
        except (BillingError, stripe.StripeError) as e:
            metrics.PUSH_ERRORS.labels("invoice", type(e).__name__).inc()
            result.failed.append(f"{invoice_id}: {e}")


def parse_now(text: str | None) -> datetime:
    """`--now`: an ISO 8601 time (UTC when it names no offset); the clock when absent."""
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BillingError(f"--now {text!r} is not an ISO 8601 time "
                           "(e.g. 2026-02-01T01:00:00Z)") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
