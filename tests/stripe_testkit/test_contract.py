"""Stripe's contract, as Tally relies on it: one suite, run against the Stripe double
(always) and Stripe test mode (with a sk_test_ STRIPE_API_KEY: `make test-stripe`).

Every request sent here is also checked against Stripe's OpenAPI document (see
tests/stripe_target.py); a test that breaks it on purpose says which parameter.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import stripe

from tests.stripe_target import Target, targets

pytestmark = pytest.mark.stripe_contract


@pytest.fixture(params=["double", "stripe"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    yield from targets(request)


@pytest.fixture
def client(target: Target) -> stripe.StripeClient:
    return target.client()


@pytest.fixture
def customer_id(client: stripe.StripeClient) -> str:
    return client.v1.customers.create({"name": "contract", "metadata": {"suite": "contract"}}).id


@pytest.fixture
def event_name(client: stripe.StripeClient) -> str:
    name = f"contract_{uuid.uuid4().hex[:12]}"  # event names are unique among active meters
    client.v1.billing.meters.create({
        "display_name": "Contract", "event_name": name,
        "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
        "value_settings": {"event_payload_key": "value"}})
    return name


def metadata(obj: Any) -> dict[str, str]:
    return {} if obj.metadata is None else dict(obj.metadata.to_dict())


def test_a_misspelled_nested_parameter_is_refused_naming_it(
    target: Target, client: stripe.StripeClient,
) -> None:
    target.expect_invalid("customer_mapping[typo]")
    misspelt: Any = {"display_name": "x", "event_name": f"typo_{uuid.uuid4().hex[:8]}",
                     "default_aggregation": {"formula": "sum"},
                     "customer_mapping": {"event_payload_key": "c", "type": "by_id",
                                          "typo": "x"}}

    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.billing.meters.create(misspelt)

    assert raised.value.http_status == 400
    assert raised.value.code == "parameter_unknown"
    assert raised.value.param == "customer_mapping[typo]"


def test_a_meter_event_identifier_is_at_most_100_characters(
    target: Target, client: stripe.StripeClient, customer_id: str, event_name: str,
) -> None:
    target.expect_invalid("identifier")
    payload = {"stripe_customer_id": customer_id, "value": "1"}
    client.v1.billing.meter_events.create(
        {"event_name": event_name, "payload": payload, "identifier": "i" * 99 + "1"})

    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.billing.meter_events.create(
            {"event_name": event_name, "payload": payload, "identifier": "i" * 101})

    assert raised.value.param == "identifier"


def test_metadata_keys_are_at_most_40_characters_and_values_500(
    target: Target, client: stripe.StripeClient,
) -> None:
    long_key, long_value = "k" * 41, "v" * 501
    target.expect_invalid(f"metadata[{long_key}]")
    target.expect_invalid("metadata[tally]")
    client.v1.customers.create({"metadata": {"k" * 40: "v" * 500}})

    for metadata in ({long_key: "v"}, {"tally": long_value}):
        with pytest.raises(stripe.InvalidRequestError):
            client.v1.customers.create({"metadata": metadata})


def test_an_idempotency_key_is_at_most_255_characters(
    target: Target, client: stripe.StripeClient,
) -> None:
    target.expect_invalid("Idempotency-Key")
    client.v1.customers.create({"name": "k255"}, {"idempotency_key": uuid.uuid4().hex * 7
                                                  + "x" * 31})

    with pytest.raises(stripe.InvalidRequestError):
        client.v1.customers.create({"name": "k256"},
                                   {"idempotency_key": uuid.uuid4().hex * 8})


def test_a_key_replays_its_first_answer_and_refuses_other_parameters(
    client: stripe.StripeClient,
) -> None:
    key = f"contract-{uuid.uuid4()}"
    first = client.v1.customers.create({"name": "same"}, {"idempotency_key": key})
    again = client.v1.customers.create({"name": "same"}, {"idempotency_key": key})

    assert again.id == first.id
    assert again.last_response is not None
    assert again.last_response.headers.get("Idempotent-Replayed") == "true"
    with pytest.raises(stripe.IdempotencyError):
        client.v1.customers.create({"name": "other"}, {"idempotency_key": key})


def test_a_sent_invoice_needs_days_until_due_and_a_finalized_one_links_the_customers_copy(
    client: stripe.StripeClient, customer_id: str,
) -> None:
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.create({"customer": customer_id, "collection_method": "send_invoice",
                                   "currency": "usd"})
    invoice = client.v1.invoices.create({
        "customer": customer_id, "collection_method": "send_invoice", "days_until_due": 14,
        "currency": "usd", "pending_invoice_items_behavior": "exclude", "auto_advance": False,
        "metadata": {"tally_invoice_id": "contract:1"}})
    now = int(time.time())
    client.v1.invoice_items.create({
        "customer": customer_id, "invoice": invoice.id, "amount": 1234, "currency": "usd",
        "period": {"start": now - 3600, "end": now - 3600},  # inclusive: end may equal start
        "metadata": {"tally_line_no": "1"}})

    final = client.v1.invoices.finalize_invoice(invoice.id, {"auto_advance": True})

    assert (final.status, final.collection_method, final.total) == ("open", "send_invoice", 1234)
    assert final.hosted_invoice_url and final.invoice_pdf
    assert final.due_date is not None


def test_invoices_and_their_items_are_found_again_by_their_metadata(
    client: stripe.StripeClient, customer_id: str,
) -> None:
    tag = f"contract:{uuid.uuid4().hex[:8]}"
    invoice = client.v1.invoices.create({
        "customer": customer_id, "currency": "usd", "auto_advance": False,
        "collection_method": "send_invoice", "days_until_due": 30,
        "metadata": {"tally_invoice_id": tag}})
    item = client.v1.invoice_items.create({
        "customer": customer_id, "invoice": invoice.id, "amount": 5, "currency": "usd",
        "metadata": {"tally_line_no": "3"}})

    invoices = client.v1.invoices.list({"customer": customer_id, "limit": 100}).data
    items = client.v1.invoice_items.list({"invoice": invoice.id, "limit": 100}).data

    assert [i.id for i in invoices if metadata(i).get("tally_invoice_id") == tag] == [invoice.id]
    assert [i.id for i in items if metadata(i).get("tally_line_no") == "3"] == [item.id]


def test_meter_events_of_zero_and_repeated_values_all_count_by_identifier(
    target: Target, client: stripe.StripeClient, customer_id: str, event_name: str,
) -> None:
    meter = next(m for m in client.v1.billing.meters.list({"limit": 100}).auto_paging_iter()
                 if m.event_name == event_name)
    now = int(time.time())
    for n, value in enumerate((5, 7, 5, 0)):
        client.v1.billing.meter_events.create({
            "event_name": event_name, "identifier": f"{event_name}-{n}", "timestamp": now - 120,
            "payload": {"stripe_customer_id": customer_id, "value": str(value)}})
    start = (now - 120) // 60 * 60

    def total() -> float:
        data = client.v1.billing.meters.event_summaries.list(
            meter.id, {"customer": customer_id, "start_time": start,
                       "end_time": start + 120}).data
        return sum(s.aggregated_value for s in data)

    assert target.eventually(total, lambda t: t == 17, "the summary of 5+7+5+0") == 17
