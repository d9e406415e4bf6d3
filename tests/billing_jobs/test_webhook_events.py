"""The webhook receiver's part in issue 16: invoice links from `invoice.finalized` /
`invoice.paid`, and meter error reports (thin events, `POST /stripe/events`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import stripe
from aiohttp.test_utils import TestClient, TestServer
from stripe_testkit import StripeDouble
from stripe_testkit.server import sign

from billing_jobs.webhooks import WebhookReceiver
from runtime.settings import Settings
from tests.billing_jobs.conftest import sql
from tests.billing_jobs.test_webhooks import SECRET, event, signed

THIN_SECRET = "whsec_thin_events"


def post(settings: Settings, *requests: tuple[str, str, dict[str, str]]) -> list[tuple[int, Any]]:
    """POST each (path, body, headers) to a running receiver; the (status, JSON) answers."""

    async def run() -> list[tuple[int, Any]]:
        receiver = WebhookReceiver(settings, SECRET, thin_secret=THIN_SECRET)
        async with TestClient(TestServer(receiver.app())) as client:
            answers = []
            for path, body, headers in requests:
                response = await client.post(path, data=body, headers=headers)
                answers.append((response.status, await response.json()))
            return answers

    return asyncio.run(run())


def test_invoice_finalized_and_paid_webhooks_store_the_customers_copy(
    settings_factory: Callable[..., Settings], db: str,
) -> None:
    settings = settings_factory(database_url=db)
    sql(db, "INSERT INTO tally.invoices (invoice_id, tenant_id, period_start, period_end,"
            " currency, subtotal_cents, total_cents, status, stripe_invoice_id)"
            " VALUES ('acme:1', 'acme', now(), now(), 'usd', 100, 100, 'draft', 'in_1')")
    links = {"hosted_invoice_url": "https://invoice.stripe.com/i/x", "invoice_pdf": "https://pay.stripe.com/x/pdf"}
    finalized = event("evt_fin", "invoice.finalized", {"id": "in_1", "object": "invoice", **links})
    paid = event("evt_paid", "invoice.paid", {"id": "in_1", "object": "invoice",
                                              "hosted_invoice_url": None, "invoice_pdf": None})

    answers = post(settings, ("/stripe/webhook", finalized, signed(finalized)),
                   ("/stripe/webhook", paid, signed(paid)))

    assert [status for status, _ in answers] == [200, 200]
    assert sql(db, "SELECT status, hosted_invoice_url, invoice_pdf FROM tally.invoices") == [
        ("paid", links["hosted_invoice_url"], links["invoice_pdf"])]  # a later null erases nothing


def test_a_thin_event_with_a_forged_signature_is_rejected(
    settings_factory: Callable[..., Settings], db: str,
) -> None:
    settings = settings_factory(database_url=db)
    body = json.dumps({"id": "evt_1", "object": "v2.core.event", "created": "2026-11-02T00:00:00Z",
                       "type": "v1.billing.meter.error_report_triggered", "livemode": False,
                       "related_object": {"id": "mtr_1", "type": "billing.meter",
                                          "url": "/v1/billing/meters/mtr_1"}})

    [(status, answer)] = post(settings, ("/stripe/events", body, {
        "Stripe-Signature": sign(body.encode(), "whsec_attacker"),
        "Content-Type": "application/json"}))

    assert status == 400 and "invalid event notification" in answer["error"]
    assert sql(db, "SELECT count(*) FROM tally.stripe_webhook_events") == [(0,)]


def test_a_redelivered_meter_error_report_is_journaled_once(
    settings_factory: Callable[..., Settings], db: str, double: StripeDouble,
) -> None:
    settings = settings_factory(database_url=db, stripe_api_key="sk_test_thin",
                                stripe_api_base=double.url)
    client = stripe.StripeClient("sk_test_thin", base_addresses={"api": double.url},
                                 max_network_retries=0)
    client.v1.billing.meters.create({"display_name": "x", "event_name": "tally_api_calls",
                                     "default_aggregation": {"formula": "sum"}})
    client.v1.billing.meter_events.create({
        "event_name": "tally_api_calls", "identifier": "not-tallys",
        "payload": {"stripe_customer_id": "cus_nobody", "value": "1"}})
    [report] = double.inspect().events
    body = json.dumps({k: v for k, v in report.items() if k not in ("data", "reason")})
    delivery = ("/stripe/events", body, {"Stripe-Signature": sign(body.encode(), THIN_SECRET),
                                         "Content-Type": "application/json"})

    answers = post(settings, delivery, delivery)

    assert [a for _, a in answers] == [
        {"received": True, "outcome": "meter errors: 0 journaled, 1 unknown identifiers,"
                                      " 0 unsampled"},
        {"received": True, "outcome": "duplicate"}]
    [(key, status, error)] = sql(db, "SELECT idempotency_key, status, last_error"
                                     " FROM tally.stripe_pushes")
    assert (key, status) == ("not-tallys", "failed")
    assert "meter_event_customer_not_found" in error
