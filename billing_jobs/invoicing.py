"""The Stripe side of invoicing: a stored invoice becomes a finalized Stripe invoice.

What is invoiced, and for how much, is the billing model's (docs/billing.md); the invoice
job (`invoice_run.py`) stores each invoice and its lines in one transaction (status
`draft`, or `no_charge` for a zero total, which is never sent). `Invoicer.bill` then sends
a draft, each step resumable, so a crash anywhere is finished by the next run:
1. the stored lines are what every step sends, so a resumed run sends exactly the same
   parameters under the same idempotency keys;
2. create the Stripe invoice (key `tally-invoice-<invoice id>`), its id stored;
3. one invoice item per line (key `tally-invoiceitem-<invoice id>-<line no>`);
4. finalize (key `tally-finalize-<invoice id>`); store Stripe's status. From here the
   invoice is never changed: only `draft` invoices are billed. A negative total is
   finalized as it is: Stripe keeps the credit on the customer's balance.
Every call goes through the journal (`journal.py`). Stripe forgets idempotency keys after
24 hours, so a crashed run must be resumed within a day (the scheduler runs hourly).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from billing_jobs import journal, stripe_api, stripe_catalog
from runtime.postgres import Connection
from runtime.settings import Settings
from schemas.plans import Catalog

log = logging.getLogger(__name__)


class Invoicer:
    """Sends stored invoices to Stripe (`bill`), with the catalog's Stripe prices."""

    def __init__(self, settings: Settings, catalog: Catalog, policy: journal.RetryPolicy,
                 *, create_missing: bool = True) -> None:
        self.catalog = catalog
        self.policy = policy
        self.client = stripe_api.client(settings, policy.timeout)
        self.database_url = settings.require_database()
        self.create_missing = create_missing

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
        meta = {"tally_invoice_id": inv, "tally_tenant_id": tenant}
        stripe_invoice = journal.call(
            conn, key=f"tally-invoice-{inv}", kind="invoice", tenant_id=tenant,
            summary={"invoice": inv, "total_cents": total},
            request=lambda k: stripe_api.create_invoice(
                self.client, customer_id, currency, meta,
                f"Tally usage {start:%Y-%m-%d} to {end:%Y-%m-%d}", k),
            policy=self.policy)
        conn.execute("UPDATE tally.invoices SET stripe_invoice_id = %s, updated_at = now()"
                     " WHERE invoice_id = %s", (stripe_invoice, inv))
        period = (int(start.timestamp()), int(end.timestamp()))
        for line_no, _meter, description, amount in lines:
            params = stripe_api.invoice_item_params(
                customer_id=customer_id, invoice_id=stripe_invoice, amount_cents=amount,
                currency=currency, description=description, period=period,
                metadata={**meta, "tally_line_no": str(line_no),
                          "stripe_price_id": prices[line_no]})
            journal.call(
                conn, key=f"tally-invoiceitem-{inv}-{line_no}", kind="invoice_item",
                tenant_id=tenant, summary={"invoice": inv, "line_no": line_no, "amount": amount},
                request=functools.partial(stripe_api.create_invoice_item, self.client, params),
                policy=self.policy)
        journal.call(
            conn, key=f"tally-finalize-{inv}", kind="invoice_finalize", tenant_id=tenant,
            summary={"invoice": inv},
            request=lambda k: stripe_api.finalize_invoice(self.client, stripe_invoice, k),
            policy=self.policy)
        status = journal.read(
            functools.partial(stripe_api.retrieve_invoice, self.client, stripe_invoice),
            self.policy).status or "open"
        # The webhook may have recorded a later status (paid) already: never move back.
        conn.execute("UPDATE tally.invoices SET status = %s, updated_at = now()"
                     " WHERE invoice_id = %s AND status = 'draft'", (status, inv))
        return int(total)

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

