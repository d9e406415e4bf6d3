"""Postgres for the subscription billing model: what the invoice job reads and writes.

Reads (the projector writes them, `projections/`): the ledger's ingestion watermark and
the tenants with a subscription history. The reads the API shares — a tenant's
subscription history, its ledger rows for billing, the stored invoices — are
`runtime.read_models`.
Owns: coupons and redemptions, and the invoices of the model (`invoices` with their
subscription, kind, date and due time; `invoice_lines` with kind and currency).

An invoice and its lines are written in one transaction, keyed by the invoice id, so a
rerun or a second job cannot store one twice (`store_invoice` returns False then).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from billing_jobs.errors import BillingError
from domain.invoices import CouponRedemption, Invoice
from domain.rating import Coupon
from domain.subscriptions import Segment
from runtime import read_models
from runtime.postgres import Connection, fetch_rows, fetch_value
from runtime.read_models import InvoiceView


class CouponError(BillingError):
    """A coupon that cannot be created or applied as asked."""


# --- reads: the history, the ledger, the watermark -------------------------------------


def ledger_complete_through(conn: Connection) -> datetime | None:
    """The ingestion time up to which the ledger holds every counted event: the least of
    the per-partition watermarks of the live projection (None: nothing projected yet)."""
    value = fetch_value(conn, "SELECT min(ingested_through) FROM tally.ingestion_watermarks")
    return value if isinstance(value, datetime) else None


def billed_tenants(conn: Connection, known_at: datetime) -> list[str]:
    """Every tenant with a subscription event that had reached Tally by `known_at`."""
    return [str(row[0]) for row in conn.execute(
        "SELECT DISTINCT tenant_id FROM tally.subscription_events"
        " WHERE record_timestamp <= %s ORDER BY tenant_id", (known_at,))]


def store_segments(conn: Connection, tenant: str, segments: Sequence[Segment]) -> None:
    """Replace the tenant's subscription segments (one transaction)."""
    with conn.transaction():
        conn.execute("DELETE FROM tally.subscription_segments WHERE tenant_id = %s", (tenant,))
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO tally.subscription_segments (tenant_id, subscription_id, plan_id,"
                " billing_interval, currency, status, valid_from, valid_to, trial_end,"
                " stripe_customer_id, stripe_subscription_id)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                [(tenant, s.subscription_id, s.plan_id, s.interval, s.currency, s.status,
                  s.valid_from, s.valid_to, s.trial_end, s.stripe_customer_id,
                  s.stripe_subscription_id) for s in segments])


def forget_skip(conn: Connection, key: str) -> None:
    """Drop the journal's record of why a tenant was not invoiced, once it is again: the
    journal lists what still needs a person (`tally jobs journal`)."""
    conn.execute("DELETE FROM tally.stripe_pushes WHERE logical_key = %s"
                 " AND status = 'failed'", (key,))


# --- coupons ------------------------------------------------------------------------------


def create_coupon(conn: Connection, coupon: Coupon) -> None:
    """Store a new coupon; CouponError if its code exists."""
    try:
        conn.execute(
            "INSERT INTO tally.coupons (code, percent_off, amount_off_cents, currency, duration,"
            " duration_in_months, valid_from, valid_until) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
            (coupon.code, coupon.percent_off, coupon.amount_off_cents, coupon.currency,
             coupon.duration, coupon.duration_in_months, coupon.valid_from,
             coupon.valid_until))
    except psycopg.errors.UniqueViolation as e:
        raise CouponError(f"coupon {coupon.code!r} exists already") from e


_COUPON_COLUMNS = ("c.code, c.percent_off, c.amount_off_cents, c.currency, c.duration,"
                   " c.duration_in_months, c.valid_from, c.valid_until")


def _coupon(row: Sequence[Any]) -> Coupon:
    code, percent, amount, currency, duration, months, valid_from, valid_until = row
    return Coupon(code=code, percent_off=percent, amount_off_cents=amount, currency=currency,
                  duration=duration, duration_in_months=months, valid_from=valid_from,
                  valid_until=valid_until)


def apply_coupon(conn: Connection, tenant: str, code: str, at: datetime) -> Coupon:
    """Redeem coupon `code` for `tenant` at `at` (docs/billing.md, rule 9)."""
    row = conn.execute(f"SELECT {_COUPON_COLUMNS} FROM tally.coupons c WHERE code = %s",
                       (code,)).fetchone()
    if row is None:
        raise CouponError(f"no coupon {code!r}: create it with `tally coupons create`")
    coupon = _coupon(row)
    if (coupon.valid_from and at < coupon.valid_from) or (
            coupon.valid_until and at >= coupon.valid_until):
        raise CouponError(f"coupon {code!r} cannot be redeemed at {at.isoformat()}: "
                          "outside its validity window")
    conn.execute("INSERT INTO tally.coupon_redemptions (tenant_id, code, redeemed_at)"
                 " VALUES (%s,%s,%s) ON CONFLICT DO NOTHING", (tenant, code, at))
    return coupon


def redemptions(conn: Connection, tenant: str) -> list[CouponRedemption]:
    """The tenant's coupon redemptions, oldest first."""
    rows = conn.execute(
        f"SELECT r.redeemed_at, {_COUPON_COLUMNS} FROM tally.coupon_redemptions r"
        " JOIN tally.coupons c USING (code) WHERE r.tenant_id = %s"
        " ORDER BY r.redeemed_at, c.code", (tenant,)).fetchall()
    return [CouponRedemption(_coupon(row[1:]), row[0]) for row in rows]


# --- invoices -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedInvoice:
    """What is stored of an invoice the model issued, enough to check it against a
    recomputation."""

    invoice_id: str
    issued_at: datetime
    issued_by_run: datetime
    total_cents: int


def issued_invoices(conn: Connection, tenant: str) -> list[IssuedInvoice]:
    return fetch_rows(
        conn, IssuedInvoice,
        "SELECT invoice_id, issued_at, issued_by_run, total_cents FROM tally.invoices"
        " WHERE tenant_id = %s AND kind IS NOT NULL ORDER BY issued_at, invoice_id", (tenant,))


def store_invoice(conn: Connection, invoice: Invoice, plan_id: str, interval: str,
                  run_at: datetime) -> bool:
    """Store an invoice and its lines in one transaction; False if it was stored already.

    A zero total is `no_charge` (never sent to Stripe); any other is a `draft` until the
    Stripe side of `invoicing.py` has billed it. `plan_id` / `interval` name the Stripe
    prices its lines refer to.
    """
    status = "draft" if invoice.total_cents else "no_charge"
    subtotal = sum(line.amount_cents for line in invoice.lines if line.kind != "discount")
    with conn.transaction():
        inserted = conn.execute(
            "INSERT INTO tally.invoices (invoice_id, tenant_id, period_start, period_end,"
            " currency, subtotal_cents, total_cents, status, plan_id, billing_interval,"
            " subscription_id, kind, issued_at, due_at, issued_by_run)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
            (invoice.invoice_id, invoice.tenant_id, invoice.period_start, invoice.period_end,
             invoice.currency, subtotal, invoice.total_cents, status, plan_id, interval,
             invoice.subscription_id, invoice.kind, invoice.issued_at, invoice.due_at,
             run_at)).rowcount
        if not inserted:
            return False
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO tally.invoice_lines (invoice_id, line_no, kind, meter, description,"
                " quantity, unit_amount_cents, amount_cents, currency)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                [(invoice.invoice_id, n, line.kind, line.meter, line.description,
                  line.quantity, line.unit_amount_cents, line.amount_cents, line.currency)
                 for n, line in enumerate(invoice.lines, 1)])
    return True


def drafts(conn: Connection) -> list[tuple[str, str, str | None]]:
    """(invoice id, tenant, Stripe customer) of every stored invoice not billed yet."""
    return [(str(i), str(t), c) for i, t, c in conn.execute(
        "SELECT i.invoice_id, i.tenant_id, s.stripe_customer_id FROM tally.invoices i"
        " LEFT JOIN tally.subscriptions s USING (tenant_id)"
        " WHERE i.status = 'draft' AND i.kind IS NOT NULL"
        " ORDER BY i.tenant_id, i.issued_at, i.invoice_id")]


def list_invoices(conn: Connection, tenant: str | None, issued_from: datetime | None,
                  issued_to: datetime | None) -> list[InvoiceView]:
    """Invoices by date (issued_from inclusive, issued_to exclusive), with their lines."""
    heads = read_models.fetch(conn, read_models.invoices(
        None if tenant is None else [tenant], issued_from=issued_from, issued_to=issued_to))
    return _with_lines(conn, heads)


def get_invoice(conn: Connection, invoice_id: str) -> InvoiceView | None:
    head = read_models.fetch(conn, read_models.invoice(invoice_id))
    return None if head is None else _with_lines(conn, [head])[0]


def _with_lines(conn: Connection, heads: list[InvoiceView]) -> list[InvoiceView]:
    return read_models.with_lines(heads, read_models.fetch(
        conn, read_models.invoice_lines([head.invoice_id for head in heads])))
