"""Checkout sessions and customer portal sessions (``/v1/checkout/sessions``,
``/v1/billing_portal/sessions``): created, with the link the customer follows.

What the double checks beyond the OpenAPI document, as Stripe documents it: a
subscription-mode session needs ``line_items`` whose prices exist and are recurring, and
``success_url``; a customer named must exist; a portal session needs an existing customer.
The links point at the double's own (unserved) host: a test follows them no further.
"""

from __future__ import annotations

from stripe_testkit.customers import find_customer
from stripe_testkit.errors import JSON, ApiError, missing, no_such
from stripe_testkit.params import get_dict, get_enum, get_metadata, get_str
from stripe_testkit.state import Call, State, new_id

__all__ = ["create_checkout_session", "create_portal_session"]

_HOST = "https://stripe-double.invalid"


def create_checkout_session(state: State, call: Call) -> JSON:
    params = call.params
    mode = get_enum(params, "mode", ("payment", "setup", "subscription"), "payment")
    customer = get_str(params, "customer")
    if customer is not None:
        find_customer(state, customer, param="customer")
    items = params.get("line_items") or []
    if mode == "subscription":
        if not items:
            raise missing("line_items")
        if get_str(params, "success_url") is None:
            raise missing("success_url")
    for n, item in enumerate(items):
        price_id = item.get("price") if isinstance(item, dict) else None
        if price_id is None:
            raise missing(f"line_items[{n}][price]")
        price = state.prices.get(price_id)
        if price is None:
            raise no_such("price", price_id, f"line_items[{n}][price]")
        if mode == "subscription" and price.get("recurring") is None:
            raise ApiError(400, "You must provide at least one recurring price in "
                           "`subscription` mode when using prices.", param="line_items")
    session_id = new_id("cs_test")
    session: JSON = {
        "id": session_id,
        "object": "checkout.session",
        "created": call.now,
        "expires_at": call.now + 86_400,
        "livemode": False,
        "mode": mode,
        "status": "open",
        "payment_status": "unpaid",
        "customer": customer,
        "client_reference_id": get_str(params, "client_reference_id"),
        "success_url": get_str(params, "success_url"),
        "cancel_url": get_str(params, "cancel_url"),
        "metadata": get_metadata(params),
        "subscription": None,
        "subscription_data": get_dict(params, "subscription_data"),
        "url": f"{_HOST}/c/pay/{session_id}",
    }
    state.checkout_sessions[session_id] = session
    return session


def create_portal_session(state: State, call: Call) -> JSON:
    params = call.params
    customer = get_str(params, "customer", required=True)
    assert customer is not None
    find_customer(state, customer, param="customer")
    session_id = new_id("bps")
    session: JSON = {
        "id": session_id,
        "object": "billing_portal.session",
        "created": call.now,
        "livemode": False,
        "customer": customer,
        "return_url": get_str(params, "return_url"),
        "locale": get_str(params, "locale"),
        "configuration": get_str(params, "configuration"),
        "on_behalf_of": None,
        "flow": None,
        "url": f"{_HOST}/p/session/{session_id}",
    }
    state.portal_sessions[session_id] = session
    return session
