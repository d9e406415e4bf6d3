"""`tally jobs invoice`: rate each closed period and bill it through a Stripe invoice.

When: a period is invoiced once its end plus the catalog's longest meter lateness window
plus `settle` (time for the projector to catch up) has passed. Before that, late events
still count in the period itself (DESIGN.md guarantee 4).

The protocol, each step resumable, so a crash anywhere is finished by the next run:
1. Rate and store, in ONE Postgres transaction: `invoices` (status `draft`),
   `invoice_lines`, the usage the rating saw (`invoice_usage`) and the late usage carried
   from earlier invoices (`invoice_adjustments`). Unique on (tenant, period_start): a
   period is rated once, and the stored lines are what every later step sends, so a
   resumed run sends exactly the same parameters under the same idempotency keys.
2. Create the Stripe invoice (key `tally-invoice-<invoice id>`), its id stored.
3. One invoice item per line (key `tally-invoiceitem-<invoice id>-<line no>`).
4. Finalize (key `tally-finalize-<invoice id>`); store Stripe's status. From here the
   invoice is never changed: this job only touches `draft` invoices.
Every call goes through the journal (`journal.py`). Stripe forgets idempotency keys after
24 hours, so a crashed run must be resumed within a day (the scheduler runs hourly).

Corrections never change a finalized invoice:
- Adjustment events (the worker counts an event that missed its period's lateness window
  in the period open when it arrived, `adjustment=true`) are part of that later period's
  usage and rated with it, on its plan and allowance; the line says how much was late.
- Usage that reaches an already invoiced period afterwards (accepted within the lateness
  window but projected after invoicing) is the difference between `usage_by_period` and
  what was billed for it. It goes on the tenant's next invoice as its own line, priced as
  the difference it makes to that period's charge (so included units are honoured).
A period whose total is zero (free plans) is stored as `no_charge` and not sent to Stripe.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import stripe

from billing_jobs import journal, metrics, stripe_api, stripe_catalog
from billing_jobs.errors import BillingError
from billing_jobs.push_usage import load_catalog
from domain.periods import months_between
from domain.rating import Interval, InvoiceDraft, RatingError, rate_period
from runtime.postgres import Connection, connect, migrate
from runtime.settings import Settings
from schemas.plans import Catalog

log = logging.getLogger(__name__)

SETTLE = timedelta(minutes=5)


@dataclass(frozen=True)
class Line:
    """An invoice line as stored, and as sent to Stripe."""

    meter: str | None
    kind: str  # rating's line kinds, plus "adjustment"
    description: str
    quantity: Decimal
    unit_amount_cents: Decimal
    amount_cents: int


@dataclass
class InvoiceResult:
    rated: list[str] = field(default_factory=list)
    finalized: dict[str, int] = field(default_factory=dict)  # invoice id -> total cents
    failed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"periods rated: {len(self.rated)}", f"invoices finalized: {len(self.finalized)}"]
        lines += [f"  {i}: {c / 100:.2f}" for i, c in sorted(self.finalized.items())]
        return "\n".join(lines + [f"FAILED: {f}" for f in self.failed])


def invoice_id(tenant: str, period_start: datetime) -> str:
    return f"{tenant}:{period_start.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def interval_of(start: datetime, end: datetime) -> Interval:
    return "year" if months_between(start, end) >= 12 else "month"


def usage_amount(catalog: Catalog, plan_id: str, interval: Interval, meter: str,
                 quantity: Decimal) -> int:
    """What `quantity` of one meter costs in a period of `plan_id` (overage only)."""
    _, plan = catalog.plan(plan_id)
    draft = rate_period(plan, interval, {meter: quantity})
    return sum(line.amount_cents for line in draft.lines if line.kind == "usage"
               and line.meter == meter)


class Invoicer:
    def __init__(self, settings: Settings, catalog: Catalog, policy: journal.RetryPolicy,
                 *, create_missing: bool = True, settle: timedelta = SETTLE) -> None:
        self.catalog = catalog
        self.policy = policy
        self.client = stripe_api.client(settings, policy.timeout)
        self.database_url = settings.require_database()
        self.create_missing = create_missing
        lateness = max((m.lateness for m in catalog.meters.values()), default=timedelta(0))
        self.closed_after = lateness + settle

    def run(self, now: datetime) -> InvoiceResult:
        result = InvoiceResult()
        migrate(self.database_url)
        with connect(self.database_url, autocommit=True) as conn:
            for tenant, start, end, plan_id in self._closed_periods(conn, now):
                try:
                    self._rate_and_store(conn, tenant, start, end, plan_id)
                    result.rated.append(invoice_id(tenant, start))
                except (BillingError, RatingError) as e:
                    self._failed(conn, result, invoice_id(tenant, start), tenant, e)
            drafts = conn.execute(
                "SELECT i.invoice_id, i.tenant_id, s.stripe_customer_id FROM tally.invoices i"
                " LEFT JOIN tally.subscriptions s USING (tenant_id)"
                " WHERE i.status = 'draft' ORDER BY i.tenant_id, i.period_start").fetchall()
            for inv, tenant, customer in drafts:
                try:
                    result.finalized[inv] = self._bill(conn, inv, tenant, customer)
                except (BillingError, stripe.StripeError) as e:
                    self._failed(conn, result, inv, tenant, e)
        return result

    @staticmethod
    def _failed(conn: Connection, result: InvoiceResult, inv: str, tenant: str,
                e: Exception) -> None:
        metrics.PUSH_ERRORS.labels("invoice", type(e).__name__).inc()
        if isinstance(e, RatingError):  # no Stripe call was made: journal why
            journal.record_failure(conn, key=f"tally-invoice-{inv}", kind="invoice",
                                   tenant_id=tenant, summary={"invoice": inv},
                                   error=f"RatingError: {e}", reason="rating_error")
        result.failed.append(f"{inv}: {e}")

    def _closed_periods(self, conn: Connection,
                        now: datetime) -> list[tuple[str, datetime, datetime, str]]:
        rows = conn.execute(
            "SELECT u.tenant_id, u.period_start, max(u.period_end), max(u.plan_id)"
            " FROM tally.usage_by_period u WHERE NOT EXISTS (SELECT 1 FROM tally.invoices i"
            "  WHERE i.tenant_id = u.tenant_id AND i.period_start = u.period_start)"
            " GROUP BY u.tenant_id, u.period_start HAVING max(u.period_end) <= %s"
            " ORDER BY u.tenant_id, u.period_start", (now - self.closed_after,),
        ).fetchall()
        return [(str(t), s, e, str(p)) for t, s, e, p in rows]

    # -- step 1 ---------------------------------------------------------------------------

    def _rate_and_store(self, conn: Connection, tenant: str, start: datetime, end: datetime,
                        plan_id: str) -> None:
        inv = invoice_id(tenant, start)
        interval = interval_of(start, end)
        plan_id, plan = self.catalog.plan(plan_id)
        with conn.transaction():
            usage = {str(m): q for m, q in conn.execute(
                "SELECT meter, quantity FROM tally.usage_by_period"
                " WHERE tenant_id = %s AND period_start = %s", (tenant, start))}
            late = {str(m): q for m, q in conn.execute(
                "SELECT meter, sum(quantity) FROM tally.usage_events WHERE tenant_id = %s"
                " AND period_start = %s AND adjustment GROUP BY meter", (tenant, start))}
            # Usage of a meter the plan does not price raises RatingError: unbilled usage is
            # reported (journal, metric), never dropped.
            draft = rate_period(plan, interval, usage)
            lines = self._lines(draft, late)
            adjustments = self._carried(conn, tenant, start)
            lines += [a[3] for a in adjustments]
            total = sum(line.amount_cents for line in lines)
            status = "draft" if any(line.amount_cents for line in lines) else "no_charge"
            inserted = conn.execute(
                "INSERT INTO tally.invoices (invoice_id, tenant_id, period_start, period_end,"
                " currency, subtotal_cents, total_cents, status, plan_id, billing_interval)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                (inv, tenant, start, end, draft.currency, total + draft.discount_cents, total,
                 status, plan_id, interval)).rowcount
            if not inserted:
                return  # another run stored it first; its lines are the ones billed
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO tally.invoice_lines (invoice_id, line_no, meter, description,"
                    " quantity, unit_amount_cents, amount_cents) VALUES (%s,%s,%s,%s,%s,%s,%s)",
                    [(inv, n, ln.meter, ln.description, ln.quantity, ln.unit_amount_cents,
                      ln.amount_cents) for n, ln in enumerate(lines, 1)])
                cur.executemany(
                    "INSERT INTO tally.invoice_usage (invoice_id, meter, quantity)"
                    " VALUES (%s,%s,%s)", [(inv, m, q) for m, q in usage.items()])
                cur.executemany(
                    "INSERT INTO tally.invoice_adjustments (invoice_id, source_invoice_id,"
                    " meter, quantity, amount_cents) VALUES (%s,%s,%s,%s,%s)",
                    [(inv, src, m, q, ln.amount_cents) for src, m, q, ln in adjustments])

    @staticmethod
    def _lines(draft: InvoiceDraft, late: dict[str, Decimal]) -> list[Line]:
        out = []
        for ln in draft.lines:
            description = ln.description
            if ln.kind == "usage" and late.get(ln.meter):
                description += f" (includes {late[ln.meter]} late from earlier periods)"
            meter = ln.meter if ln.kind == "usage" else None
            out.append(Line(meter, ln.kind, description, ln.quantity, ln.unit_amount_cents,
                            ln.amount_cents))
        return out

    def _carried(self, conn: Connection, tenant: str,
                 before: datetime) -> list[tuple[str, str, Decimal, Line]]:
        """Usage that reached the tenant's invoiced periods after they were rated."""
        rows = conn.execute(
            "SELECT i.invoice_id, i.period_start, i.plan_id, i.billing_interval, u.meter,"
            " u.quantity, coalesce(b.quantity, 0) + coalesce((SELECT sum(a.quantity)"
            "   FROM tally.invoice_adjustments a WHERE a.source_invoice_id = i.invoice_id"
            "   AND a.meter = u.meter), 0)"
            " FROM tally.invoices i JOIN tally.usage_by_period u"
            "  ON u.tenant_id = i.tenant_id AND u.period_start = i.period_start"
            " LEFT JOIN tally.invoice_usage b"
            "  ON b.invoice_id = i.invoice_id AND b.meter = u.meter"
            " WHERE i.tenant_id = %s AND i.period_start < %s ORDER BY i.period_start, u.meter",
            (tenant, before)).fetchall()
        carried = []
        for src, src_start, plan_id, interval, meter, now_q, billed in rows:
            if now_q <= billed:
                continue
            delta = now_q - billed
            _, plan = self.catalog.plan(plan_id)
            amount = 0
            if meter in plan.meters:
                amount = (usage_amount(self.catalog, plan_id, interval, meter, now_q)
                          - usage_amount(self.catalog, plan_id, interval, meter, billed))
            line = Line(meter, "adjustment",
                        f"Late usage of {meter} for the period from {src_start:%Y-%m-%d}:"
                        f" {delta} more after invoicing", delta, Decimal(0), amount)
            carried.append((str(src), str(meter), delta, line))
        return carried

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


def run_invoice(settings: Settings, now: datetime | None = None,
                policy: journal.RetryPolicy | None = None, *, catalog: Catalog | None = None,
                create_missing: bool = True, settle: timedelta = SETTLE) -> InvoiceResult:
    """`tally jobs invoice`: one pass; safe to run again (see the module docstring)."""
    catalog = catalog or load_catalog(settings)
    return Invoicer(settings, catalog, policy or journal.RetryPolicy(),
                    create_missing=create_missing, settle=settle).run(now or datetime.now(UTC))
