"""Invoice items and invoices (``/v1/invoiceitems``, ``/v1/invoices``).

An invoice's totals are computed from its items whenever it is rendered; finalizing
numbers it from its customer's sequence, applies the customer's balance and gives it a
``hosted_invoice_url`` and an ``invoice_pdf``, as in Stripe: a credit (negative balance)
reduces the amount due, and a negative total is added to the balance as a credit
(``starting_balance``, ``ending_balance``). An invoice with nothing due is paid on
finalization. A ``charge_automatically`` invoice finalized with ``auto_advance`` is
charged to the customer's default payment method — which always succeeds — and, for a
customer without one, the attempt fails and the invoice stays open and unpaid
(``attempted``, ``last_payment_error``), as at Stripe. ``send_invoice`` needs
``days_until_due`` or ``due_date``. An invoice item's ``period`` is inclusive at both ends.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal

from stripe_testkit.customers import find_customer
from stripe_testkit.errors import JSON, ApiError, missing, no_such
from stripe_testkit.params import (
    created_filter,
    get_bool,
    get_decimal,
    get_dict,
    get_enum,
    get_int,
    get_metadata,
    get_str,
    page,
    reject,
)
from stripe_testkit.state import DAY, Call, State, new_id

__all__ = [
    "create_invoice",
    "create_invoice_item",
    "finalize_invoice",
    "list_invoice_items",
    "list_invoice_lines",
    "list_invoices",
    "pay_invoice",
    "render_invoice",
    "retrieve_invoice",
    "retrieve_invoice_item",
    "void_invoice",
]


# ---------------------------------------------------------------------- invoice items


def create_invoice_item(state: State, call: Call) -> JSON:
    params = call.params
    reject(
        params,
        "price_data",
        "pricing",
        "subscription",
        "discounts",
        "tax_rates",
        "customer_account",
    )
    customer = find_customer(
        state, get_str(params, "customer", required=True) or "", param="customer"
    )
    amount = get_int(params, "amount")
    unit_amount = get_decimal(params, "unit_amount_decimal")
    quantity = get_int(params, "quantity")
    quantity_decimal = get_decimal(params, "quantity_decimal")
    if quantity is not None and quantity_decimal is not None:
        raise ApiError(
            400,
            "You may only specify one of these parameters: quantity, quantity_decimal.",
            param="quantity",
        )
    if amount is not None and unit_amount is not None:
        raise ApiError(
            400,
            "You may only specify one of these parameters: amount, unit_amount_decimal.",
            param="amount",
        )
    units = Decimal(quantity) if quantity is not None else quantity_decimal or Decimal(1)
    if amount is not None:
        if units != 1:
            # `amount` is the line's total; a quantity beside it would be ambiguous.
            raise ApiError(
                400, "quantity can only be used with unit_amount_decimal.", param="quantity"
            )
    elif unit_amount is not None:
        exponent = unit_amount.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -12:
            raise ApiError(
                400,
                "unit_amount_decimal can have at most 12 decimal places.",
                param="unit_amount_decimal",
            )
        # Stripe bills whole minor units: the line total is rounded, half up.
        amount = int((unit_amount * units).quantize(Decimal(1), ROUND_HALF_UP))
    else:
        raise missing("amount")
    currency = (get_str(params, "currency") or customer["currency"] or "").lower()
    if not currency:
        raise missing("currency")
    if not re.fullmatch(r"[a-z]{3}", currency):
        raise ApiError(400, f"Invalid currency: {currency}", param="currency")
    invoice_id = get_str(params, "invoice")
    if invoice_id is not None:
        invoice = _find_invoice(state, invoice_id, param="invoice")
        if invoice["customer"] != customer["id"]:
            raise ApiError(
                400, "The invoice belongs to a different customer.", param="invoice"
            )
        _require_draft(invoice, "add invoice items to")
        if invoice["currency"] != currency:
            raise ApiError(
                400,
                f"The invoice's currency is {invoice['currency']}, not {currency}.",
                param="currency",
            )
    period = get_dict(params, "period") or {}
    start, end = get_int(period, "start"), get_int(period, "end")
    if start is not None and end is not None and end < start:
        # Stripe's period is inclusive at both ends: end may equal start, not precede it.
        raise ApiError(400, "period[end] must be greater than or equal to period[start].",
                       param="period[end]")
    item: JSON = {
        "id": new_id("ii"),
        "object": "invoiceitem",
        "amount": amount,
        "currency": currency,
        "customer": customer["id"],
        "date": call.now,
        "description": get_str(params, "description"),
        "discountable": get_bool(params, "discountable") is not False,
        "discounts": [],
        "invoice": invoice_id,
        "livemode": False,
        "metadata": get_metadata(params),
        "net_amount": amount,
        "parent": None,
        "period": {
            "start": call.now if start is None else start,
            "end": call.now if end is None else end,
        },
        "pricing": None
        if unit_amount is None
        else {
            "price_details": None,
            "type": "price_details",
            "unit_amount_decimal": str(unit_amount),
        },
        "proration": False,
        "quantity": int(units),
        "quantity_decimal": str(units),
        "tax_rates": [],
        "test_clock": None,
    }
    customer["currency"] = customer["currency"] or currency
    state.invoice_items[item["id"]] = item
    return item


def retrieve_invoice_item(state: State, call: Call) -> JSON:
    item = state.invoice_items.get(call.path["id"])
    if item is None:
        raise no_such("invoiceitem", call.path["id"], "id", 404)
    return item


def list_invoice_items(state: State, call: Call) -> JSON:
    params = call.params
    customer, invoice = get_str(params, "customer"), get_str(params, "invoice")
    pending = get_bool(params, "pending")
    created = created_filter(params)
    found = [
        i
        for i in reversed(state.invoice_items.values())
        if (customer is None or i["customer"] == customer)
        and (invoice is None or i["invoice"] == invoice)
        and (pending is None or (i["invoice"] is None) == pending)
        and created(i)
    ]
    return page(found, params, "/v1/invoiceitems")


# --------------------------------------------------------------------------- invoices


def create_invoice(state: State, call: Call) -> JSON:
    params = call.params
    reject(
        params,
        "subscription",
        "from_invoice",
        "discounts",
        "customer_account",
        "default_tax_rates",
        "shipping_cost",
    )
    customer = find_customer(
        state, get_str(params, "customer", required=True) or "", param="customer"
    )
    collection = get_enum(
        params,
        "collection_method",
        ("charge_automatically", "send_invoice"),
        "charge_automatically",
    )
    days_until_due = get_int(params, "days_until_due")
    due_date = get_int(params, "due_date")
    if collection == "send_invoice" and days_until_due is None and due_date is None:
        raise missing("days_until_due")
    behavior = get_enum(
        params, "pending_invoice_items_behavior", ("include", "exclude"), "exclude"
    )
    currency = (get_str(params, "currency") or customer["currency"] or "usd").lower()
    invoice: JSON = {
        "id": new_id("in"),
        "object": "invoice",
        "created": call.now,
        "livemode": False,
        "customer": customer["id"],
        "customer_email": customer["email"],
        "customer_name": customer["name"],
        "status": "draft",
        "auto_advance": bool(get_bool(params, "auto_advance")),
        "collection_method": collection,
        "currency": currency,
        "days_until_due": days_until_due,
        "due_date": due_date,
        "description": get_str(params, "description"),
        "footer": get_str(params, "footer"),
        "metadata": get_metadata(params),
        "number": get_str(params, "number"),
        "period_start": call.now,
        "period_end": call.now,
        "effective_at": None,
        "attempted": False,
        "hosted_invoice_url": None,
        "invoice_pdf": None,
        "starting_balance": 0,
        "ending_balance": None,
        "status_transitions": {
            "finalized_at": None,
            "marked_uncollectible_at": None,
            "paid_at": None,
            "voided_at": None,
        },
        "amount_paid": 0,
        "attempt_count": 0,
        "last_payment_error": None,
    }
    state.invoices[invoice["id"]] = invoice
    if behavior == "include":
        for item in state.invoice_items.values():
            if (
                item["customer"] == customer["id"]
                and item["invoice"] is None
                and item["currency"] == currency
            ):
                item["invoice"] = invoice["id"]
    return render_invoice(state, invoice)


def retrieve_invoice(state: State, call: Call) -> JSON:
    return render_invoice(state, _find_invoice(state, call.path["id"], param="id", status=404))


def list_invoices(state: State, call: Call) -> JSON:
    params = call.params
    customer, status = get_str(params, "customer"), get_str(params, "status")
    collection = get_str(params, "collection_method")
    created = created_filter(params)
    found = [
        render_invoice(state, i)
        for i in reversed(state.invoices.values())
        if (customer is None or i["customer"] == customer)
        and (status is None or i["status"] == status)
        and (collection is None or i["collection_method"] == collection)
        and created(i)
    ]
    return page(found, params, "/v1/invoices")


def list_invoice_lines(state: State, call: Call) -> JSON:
    invoice = _find_invoice(state, call.path["id"], param="id", status=404)
    return page(_lines(state, invoice), call.params, f"/v1/invoices/{invoice['id']}/lines")


def finalize_invoice(state: State, call: Call) -> JSON:
    invoice = _find_invoice(state, call.path["id"], param="id", status=404)
    _require_draft(invoice, "finalize")
    auto_advance = get_bool(call.params, "auto_advance")
    if auto_advance is not None:
        invoice["auto_advance"] = auto_advance
    _finalize(state, invoice, call.now)
    return render_invoice(state, invoice)


def pay_invoice(state: State, call: Call) -> JSON:
    reject(call.params, "mandate", "payment_method", "source")
    invoice = _find_invoice(state, call.path["id"], param="id", status=404)
    if invoice["status"] == "draft":
        _finalize(state, invoice, call.now)  # Stripe finalizes a draft before paying it
    if invoice["status"] != "open":
        raise ApiError(
            400, f"Invoice is already {invoice['status']}.", code="invoice_not_editable"
        )
    _mark_paid(state, invoice, call.now)
    return render_invoice(state, invoice)


def void_invoice(state: State, call: Call) -> JSON:
    invoice = _find_invoice(state, call.path["id"], param="id", status=404)
    if invoice["status"] != "open":
        raise ApiError(
            400,
            f"You can only void an open invoice; this one is {invoice['status']}.",
            code="invoice_not_editable",
        )
    invoice["status"] = "void"
    invoice["status_transitions"]["voided_at"] = call.now
    return render_invoice(state, invoice)


def _find_invoice(state: State, invoice_id: str, *, param: str, status: int = 400) -> JSON:
    invoice = state.invoices.get(invoice_id)
    if invoice is None:
        raise no_such("invoice", invoice_id, param, status)
    return invoice


def _require_draft(invoice: JSON, action: str) -> None:
    if invoice["status"] != "draft":
        raise ApiError(
            400,
            f"You can only {action} a draft invoice; invoice "
            f"{invoice['id']} is {invoice['status']}.",
            code="invoice_not_editable",
        )


def _finalize(state: State, invoice: JSON, now: int) -> None:
    customer = state.customers[invoice["customer"]]
    if invoice["number"] is None:
        invoice["number"] = (
            f"{customer['invoice_prefix']}-{customer['next_invoice_sequence']:04d}"
        )
        customer["next_invoice_sequence"] += 1
    # The customer's balance is applied once, here: a credit pays (part of) the total, a
    # negative total becomes credit.
    starting = customer["balance"]
    applied = _totals(state, invoice)["total"] + starting
    invoice["starting_balance"] = starting
    invoice["ending_balance"] = min(applied, 0)
    customer["balance"] = min(applied, 0)
    invoice["status"] = "open"
    invoice["effective_at"] = now
    invoice["status_transitions"]["finalized_at"] = now
    # Stripe gives a finalized invoice its customer-facing page and PDF.
    invoice["hosted_invoice_url"] = f"https://invoice.stripe.test/i/{invoice['id']}"
    invoice["invoice_pdf"] = f"https://pay.stripe.test/invoice/{invoice['id']}/pdf"
    if invoice["collection_method"] == "send_invoice" and invoice["days_until_due"]:
        invoice["due_date"] = now + invoice["days_until_due"] * DAY
    if _totals(state, invoice)["amount_due"] == 0:
        _mark_paid(state, invoice, now)  # Stripe marks an invoice with nothing due paid
    elif invoice["collection_method"] == "charge_automatically" and invoice["auto_advance"]:
        _charge(state, invoice, customer, now)


def _charge(state: State, invoice: JSON, customer: JSON, now: int) -> None:
    """Stripe's automatic collection: the customer's default payment method is charged
    (always successfully here); without one, the attempt fails and the invoice stays
    open, unpaid, as at Stripe."""
    invoice["attempted"] = True
    invoice["attempt_count"] = invoice.get("attempt_count", 0) + 1
    default = customer["invoice_settings"]["default_payment_method"] or customer["default_source"]
    if default is None:
        invoice["last_payment_error"] = {
            "type": "invalid_request_error",
            "code": "invoice_no_customer_payment_method",
            "message": "The customer has no default payment method to charge.",
        }
        return
    _mark_paid(state, invoice, now)


def _mark_paid(state: State, invoice: JSON, now: int) -> None:
    invoice["status"] = "paid"
    invoice["amount_paid"] = _totals(state, invoice)["amount_due"]
    invoice["attempted"] = True
    invoice["status_transitions"]["paid_at"] = now


def _lines(state: State, invoice: JSON) -> list[JSON]:
    return [
        _line_item(item)
        for item in state.invoice_items.values()
        if item["invoice"] == invoice["id"]
    ]


def _totals(state: State, invoice: JSON) -> dict[str, int]:
    subtotal = sum(line["amount"] for line in _lines(state, invoice))
    # The customer's balance counts from finalization on; a negative total is credit.
    amount_due = max(subtotal + invoice["starting_balance"], 0)
    return {
        "subtotal": subtotal,
        "subtotal_excluding_tax": subtotal,
        "total": subtotal,
        "total_excluding_tax": subtotal,
        "amount_due": amount_due,
        "amount_remaining": amount_due - invoice["amount_paid"],
    }


def render_invoice(state: State, invoice: JSON) -> JSON:
    """The invoice as Stripe returns it: totals computed, first 10 lines embedded."""
    lines = _lines(state, invoice)
    return {
        **invoice,
        **_totals(state, invoice),
        "lines": {
            "object": "list",
            "data": lines[:10],
            "has_more": len(lines) > 10,
            "total_count": len(lines),
            "url": f"/v1/invoices/{invoice['id']}/lines",
        },
    }


def _line_item(item: JSON) -> JSON:
    return {
        "id": "il_" + item["id"].removeprefix("ii_"),
        "object": "line_item",
        "amount": item["amount"],
        "currency": item["currency"],
        "description": item["description"],
        "discount_amounts": [],
        "discountable": item["discountable"],
        "discounts": [],
        "invoice": item["invoice"],
        "livemode": False,
        "metadata": item["metadata"],
        "parent": {
            "type": "invoice_item_details",
            "subscription_item_details": None,
            "invoice_item_details": {
                "invoice_item": item["id"],
                "proration": False,
                "proration_details": {"credited_items": None},
                "subscription": None,
            },
        },
        "period": item["period"],
        "pricing": item["pricing"],
        "quantity": item["quantity"],
        "quantity_decimal": item["quantity_decimal"],
        "subtotal": item["amount"],
        "taxes": [],
    }
