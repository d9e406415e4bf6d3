"""The Stripe side of invoicing: a stored invoice becomes a finalized Stripe invoice.

What is invoiced, and for how much, is the billing model's (docs/billing.md); the invoice
job (`invoice_run.py`) stores each invoice and its lines in one transaction (status
`draft`, or `no_charge` for a zero total, which is never sent). `Invoicer.bill` then sends
a draft, each step resumable, so a crash anywhere is finished by the next run:
1. the stored lines are what every step sends, so a resumed run sends exactly the same
   parameters under the same idempotency keys;
2. create the Stripe invoice (key `tally-invoice-<invoice id>`), its id stored. How
   Stripe collects it is decided once and stored (`tally.invoices.collection_method`):
   `charge_automatically` when the customer has a default payment method, else
   `send_invoice`, due `stripe_days_until_due` (a setting) after finalization;
3. one invoice item per line (key `tally-invoiceitem-<invoice id>-<line no>`); its
   `period` is the invoice's cycle [start, end) sent as Stripe's inclusive [start, end - 1s];
4. finalize (key `tally-finalize-<invoice id>`); store Stripe's status and the customer's
   copy (`hosted_invoice_url`, `invoice_pdf`). From here the invoice is never changed:
   only `draft` invoices are billed. A negative total is finalized as it is: Stripe keeps
   the credit on the customer's balance.
Every call goes through the journal (`journal.py`), on the clock in `Invoicer.now` (the
invoice job sets it to the run's time), with its lookup for a resume after any delay: a
call unfinished for over a day (Stripe may have forgotten its key) or whose key holds a
stored error is first looked up — the invoice among the customer's by its
`tally_invoice_id` metadata, an item among the invoice's by `tally_line_no`, a finalize by
the invoice's status — and only sent again, under a new key, when Stripe lacks it.
"""

from __future__ import annotations

import functools
import logging
from datetime import UTC, datetime
from typing import Any

from billing_jobs import invoice_records, journal, stripe_api, stripe_catalog
from runtime.postgres import Connection
from runtime.settings import Settings
from schemas.plans import Catalog

log = logging.getLogger(__name__)


def stripe_period(start: datetime, end: datetime) -> tuple[int, int]:
    """An invoice's [start, end) as unix seconds (Stripe's inclusive end is made from it
    by `stripe_api.invoice_item_params`)."""
    return int(start.timestamp()), int(end.timestamp())


class Invoicer:
    """Sends stored invoices to Stripe (`bill`), with the catalog's Stripe prices."""

    def __init__(self, settings: Settings, catalog: Catalog, policy: journal.RetryPolicy,
                 *, create_missing: bool = True, now: datetime | None = None) -> None:
        self.catalog = catalog
        self.policy = policy
        self.client = stripe_api.client(settings, policy.timeout)
        self.database_url = settings.require_database()
        self.create_missing = create_missing
        self.days_until_due = settings.stripe_days_until_due
        # The journal's clock: Stripe's 24 hours are counted on it (the job's run time).
        self.now = now or datetime.now(UTC)

    # -- steps 2-4 ------------------------------------------------------------------------

    def bill(self, conn: Connection, inv: str, tenant: str, customer: str | None) -> int:
        """Steps 2-4 for a stored `draft` invoice (its lines as stored); its total."""
        return self._bill(conn, inv, tenant, customer)

    def _bill(self, conn: Connection, inv: str, tenant: str, customer: str | None) -> int:
        head = conn.execute(
            "SELECT period_start, period_end, currency, total_cents, plan_id, billing_interval"
            " FROM tally.invoices WHERE invoice_id = %s", (inv,)).fetchone()
        assert head is not None
        start, end, currency, total, plan_id, interval = head
        lines = conn.execute(
            "SELECT line_no, meter, description, amount_cents FROM tally.invoice_lines"
            " WHERE invoice_id = %s ORDER BY line_no", (inv,)).fetchall()
        prices = self._prices(conn, inv, tenant, plan_id, interval, lines)
        customer_id = stripe_catalog.ensure_customer(conn, self.client, tenant, customer,
                                                     self.policy, create=self.create_missing)
        collection = self._collection(conn, inv, customer_id)
        meta = {"tally_invoice_id": inv, "tally_tenant_id": tenant}
        stripe_invoice = journal.call(
            conn, key=f"tally-invoice-{inv}", kind="invoice", tenant_id=tenant,
            summary={"invoice": inv, "total_cents": total, "collection_method": collection},
            request=lambda k: stripe_api.create_invoice(
                self.client, customer_id, currency, meta,
                f"Tally usage {start:%Y-%m-%d} to {end:%Y-%m-%d}", k,
                collection=collection, days_until_due=self.days_until_due),
            lookup=lambda: stripe_api.find_invoice(self.client, customer_id, inv),
            policy=self.policy, now=self.now)
        conn.execute("UPDATE tally.invoices SET stripe_invoice_id = %s, updated_at = now()"
                     " WHERE invoice_id = %s", (stripe_invoice, inv))
        for line_no, _meter, description, amount in lines:
            params = stripe_api.invoice_item_params(
                customer_id=customer_id, invoice_id=stripe_invoice, amount_cents=amount,
                currency=currency, description=description, period=stripe_period(start, end),
                metadata={**meta, "tally_line_no": str(line_no),
                          "stripe_price_id": prices[line_no]})
            journal.call(
                conn, key=f"tally-invoiceitem-{inv}-{line_no}", kind="invoice_item",
                tenant_id=tenant, summary={"invoice": inv, "line_no": line_no, "amount": amount},
                request=functools.partial(stripe_api.create_invoice_item, self.client, params),
                lookup=functools.partial(stripe_api.find_invoice_item, self.client,
                                         stripe_invoice, line_no),
                policy=self.policy, now=self.now)
        journal.call(
            conn, key=f"tally-finalize-{inv}", kind="invoice_finalize", tenant_id=tenant,
            summary={"invoice": inv},
            request=lambda k: stripe_api.finalize_invoice(self.client, stripe_invoice, k),
            lookup=lambda: self._finalized(stripe_invoice), policy=self.policy, now=self.now)
        self._record_outcome(conn, inv, stripe_invoice)
        return int(total)

    # -- the Stripe-call side, kept apart from what is billed ------------------------------

    def _collection(self, conn: Connection, inv: str,
                    customer_id: str) -> stripe_api.CollectionMethod:
        """How Stripe collects the invoice, decided once (see the module docstring)."""
        decided = invoice_records.decided_collection(conn, inv)
        if decided is None:
            customer = journal.read(
                functools.partial(stripe_api.retrieve_customer, self.client, customer_id),
                self.policy)
            decided = invoice_records.record_collection(
                conn, inv, "charge_automatically"
                if stripe_api.has_default_payment_method(customer) else "send_invoice")
        return "charge_automatically" if decided == "charge_automatically" else "send_invoice"

    def _finalized(self, stripe_invoice: str) -> str | None:
        """The lookup of a finalize: Stripe has it when the invoice is no longer a draft."""
        invoice = journal.read(
            functools.partial(stripe_api.retrieve_invoice, self.client, stripe_invoice),
            self.policy)
        return None if invoice.status == "draft" else stripe_invoice

    def _record_outcome(self, conn: Connection, inv: str, stripe_invoice: str) -> None:
        """Stripe's status of the finalized invoice and the customer's copy of it."""
        invoice = journal.read(
            functools.partial(stripe_api.retrieve_invoice, self.client, stripe_invoice),
            self.policy)
        invoice_records.record_links(conn, stripe_invoice, invoice.hosted_invoice_url,
                                     invoice.invoice_pdf)
        # The webhook may have recorded a later status (paid) already: never move back.
        conn.execute("UPDATE tally.invoices SET status = %s, updated_at = now()"
                     " WHERE invoice_id = %s AND status = 'draft'",
                     (invoice.status or "open", inv))

    def _prices(self, conn: Connection, inv: str, tenant: str, plan_id: str, interval: str,
                lines: list[Any]) -> dict[int, str]:
        """The Stripe price behind each line; a priced line without one stops this invoice.

        Lines with nothing to price (late usage of a meter without overage) get "".
        """
        specs = {(s.plan_id, s.item): s for s in stripe_catalog.price_specs(self.catalog)}
        prices: dict[int, str] = {}
        missing = set()
        for line_no, meter, _, _ in lines:
            item = meter or interval
            spec = specs.get((plan_id, item))
            price = None if spec is None else journal.succeeded_object(conn, spec.key())
            if price is None and (spec is not None or meter is None):
                missing.add(f"{plan_id}/{item}")
            prices[line_no] = price or ""
        if missing:
            error = (f"plan {plan_id!r} has no Stripe price for {', '.join(sorted(missing))}:"
                     " run `tally stripe sync-catalog`")
            journal.record_failure(conn, key=f"tally-invoice-{inv}", kind="invoice",
                                   tenant_id=tenant, summary={"invoice": inv}, error=error,
                                   reason="no_price")
            raise stripe_catalog.MissingStripeObject(error)
        return prices
