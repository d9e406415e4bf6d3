"""The Stripe adapter: a configured client and the few calls Tally makes.

With `STRIPE_API_KEY` alone, calls go to real Stripe (use a test-mode key). With
`STRIPE_API_BASE` too, they go to that address (the Stripe double in dev and tests).
The SDK's own retries are off: the journal retries, with the same idempotency key.
"""

from __future__ import annotations

from typing import Any

import stripe

from billing_jobs.errors import BillingError
from tally.settings import Settings

# Stripe meter aggregation for each Tally aggregation. Gauges report their latest reading.
METER_FORMULA = {"sum": "sum", "count": "sum", "unique_count": "last", "max": "last",
                 "latest": "last"}


def client(settings: Settings) -> stripe.StripeClient:
    if not settings.stripe_api_key:
        raise BillingError("no Stripe: set STRIPE_API_KEY (a test-mode key, sk_test_...)")
    bases: dict[str, str] = {}
    if settings.stripe_api_base:
        bases = {"api": settings.stripe_api_base, "meter_events": settings.stripe_api_base}
    return stripe.StripeClient(
        settings.stripe_api_key, base_addresses=bases,  # type: ignore[arg-type]
        max_network_retries=0,
    )


def meter_event_name(meter: str) -> str:
    return f"tally_{meter}"


def create_customer(c: stripe.StripeClient, tenant_id: str, key: str) -> Any:
    return c.v1.customers.create(
        {"name": tenant_id, "metadata": {"tally_tenant_id": tenant_id}},
        {"idempotency_key": key},
    )


def create_meter(c: stripe.StripeClient, meter: str, aggregation: str, key: str) -> Any:
    return c.v1.billing.meters.create(
        {
            "display_name": f"Tally {meter}",
            "event_name": meter_event_name(meter),
            "default_aggregation": {"formula": METER_FORMULA[aggregation]},
            "customer_mapping": {"event_payload_key": "stripe_customer_id",
                                 "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        },
        {"idempotency_key": key},
    )


def send_meter_event(
    c: stripe.StripeClient, meter: str, customer_id: str, value: int, timestamp: int,
    identifier: str,
) -> Any:
    return c.v1.billing.meter_events.create(
        {
            "event_name": meter_event_name(meter),
            "payload": {"stripe_customer_id": customer_id, "value": str(value)},
            "identifier": identifier,
            "timestamp": timestamp,
        },
        {"idempotency_key": identifier},
    )
