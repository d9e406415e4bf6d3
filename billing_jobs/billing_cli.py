"""`tally invoices list/show` and `tally coupons create/apply`: the subscription billing
model's invoices as issued, with what Stripe says of each (status, collection method, the
customer's hosted page and PDF), and the coupons it applies (docs/billing.md, rules 3
and 9)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from runtime.commands import Subparsers, add_group, settings


def _time(text: str | None, option: str) -> datetime | None:
    from billing_jobs.errors import BillingError

    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BillingError(f"{option} {text!r} is not an ISO 8601 time") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace(
        "+00:00", "Z")


def invoice_json(view: Any) -> dict[str, Any]:
    """One invoice as `tally invoices list --json` prints it (a
    `runtime.read_models.InvoiceView`)."""
    return {
        "id": view.invoice_id, "tenant": view.tenant_id, "subscription": view.subscription_id,
        "kind": view.kind, "issued_at": _iso(view.issued_at), "due_at": _iso(view.due_at),
        "cycle_start": _iso(view.period_start), "cycle_end": _iso(view.period_end),
        "currency": view.currency, "status": view.status,
        "stripe_invoice_id": view.stripe_invoice_id,
        "collection_method": view.collection_method,
        "hosted_invoice_url": view.hosted_invoice_url, "invoice_pdf": view.invoice_pdf,
        "lines": [{"kind": ln.kind, "description": ln.description, "meter": ln.meter,
                   "quantity": str(ln.quantity), "amount_cents": ln.amount_cents}
                  for ln in view.lines],
        "total_cents": view.total_cents,
    }


def _money(cents: int, currency: str) -> str:
    sign = "-" if cents < 0 else ""
    return f"{sign}{abs(cents) / 100:,.2f} {currency.upper()}"


def format_invoice(view: Any) -> str:
    """An invoice as text: its head, one line per invoice line, the total, and what Stripe
    has of it (its id, how it is collected, the customer's hosted page and PDF)."""
    when = view.issued_at or view.period_end
    head = (f"{view.invoice_id}  {view.kind or 'invoice'}  {when:%Y-%m-%d %H:%M}  "
            f"tenant {view.tenant_id}  cycle {view.period_start:%Y-%m-%d} to "
            f"{view.period_end:%Y-%m-%d}  {view.status}")
    rows = [head]
    rows += [f"    {ln.amount_cents / 100:>12,.2f}  {ln.description}" for ln in view.lines]
    rows.append(f"    {'total ' + _money(view.total_cents, view.currency):>12}")
    if view.stripe_invoice_id or view.collection_method:
        rows.append(f"    stripe={view.stripe_invoice_id or '-'}"
                    f" collection={view.collection_method or '-'}")
    if view.hosted_invoice_url or view.invoice_pdf:
        rows.append(f"    hosted: {view.hosted_invoice_url or '-'}")
        rows.append(f"    pdf:    {view.invoice_pdf or '-'}")
    return "\n".join(rows)


def _list(args: argparse.Namespace) -> int:
    from billing_jobs.billing_store import list_invoices
    from runtime.postgres import connect, migrate
    from schemas.codec import dumps

    url = settings().require_database()
    migrate(url)
    with connect(url) as conn:
        views = list_invoices(conn, args.tenant, _time(args.issued_from, "--from"),
                              _time(args.issued_to, "--to"))
    for view in views:
        print(dumps(invoice_json(view)).decode() if args.json else format_invoice(view))
    return 0


def _show(args: argparse.Namespace) -> int:
    from billing_jobs.billing_store import get_invoice
    from billing_jobs.errors import BillingError
    from runtime.postgres import connect, migrate
    from schemas.codec import dumps

    url = settings().require_database()
    migrate(url)
    with connect(url) as conn:
        view = get_invoice(conn, args.invoice_id)
    if view is None:
        raise BillingError(f"no invoice {args.invoice_id!r}")
    print(dumps(invoice_json(view)).decode() if args.json else format_invoice(view))
    return 0


def _coupon_create(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from billing_jobs.billing_store import CouponError, create_coupon
    from domain.rating import Coupon
    from runtime.postgres import connect, migrate
    from schemas.plans import format_validation_error

    try:
        percent = None if args.percent_off is None else Decimal(args.percent_off)
        coupon = Coupon(
            code=args.code, percent_off=percent, amount_off_cents=args.amount_off_cents,
            currency=args.currency, duration=args.duration,
            duration_in_months=args.months, valid_from=_time(args.valid_from, "--valid-from"),
            valid_until=_time(args.valid_until, "--valid-until"))
    except InvalidOperation:
        raise CouponError(f"--percent-off {args.percent_off!r} is not a number") from None
    except ValidationError as e:
        raise CouponError(format_validation_error(e).replace("\n", "; ")) from None
    url = settings().require_database()
    migrate(url)
    with connect(url, autocommit=True) as conn:
        create_coupon(conn, coupon)
    print(f"coupon {coupon.code} created")
    return 0


def _coupon_apply(args: argparse.Namespace) -> int:
    from billing_jobs.billing_store import apply_coupon
    from runtime.postgres import connect, migrate

    at = _time(args.at, "--at") or datetime.now(UTC)
    url = settings().require_database()
    migrate(url)
    with connect(url, autocommit=True) as conn:
        apply_coupon(conn, args.tenant, args.code, at)
    print(f"coupon {args.code} applied to {args.tenant} from {_iso(at)}", file=sys.stdout)
    return 0


def register_billing(sub: Subparsers) -> None:
    invoices = add_group(sub, "invoices", "the invoices Tally issued")
    listing = invoices.add_parser("list", help="invoices by tenant and date, with their "
                                  "Stripe status and links")
    listing.add_argument("--tenant")
    listing.add_argument("--from", dest="issued_from", metavar="TIME",
                         help="issued at or after (ISO 8601)")
    listing.add_argument("--to", dest="issued_to", metavar="TIME",
                         help="issued before (ISO 8601)")
    listing.add_argument("--json", action="store_true", help="one JSON object per invoice")
    listing.set_defaults(func=_list)
    show = invoices.add_parser("show", help="one invoice with its lines, its Stripe status, "
                               "collection method and the customer's copy (hosted page, PDF)")
    show.add_argument("invoice_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)

    coupons = add_group(sub, "coupons", "coupons and their redemptions")
    create = coupons.add_parser("create", help="a percent or amount off, once, for N cycles "
                                "or forever")
    create.add_argument("code")
    off = create.add_mutually_exclusive_group(required=True)
    off.add_argument("--percent-off", metavar="PERCENT")
    off.add_argument("--amount-off-cents", type=int, metavar="CENTS")
    create.add_argument("--currency", default="usd", choices=["usd", "eur", "gbp"],
                        help="of --amount-off-cents")
    create.add_argument("--duration", required=True, choices=["once", "repeating", "forever"])
    create.add_argument("--months", type=int, help="cycles a repeating coupon lasts")
    create.add_argument("--valid-from", metavar="TIME")
    create.add_argument("--valid-until", metavar="TIME")
    create.set_defaults(func=_coupon_create)
    apply = coupons.add_parser("apply", help="redeem a coupon for a tenant")
    apply.add_argument("code")
    apply.add_argument("--tenant", required=True)
    apply.add_argument("--at", metavar="TIME", help="when it is redeemed (default: now)")
    apply.set_defaults(func=_coupon_apply)
