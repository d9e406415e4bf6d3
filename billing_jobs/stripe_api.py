"""The Stripe adapter: a configured client and the calls Tally makes, typed by the SDK.

With `STRIPE_API_KEY` alone, calls go to real Stripe (use a test-mode key). With
`STRIPE_API_BASE` too, they go to that address (the Stripe double in dev and tests, or a
recording proxy in front of Stripe in `make test-stripe`).
The SDK's own retries are off: the journal retries, with the same idempotency key.

The API version is pinned (`API_VERSION`, sent as `Stripe-Version` on every request):
the stripe SDK's own, the one its types describe. Every parameter dict below is checked
by mypy against the SDK's generated `*Params` TypedDicts, and at run time the double
checks every request against Stripe's OpenAPI document, nested names included.

The lookups at the end (`find_*`) are what the journal asks before sending a call again
under a new key: what Stripe already has for it, found by Tally's metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import stripe
from stripe.params import (
    InvoiceCreateParams,
    InvoiceItemCreateParams,
    PriceCreateParams,
    PriceCreateParamsTier,
)
from stripe.params.v2.billing import MeterEventStreamCreateParams

from billing_jobs import stripe_ids
from billing_jobs.errors import BillingError
from domain.meters import KINDS
from runtime.settings import Settings
from runtime.stripe_client import API_VERSION as API_VERSION
from runtime.stripe_client import stripe_client

# Stripe's v2 stream takes at most this many events per request.
STREAM_BATCH = 100


def client(settings: Settings, timeout: float = 30.0) -> stripe.StripeClient:
    if not settings.stripe_api_key:
        raise BillingError("no Stripe: set STRIPE_API_KEY (a test-mode key, sk_test_...)")
    return stripe_client(settings, timeout)


def meter_event_name(meter: str) -> str:
    return f"tally_{meter}"


# --- customers, meters, prices -----------------------------------------------------------


def create_customer(c: stripe.StripeClient, tenant_id: str, key: str) -> stripe.Customer:
    return c.v1.customers.create(
        {"name": tenant_id, "metadata": stripe_ids.metadata({"tally_tenant_id": tenant_id})},
        {"idempotency_key": key},
    )


def meter_formula(aggregation: str) -> Literal["sum", "last"]:
    """Stripe's meter aggregation for a Tally kind: a gauge is sent as its current reading
    and keeps the last; any other kind is sent as deltas that add up."""
    return "last" if KINDS[aggregation].gauge else "sum"


def retrieve_customer(c: stripe.StripeClient, customer_id: str) -> stripe.Customer:
    return c.v1.customers.retrieve(customer_id)


def has_default_payment_method(customer: stripe.Customer) -> bool:
    """Can Stripe charge this customer without asking (`charge_automatically`)?"""
    settings = customer.invoice_settings
    return bool((settings and settings.default_payment_method) or customer.default_source)


def create_meter(c: stripe.StripeClient, meter: str, aggregation: str,
                 key: str) -> stripe.billing.Meter:
    return c.v1.billing.meters.create(
        {
            "display_name": f"Tally {meter}",
            "event_name": meter_event_name(meter),
            "default_aggregation": {"formula": meter_formula(aggregation)},
            "customer_mapping": {"event_payload_key": "stripe_customer_id",
                                 "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        },
        {"idempotency_key": key},
    )


def create_price(c: stripe.StripeClient, params: PriceCreateParams, key: str) -> stripe.Price:
    return c.v1.prices.create(params, {"idempotency_key": key})


def tier(up_to: Decimal | None, unit_cents: Decimal, flat_cents: Decimal) -> PriceCreateParamsTier:
    """One Stripe price tier; `up_to` None is the open last tier."""
    out: PriceCreateParamsTier = {
        "up_to": "inf" if up_to is None else int(up_to),
        "unit_amount_decimal": unit_cents,
    }
    if flat_cents:
        out["flat_amount_decimal"] = flat_cents
    return out


# --- meter events --------------------------------------------------------------------------


def send_meter_event(
    c: stripe.StripeClient, meter: str, customer_id: str, value: int, timestamp: int,
    identifier: str,
) -> stripe.billing.MeterEvent:
    """One meter event; its identifier is also its idempotency key. Stripe checks most of
    it later: a rejection arrives as a meter error report (`webhooks.py`)."""
    return c.v1.billing.meter_events.create(
        {
            "event_name": meter_event_name(meter),
            "payload": {"stripe_customer_id": customer_id, "value": str(value)},
            "identifier": identifier,
            "timestamp": timestamp,
        },
        {"idempotency_key": identifier},
    )


class MeterEventStream:
    """The v2 high-throughput path: a session token (15 minutes) and batches of events.

    Stripe validates stream events asynchronously and drops a repeated `identifier`, so
    resending a batch after an unknown outcome cannot count an event twice.
    """

    def __init__(self, c: stripe.StripeClient) -> None:
        self.client = c
        self.token: str | None = None

    def send(self, events: list[tuple[str, str, int, int, str]]) -> None:
        """Send (meter, customer id, value, timestamp, identifier) events in one request."""
        params: MeterEventStreamCreateParams = {"events": [
            {
                "event_name": meter_event_name(meter),
                "identifier": identifier,
                "payload": {"stripe_customer_id": customer, "value": str(value)},
                "timestamp": datetime.fromtimestamp(ts, UTC).isoformat(),
            }
            for meter, customer, value, ts, identifier in events
        ]}
        try:
            self._stream(params)
        except stripe.TemporarySessionExpiredError:
            self.token = None  # sessions last 15 minutes: open a new one and resend
            self._stream(params)

    def _stream(self, params: MeterEventStreamCreateParams) -> None:
        if self.token is None:
            self.token = self.client.v2.billing.meter_event_session.create().authentication_token
        self.client.v2.billing.meter_event_stream.create(params, {"api_key": self.token})


def meter_total(c: stripe.StripeClient, meter_id: str, customer_id: str, start: int,
                end: int) -> Decimal:
    """Stripe's aggregate of a meter for one customer over [start, end) (minute aligned):
    the sum for summed meters, the last reading for gauges."""
    page = c.v1.billing.meters.event_summaries.list(
        meter_id, {"customer": customer_id, "start_time": start, "end_time": end},
    )
    return sum((Decimal(str(s.aggregated_value)) for s in page.data), Decimal(0))


# --- invoices ------------------------------------------------------------------------------


CollectionMethod = Literal["charge_automatically", "send_invoice"]


def create_invoice(c: stripe.StripeClient, customer_id: str, currency: str,
                   metadata: dict[str, str], description: str, key: str, *,
                   collection: CollectionMethod = "charge_automatically",
                   days_until_due: int = 30) -> stripe.Invoice:
    params: InvoiceCreateParams = {
        "customer": customer_id,
        "currency": currency,
        # Only the items Tally adds to this invoice, never other pending ones.
        "pending_invoice_items_behavior": "exclude",
        "collection_method": collection,
        "auto_advance": False,  # Tally finalizes it once every item is on it
        "description": description,
        "metadata": stripe_ids.metadata(metadata),
    }
    if collection == "send_invoice":
        params["days_until_due"] = days_until_due  # Stripe emails it; due this many days on
    return c.v1.invoices.create(params, {"idempotency_key": key})


def invoice_item_params(
    *, customer_id: str, invoice_id: str, amount_cents: int, currency: str, description: str,
    period: tuple[int, int], metadata: dict[str, str],
) -> InvoiceItemCreateParams:
    """`period` is Tally's [start, end); Stripe's `period[end]` is inclusive, so it is
    sent one second before Tally's end."""
    return {
        "customer": customer_id,
        "invoice": invoice_id,
        "amount": amount_cents,
        "currency": currency,
        "description": description,
        "period": {"start": period[0], "end": max(period[0], period[1] - 1)},
        "metadata": stripe_ids.metadata(metadata),
    }


def create_invoice_item(c: stripe.StripeClient, params: InvoiceItemCreateParams,
                        key: str) -> stripe.InvoiceItem:
    return c.v1.invoice_items.create(params, {"idempotency_key": key})


def finalize_invoice(c: stripe.StripeClient, invoice_id: str, key: str) -> stripe.Invoice:
    # auto_advance: from here Stripe collects payment (and retries failed payments), or,
    # for `send_invoice`, emails the invoice.
    return c.v1.invoices.finalize_invoice(invoice_id, {"auto_advance": True},
                                          {"idempotency_key": key})


def retrieve_invoice(c: stripe.StripeClient, invoice_id: str) -> stripe.Invoice:
    return c.v1.invoices.retrieve(invoice_id)


def invoices_of(c: stripe.StripeClient, customer_id: str) -> Iterator[stripe.Invoice]:
    yield from c.v1.invoices.list({"customer": customer_id, "limit": 100}).auto_paging_iter()


# --- lookups: what Stripe already has, by Tally's metadata -----------------------------


def _tagged(obj: Any, metadata: dict[str, str]) -> bool:
    theirs = obj.metadata.to_dict() if obj.metadata is not None else {}
    return all(theirs.get(k) == v for k, v in stripe_ids.metadata(metadata).items())


def find_customer(c: stripe.StripeClient, tenant_id: str) -> str | None:
    """The customer Tally created for a tenant, by its `tally_tenant_id` metadata.
    (Customer search is eventually consistent: a customer created within the last
    minute may not be found yet; the journal looks only after a day or a stored error.)"""
    tag = stripe_ids.metadata({"tally_tenant_id": tenant_id})["tally_tenant_id"]
    query = f"metadata['tally_tenant_id']:'{tag}'"
    found = c.v1.customers.search({"query": query, "limit": 10}).data
    return found[0].id if found else None


def find_meter(c: stripe.StripeClient, meter: str) -> str | None:
    """The active meter with Tally's event name for `meter` (event names are unique among
    active meters)."""
    for m in c.v1.billing.meters.list({"status": "active", "limit": 100}).auto_paging_iter():
        if m.event_name == meter_event_name(meter):
            return m.id
    return None


def find_price(c: stripe.StripeClient, lookup_key: str, key: str) -> str | None:
    """The price created under journal key `key`, by its lookup key and metadata."""
    for price in c.v1.prices.list({"lookup_keys": [lookup_key], "limit": 100}).data:
        if _tagged(price, {"tally_price_key": key}):
            return price.id
    return None


def find_invoice(c: stripe.StripeClient, customer_id: str, tally_invoice_id: str) -> str | None:
    """The customer's Stripe invoice for a Tally invoice (`tally_invoice_id` metadata)."""
    for invoice in invoices_of(c, customer_id):
        if invoice.id and _tagged(invoice, {"tally_invoice_id": tally_invoice_id}):
            return invoice.id
    return None


def find_invoice_item(c: stripe.StripeClient, invoice_id: str, line_no: int) -> str | None:
    """The item for one Tally invoice line on a Stripe invoice (`tally_line_no` metadata)."""
    items = c.v1.invoice_items.list({"invoice": invoice_id, "limit": 100}).auto_paging_iter()
    for item in items:
        if _tagged(item, {"tally_line_no": str(line_no)}):
            return item.id
    return None
