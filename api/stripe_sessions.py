"""Stripe Checkout and customer portal sessions: the links a tenant follows to start or
upgrade a plan, and to manage its billing.

Checkout subscribes to the plan's fee price, found by the lookup key the catalog sync
gives it (`tally_<plan>_<interval>`, billing_jobs/stripe_catalog.py). The session and the
subscription it creates carry `tally_tenant_id` in their metadata, which is how the
webhook receiver maps Stripe's events back to the tenant. The portal needs the tenant's
Stripe customer, known from its subscription.
Both calls carry an idempotency key derived from the request, so a retried request within
Stripe's memory returns the same session.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import TypeVar

import stripe
from stripe.params.checkout import SessionCreateParams

from api.errors import ApiError, Conflict, Unavailable
from runtime.settings import Settings
from runtime.stripe_client import StripeNotConfigured, stripe_client

T = TypeVar("T")


def _key(*parts: str) -> str:
    return "tally-api-" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:48]


async def _call(settings: Settings, call: Callable[[stripe.StripeClient], T]) -> T:
    """Run a blocking SDK call off the event loop; Stripe's failures become answers."""
    try:
        client = stripe_client(settings, timeout=15)
    except StripeNotConfigured as e:
        raise Unavailable(str(e)) from e
    try:
        return await asyncio.to_thread(call, client)
    except stripe.InvalidRequestError as e:
        raise ApiError(f"Stripe refused the request: {e.user_message or e}") from e
    except stripe.StripeError as e:
        raise Unavailable(f"Stripe is unavailable: {e.user_message or e}") from e


async def checkout_session(settings: Settings, tenant: str, plan_id: str, interval: str,
                           customer: str | None, success_url: str, cancel_url: str
                           ) -> tuple[str, str]:
    """A Checkout session subscribing `tenant` to `plan_id`: (id, url)."""
    lookup_key = f"tally_{plan_id}_{interval}"

    def create(c: stripe.StripeClient) -> tuple[str, str]:
        prices = c.v1.prices.list({"lookup_keys": [lookup_key], "limit": 1}).data
        if not prices:
            raise Conflict(f"plan {plan_id!r} has no Stripe price for {interval}ly billing: "
                           "run `tally stripe sync-catalog`")
        metadata = {"tally_tenant_id": tenant, "tally_plan_id": plan_id}
        params: SessionCreateParams = {
            "mode": "subscription",
            "line_items": [{"price": prices[0].id, "quantity": 1}],
            "success_url": success_url,
            "cancel_url": cancel_url,
            "client_reference_id": tenant,
            "metadata": metadata,
            "subscription_data": {"metadata": metadata},
        }
        if customer is not None:
            params["customer"] = customer
        session = c.v1.checkout.sessions.create(params, {"idempotency_key": _key(
            "checkout", tenant, plan_id, interval, customer or "", success_url, cancel_url)})
        return session.id, session.url or ""

    return await _call(settings, create)


async def portal_session(settings: Settings, tenant: str, customer: str, return_url: str
                         ) -> tuple[str, str]:
    """A customer portal session of the tenant's Stripe customer: (id, url)."""

    def create(c: stripe.StripeClient) -> tuple[str, str]:
        session = c.v1.billing_portal.sessions.create(
            {"customer": customer, "return_url": return_url},
            {"idempotency_key": _key("portal", tenant, customer, return_url)})
        return session.id, session.url

    return await _call(settings, create)
