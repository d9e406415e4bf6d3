"""The Stripe double, driven through the real `stripe` SDK as Tally drives Stripe."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import stripe
from stripe_testkit import StripeDouble

HOUR = 3600


@pytest.fixture
def double() -> Iterator[StripeDouble]:
    with StripeDouble() as running:
        yield running


def make_client(double: StripeDouble, api_key: str = "sk_test_tally") -> stripe.StripeClient:
    # Retries off: every test sees exactly the response the double gave.
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": double.url, "meter_events": double.url},
        max_network_retries=0,
    )


@pytest.fixture
def client(double: StripeDouble) -> stripe.StripeClient:
    return make_client(double)


@pytest.fixture
def customer_id(client: stripe.StripeClient) -> str:
    return client.v1.customers.create({"email": "ops@acme.test"}).id


@pytest.fixture
def meter_id(client: stripe.StripeClient) -> str:
    meter = client.v1.billing.meters.create(
        {
            "display_name": "API calls",
            "event_name": "api_calls",
            "default_aggregation": {"formula": "sum"},
        }
    )
    return meter.id


@pytest.fixture
def send_usage(client: stripe.StripeClient, customer_id: str, meter_id: str) -> Callable[..., Any]:
    def send(value: int, identifier: str, timestamp: int | None = None) -> Any:
        params: dict[str, Any] = {
            "event_name": "api_calls",
            "payload": {"stripe_customer_id": customer_id, "value": str(value)},
            "identifier": identifier,
        }
        if timestamp is not None:
            params["timestamp"] = timestamp
        return client.v1.billing.meter_events.create(params)  # type: ignore[arg-type]

    return send


def this_hour() -> int:
    return int(time.time()) // HOUR * HOUR


def usage_total(client: stripe.StripeClient, meter_id: str, customer_id: str) -> float:
    start = this_hour() - 2 * HOUR
    summaries = client.v1.billing.meters.event_summaries.list(
        meter_id, {"customer": customer_id, "start_time": start, "end_time": start + 3 * HOUR}
    )
    assert len(summaries.data) == 1
    return summaries.data[0].aggregated_value


def control(double: StripeDouble, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(double.url + path, data=data, method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


# ------------------------------------------------------------------------- customers


def test_created_customer_can_be_retrieved_with_its_metadata(
    client: stripe.StripeClient,
) -> None:
    created = client.v1.customers.create({"email": "a@acme.test", "metadata": {"tenant": "t1"}})

    fetched = client.v1.customers.retrieve(created.id)

    assert created.id.startswith("cus_")
    assert (fetched.object, fetched.email, fetched.livemode) == ("customer", "a@acme.test", False)
    assert fetched.metadata is not None
    assert fetched.metadata.to_dict() == {"tenant": "t1"}


def test_customers_can_be_found_by_metadata_search_and_email_list(
    client: stripe.StripeClient,
) -> None:
    wanted = client.v1.customers.create({"email": "b@acme.test", "metadata": {"tenant": "t2"}})
    client.v1.customers.create({"email": "c@acme.test", "metadata": {"tenant": "t3"}})

    found = client.v1.customers.search({"query": "metadata['tenant']:'t2'"})
    listed = client.v1.customers.list({"email": "b@acme.test"})

    assert [c.id for c in found.data] == [wanted.id]
    assert [c.id for c in listed.data] == [wanted.id]


def test_lists_page_through_every_object(client: stripe.StripeClient) -> None:
    created = {client.v1.customers.create({"name": f"c{i}"}).id for i in range(25)}

    listed = {c.id for c in client.v1.customers.list({"limit": 10}).auto_paging_iter()}

    assert listed == created


def test_retrieving_a_missing_customer_is_a_404(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.customers.retrieve("cus_missing")

    assert raised.value.http_status == 404
    assert raised.value.code == "resource_missing"


# -------------------------------------------------------------- meters and events


def test_meter_event_values_are_summed_in_the_summary(
    client: stripe.StripeClient, customer_id: str, meter_id: str, send_usage: Callable[..., Any]
) -> None:
    for index, value in enumerate((3, 4, 5)):
        send_usage(value, identifier=f"evt-{index}")

    assert usage_total(client, meter_id, customer_id) == 12


def test_summary_with_hour_window_sums_each_hour_apart(
    client: stripe.StripeClient, customer_id: str, meter_id: str, send_usage: Callable[..., Any]
) -> None:
    previous_hour = this_hour() - HOUR
    send_usage(2, "early-1", timestamp=previous_hour + 10)
    send_usage(3, "early-2", timestamp=previous_hour + 20)
    send_usage(7, "late-1", timestamp=this_hour() + 1)

    summaries = client.v1.billing.meters.event_summaries.list(
        meter_id,
        {
            "customer": customer_id,
            "start_time": previous_hour,
            "end_time": this_hour() + HOUR,
            "value_grouping_window": "hour",
        },
    )

    assert [(s.start_time, s.aggregated_value) for s in summaries.data] == [
        (previous_hour, 5),
        (this_hour(), 7),
    ]


def test_duplicate_identifier_is_rejected_and_counted_once(
    client: stripe.StripeClient,
    customer_id: str,
    meter_id: str,
    send_usage: Callable[..., Any],
    double: StripeDouble,
) -> None:
    send_usage(10, identifier="tenant-1:2024-05:api_calls")

    with pytest.raises(stripe.InvalidRequestError) as raised:
        send_usage(10, identifier="tenant-1:2024-05:api_calls")

    error = raised.value
    assert error.http_status == 400
    assert error.code == "resource_already_exists"
    assert error.param == "identifier"
    assert "already exists with identifier tenant-1:2024-05:api_calls" in str(error.user_message)
    assert error.headers is not None
    assert error.headers["Stripe-Should-Retry"] == "false"
    assert usage_total(client, meter_id, customer_id) == 10
    assert len(double.inspect().meter_events) == 1


def test_meter_event_retried_with_its_idempotency_key_is_replayed_not_rejected(
    client: stripe.StripeClient, customer_id: str, meter_id: str, double: StripeDouble
) -> None:
    params: Any = {
        "event_name": "api_calls",
        "payload": {"stripe_customer_id": customer_id, "value": "4"},
        "identifier": "evt-retried",
    }

    first = client.v1.billing.meter_events.create(params, {"idempotency_key": "push-1"})
    again = client.v1.billing.meter_events.create(params, {"idempotency_key": "push-1"})

    assert first.to_dict() == again.to_dict()
    assert usage_total(client, meter_id, customer_id) == 4


@pytest.mark.parametrize(
    ("offset", "code"),
    [
        (-35 * 86_400 - 60, "timestamp_too_far_in_past"),
        (5 * 60 + 60, "timestamp_in_future"),
    ],
)
def test_meter_event_outside_the_accepted_time_range_is_accepted_then_dropped_and_reported(
    send_usage: Callable[..., Any], double: StripeDouble, meter_id: str, offset: int, code: str
) -> None:
    send_usage(1, identifier="late", timestamp=int(time.time()) + offset)  # no error: async

    snapshot = double.inspect()
    assert snapshot.meter_events == ()
    assert [r["code"] for r in snapshot.rejected_meter_events] == [code]
    [report] = snapshot.events
    assert report["type"] == "v1.billing.meter.error_report_triggered"
    assert report["related_object"]["id"] == meter_id
    [error_type] = report["data"]["reason"]["error_types"]
    assert error_type["code"] == code
    assert [s["request"]["identifier"] for s in error_type["sample_errors"]] == ["late"]


def test_meter_event_within_35_days_is_accepted(
    send_usage: Callable[..., Any], double: StripeDouble
) -> None:
    send_usage(1, identifier="old-but-ok", timestamp=int(time.time()) - 34 * 86_400)

    assert len(double.inspect().meter_events) == 1


def test_meter_event_for_an_event_name_without_meter_is_reported_as_no_meter_found(
    client: stripe.StripeClient, customer_id: str, meter_id: str, double: StripeDouble
) -> None:
    client.v1.billing.meter_events.create(
        {"event_name": "api_cals", "payload": {"stripe_customer_id": customer_id}}
    )

    snapshot = double.inspect()
    assert [r["code"] for r in snapshot.rejected_meter_events] == ["no_meter"]
    assert [e["type"] for e in snapshot.events] == ["v1.billing.meter.no_meter_found"]


def test_meter_event_value_must_be_a_whole_number(
    client: stripe.StripeClient, customer_id: str, meter_id: str, double: StripeDouble
) -> None:
    client.v1.billing.meter_events.create(
        {
            "event_name": "api_calls",
            "payload": {"stripe_customer_id": customer_id, "value": "1.5"},
        }
    )

    assert [r["code"] for r in double.inspect().rejected_meter_events] == [
        "meter_event_invalid_value"
    ]
    assert usage_total(client, meter_id, customer_id) == 0


def test_concurrent_meter_events_are_all_recorded(
    client: stripe.StripeClient, customer_id: str, meter_id: str, send_usage: Callable[..., Any]
) -> None:
    def push(worker: int) -> None:
        for index in range(20):
            send_usage(1, identifier=f"w{worker}-{index}")

    threads = [threading.Thread(target=push, args=(worker,)) for worker in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert usage_total(client, meter_id, customer_id) == 120


def test_v2_stream_records_valid_events_and_drops_invalid_ones_as_stripe_does_async(
    client: stripe.StripeClient, customer_id: str, meter_id: str, double: StripeDouble
) -> None:
    session = client.v2.billing.meter_event_session.create()
    stream = make_client(double, api_key=session.authentication_token)

    stream.v2.billing.meter_event_stream.create(
        {
            "events": [
                {
                    "event_name": "api_calls",
                    "identifier": "stream-1",
                    "payload": {"stripe_customer_id": customer_id, "value": "6"},
                },
                {"event_name": "no_such_meter", "payload": {"stripe_customer_id": customer_id}},
            ]
        }
    )

    assert usage_total(client, meter_id, customer_id) == 6
    assert [d["code"] for d in double.inspect().rejected_meter_events] == ["no_meter"]


def test_v2_stream_refuses_a_secret_key_in_place_of_a_session_token(
    client: stripe.StripeClient, customer_id: str, meter_id: str
) -> None:
    with pytest.raises(stripe.AuthenticationError):
        client.v2.billing.meter_event_stream.create(
            {"events": [{"event_name": "api_calls", "payload": {"value": "1"}}]}
        )


# ------------------------------------------------------------- parameter checking


def test_unknown_parameter_is_rejected_naming_it(
    client: stripe.StripeClient, customer_id: str, double: StripeDouble
) -> None:
    # Typed as Any, as a dict assembled at run time would be: mypy cannot catch this typo.
    misspelt: Any = {"custmer": customer_id, "amount": 100, "currency": "usd"}

    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.invoice_items.create(misspelt)

    error = raised.value
    assert (error.http_status, error.code, error.param) == (400, "parameter_unknown", "custmer")
    assert "Did you mean customer?" in str(error.user_message)
    assert double.inspect().invoice_items == ()


def test_missing_required_parameter_is_rejected(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.billing.meters.create(
            {"display_name": "x", "default_aggregation": {"formula": "sum"}}  # type: ignore[typeddict-item]
        )

    assert (raised.value.code, raised.value.param) == ("parameter_missing", "event_name")


# --------------------------------------------------------------------- idempotency


def test_same_idempotency_key_and_parameters_replays_the_stored_response(
    client: stripe.StripeClient, double: StripeDouble
) -> None:
    first = client.v1.customers.create({"email": "x@acme.test"}, {"idempotency_key": "cus-x"})
    again = client.v1.customers.create({"email": "x@acme.test"}, {"idempotency_key": "cus-x"})

    assert again.id == first.id
    assert again.last_response is not None
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert len(double.inspect().customers) == 1


def test_same_idempotency_key_with_different_parameters_is_an_idempotency_error(
    client: stripe.StripeClient, double: StripeDouble
) -> None:
    client.v1.customers.create({"email": "x@acme.test"}, {"idempotency_key": "cus-y"})

    with pytest.raises(stripe.IdempotencyError):
        client.v1.customers.create({"email": "other@acme.test"}, {"idempotency_key": "cus-y"})

    assert len(double.inspect().customers) == 1


# ------------------------------------------------------------------------ invoices


def test_invoice_collects_pending_items_and_finalizing_fixes_its_totals(
    client: stripe.StripeClient, customer_id: str
) -> None:
    client.v1.invoice_items.create(
        {"customer": customer_id, "amount": 1000, "currency": "usd", "description": "Base fee"}
    )
    client.v1.invoice_items.create(
        {
            "customer": customer_id,
            "unit_amount_decimal": Decimal("0.015"),
            "quantity": 1001,
            "currency": "usd",
            "description": "API calls",
            "metadata": {"meter": "api_calls"},
        }
    )

    draft = client.v1.invoices.create(
        {
            "customer": customer_id,
            "auto_advance": False,
            "collection_method": "send_invoice",
            "days_until_due": 30,
            "pending_invoice_items_behavior": "include",
            "metadata": {"tally_invoice_id": "inv-1"},
        }
    )
    final = client.v1.invoices.finalize_invoice(draft.id)

    assert (draft.status, draft.total) == ("draft", 1015)  # 0.015 * 1001 = 15.015 -> 15
    assert (final.status, final.total, final.amount_due, final.amount_remaining) == (
        "open",
        1015,
        1015,
        1015,
    )
    assert final.number is not None
    assert sorted(line.amount for line in final.lines.data) == [15, 1000]
    assert client.v1.invoice_items.list({"customer": customer_id, "pending": True}).data == []


def test_a_negative_invoice_becomes_customer_credit_that_the_next_invoice_uses(
    client: stripe.StripeClient, customer_id: str
) -> None:
    def invoice(*amounts: int) -> stripe.Invoice:
        draft = client.v1.invoices.create({"customer": customer_id, "currency": "usd"})
        for amount in amounts:
            client.v1.invoice_items.create({"customer": customer_id, "invoice": draft.id,
                                            "amount": amount, "currency": "usd"})
        return client.v1.invoices.finalize_invoice(draft.id)

    credit = invoice(2839, -3513)
    after_credit = client.v1.customers.retrieve(customer_id).balance
    charge = invoice(1000)

    assert (credit.total, credit.amount_due, credit.status) == (-674, 0, "paid")
    assert (credit.starting_balance, credit.ending_balance, after_credit) == (0, -674, -674)
    assert (charge.total, charge.amount_due, charge.starting_balance) == (1000, 326, -674)
    assert client.v1.customers.retrieve(customer_id).balance == 0


def test_finalized_invoice_cannot_take_new_items(
    client: stripe.StripeClient, customer_id: str, double: StripeDouble
) -> None:
    client.v1.invoice_items.create({"customer": customer_id, "amount": 500, "currency": "usd"})
    invoice = client.v1.invoices.create(
        {"customer": customer_id, "pending_invoice_items_behavior": "include"}
    )
    client.v1.invoices.finalize_invoice(invoice.id)

    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.invoice_items.create(
            {"customer": customer_id, "amount": 1, "currency": "usd", "invoice": invoice.id}
        )

    assert raised.value.code == "invoice_not_editable"
    assert client.v1.invoices.retrieve(invoice.id).total == 500
    assert len(double.inspect().invoice_items) == 1


def test_finalizing_twice_is_rejected(client: stripe.StripeClient, customer_id: str) -> None:
    invoice = client.v1.invoices.create({"customer": customer_id})
    client.v1.invoices.finalize_invoice(invoice.id)

    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.finalize_invoice(invoice.id)


def test_invoice_excluding_pending_items_leaves_them_pending(
    client: stripe.StripeClient, customer_id: str
) -> None:
    item = client.v1.invoice_items.create(
        {"customer": customer_id, "amount": 700, "currency": "usd"}
    )

    invoice = client.v1.invoices.create({"customer": customer_id})

    assert invoice.total == 0
    assert [i.id for i in client.v1.invoice_items.list({"pending": True}).data] == [item.id]


def test_open_invoice_can_be_paid_and_a_paid_one_cannot_be_voided(
    client: stripe.StripeClient, customer_id: str
) -> None:
    client.v1.invoice_items.create({"customer": customer_id, "amount": 900, "currency": "eur"})
    invoice = client.v1.invoices.create(
        {"customer": customer_id, "pending_invoice_items_behavior": "include"}
    )
    client.v1.invoices.finalize_invoice(invoice.id)

    paid = client.v1.invoices.pay(invoice.id, {"paid_out_of_band": True})

    assert (paid.currency, paid.status, paid.amount_paid, paid.amount_remaining) == (
        "eur",
        "paid",
        900,
        0,
    )
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.void_invoice(invoice.id)


# -------------------------------------------------------------------------- faults


def test_faults_at_one_third_rate_raise_sdk_errors_and_leave_no_effect(
    client: stripe.StripeClient, double: StripeDouble
) -> None:
    double.faults(rate=1 / 3, kinds=("429", "500"), seed=7)
    created, failures = [], []
    for index in range(60):
        try:
            created.append(client.v1.customers.create({"name": f"c{index}"}).id)
        except (stripe.RateLimitError, stripe.APIError) as error:
            failures.append(type(error))

    snapshot = double.inspect()
    assert {c["id"] for c in snapshot.customers} == set(created)
    assert snapshot.faults_injected == len(failures)
    assert set(failures) == {stripe.RateLimitError, stripe.APIError}
    assert 10 <= len(failures) <= 30
    assert snapshot.request_counts["POST /v1/customers"] == 60


def test_faults_with_the_same_seed_fail_the_same_requests(
    client: stripe.StripeClient, double: StripeDouble
) -> None:
    def pattern() -> list[str]:
        double.faults(rate=0.5, kinds=("429", "500"), seed=42)
        outcome = []
        for _ in range(20):
            try:
                client.v1.customers.list()
                outcome.append("ok")
            except stripe.StripeError as error:
                outcome.append(type(error).__name__)
        return outcome

    assert pattern() == pattern()


def test_faulted_request_does_not_consume_its_idempotency_key(
    client: stripe.StripeClient, double: StripeDouble
) -> None:
    double.faults(rate=1.0, kinds=("500",))
    with pytest.raises(stripe.APIError):
        client.v1.customers.create({"email": "k@acme.test"}, {"idempotency_key": "cus-k"})
    double.faults()

    retried = client.v1.customers.create({"email": "k@acme.test"}, {"idempotency_key": "cus-k"})

    assert retried.last_response is not None
    assert "Idempotent-Replayed" not in retried.last_response.headers
    assert [c["id"] for c in double.inspect().customers] == [retried.id]


@pytest.mark.parametrize(("kind", "should_retry"), [("429", "false"), ("lock_timeout", "true")])
def test_rate_limit_and_lock_timeout_carry_stripes_retry_advice(
    client: stripe.StripeClient, double: StripeDouble, kind: str, should_retry: str
) -> None:
    double.faults(rate=1.0, kinds=(kind,))

    with pytest.raises(stripe.RateLimitError) as raised:
        client.v1.customers.list()

    assert raised.value.headers is not None
    assert raised.value.headers["Stripe-Should-Retry"] == should_retry


def test_fault_delay_slows_every_request(client: stripe.StripeClient, double: StripeDouble) -> None:
    double.faults(delay=0.2)
    started = time.monotonic()

    client.v1.customers.list()

    assert time.monotonic() - started >= 0.2


def test_control_endpoint_switches_faults_and_serves_state(
    client: stripe.StripeClient, double: StripeDouble
) -> None:
    control(double, "POST", "/_double/faults", {"rate": 1.0, "kinds": ["500"], "seed": 1})
    with pytest.raises(stripe.APIError):
        client.v1.customers.create({"name": "lost"})
    control(double, "POST", "/_double/faults", {"rate": 0})
    client.v1.customers.create({"name": "kept"})

    state = control(double, "GET", "/_double/state")

    assert [c["name"] for c in state["customers"]] == ["kept"]
    assert state["faults_injected"] == 1


# ---------------------------------------------------------------------------- auth


def test_request_with_a_live_key_is_unauthorized(double: StripeDouble) -> None:
    with pytest.raises(stripe.AuthenticationError):
        make_client(double, api_key="sk_live_nope").v1.customers.list()


def test_request_without_an_api_key_is_unauthorized(double: StripeDouble) -> None:
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(double.url + "/v1/customers", timeout=5)

    assert raised.value.code == 401
    assert json.loads(raised.value.read())["error"]["type"] == "invalid_request_error"


# ----------------------------------------------------------------------------- CLI


def test_command_line_server_serves_and_stops_cleanly_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "stripe_testkit", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().split()[-1]
        client = stripe.StripeClient(
            "sk_test_cli", base_addresses={"api": url}, max_network_retries=0
        )
        assert client.v1.customers.create({"name": "cli"}).id.startswith("cus_")

        process.send_signal(signal.SIGTERM)

        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()


# ------------------------------------------------------------------ prices and timeouts


def test_metered_price_needs_an_existing_meter_and_tiers_need_an_open_last_tier(
    client: stripe.StripeClient, meter_id: str
) -> None:
    price = client.v1.prices.create({
        "currency": "usd", "product_data": {"name": "API calls"}, "billing_scheme": "tiered",
        "tiers_mode": "graduated", "lookup_key": "api",
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
        "tiers": [{"up_to": 1000, "unit_amount_decimal": Decimal(0)},
                  {"up_to": "inf", "unit_amount_decimal": Decimal("0.1")}],
    })
    assert price.recurring is not None and price.recurring.meter == meter_id
    with pytest.raises(stripe.InvalidRequestError, match="No such billing meter"):
        client.v1.prices.create({"currency": "usd", "product_data": {"name": "x"},
                                 "unit_amount": 1, "recurring": {
                                     "interval": "month", "usage_type": "metered",
                                     "meter": "mtr_missing"}})
    with pytest.raises(stripe.InvalidRequestError, match="last tier must have up_to=inf"):
        client.v1.prices.create({"currency": "usd", "product_data": {"name": "x"},
                                 "billing_scheme": "tiered", "tiers_mode": "volume",
                                 "tiers": [{"up_to": 5, "unit_amount": 1}]})
    with pytest.raises(stripe.InvalidRequestError, match="already uses that lookup key"):
        client.v1.prices.create({"currency": "usd", "product_data": {"name": "x"},
                                 "unit_amount": 1, "lookup_key": "api"})


def test_timeout_fault_applies_the_request_then_loses_the_response(
    double: StripeDouble,
) -> None:
    slow = stripe.StripeClient("sk_test_tally", base_addresses={"api": double.url},
                               max_network_retries=0,
                               http_client=stripe.RequestsClient(timeout=0.2))
    double.faults(rate=1.0, kinds=("timeout",), timeout=0.5)
    with pytest.raises(stripe.APIConnectionError):
        slow.v1.customers.create({"email": "a@b.test"}, {"idempotency_key": "k1"})
    double.faults()
    again = slow.v1.customers.create({"email": "a@b.test"}, {"idempotency_key": "k1"})
    [customer] = double.inspect().customers
    assert again.id == customer["id"]  # the retry learned the first outcome


# ------------------------------------------------------ memory: 24 hours on its clock


def test_idempotency_keys_are_forgotten_24_hours_after_first_use(
    client: stripe.StripeClient, double: StripeDouble
) -> None:
    first = client.v1.customers.create({"name": "k"}, {"idempotency_key": "cus-24h"})
    double.advance(23 * HOUR)
    within = client.v1.customers.create({"name": "k"}, {"idempotency_key": "cus-24h"})
    double.advance(HOUR)
    after = client.v1.customers.create({"name": "k"}, {"idempotency_key": "cus-24h"})

    assert within.id == first.id
    assert after.id != first.id  # a new customer: Stripe no longer knew the key
    assert len(double.inspect().customers) == 2


def test_meter_event_identifiers_are_unique_only_within_24_hours(
    send_usage: Callable[..., Any], double: StripeDouble
) -> None:
    send_usage(1, identifier="daily")
    double.advance(24 * HOUR)
    send_usage(1, identifier="daily", timestamp=double.now())

    assert [e["identifier"] for e in double.inspect().meter_events] == ["daily", "daily"]


def test_a_longer_memory_keeps_keys_and_identifiers_past_a_day() -> None:
    with StripeDouble(memory=72 * HOUR) as double:
        client = make_client(double)
        first = client.v1.customers.create({"name": "k"}, {"idempotency_key": "cus-72h"})
        double.advance(48 * HOUR)
        again = client.v1.customers.create({"name": "k"}, {"idempotency_key": "cus-72h"})

    assert again.id == first.id


def test_control_endpoint_moves_the_clock(double: StripeDouble) -> None:
    before = double.now()

    answer = control(double, "POST", "/_double/clock", {"advance": 48 * HOUR})

    assert answer["now"] - before >= 48 * HOUR
    assert control(double, "GET", "/_double/state")["now"] == answer["now"]


# ------------------------------------------------------------------ stored 500s


def test_a_stored_500_is_replayed_under_its_key_and_the_request_had_no_effect(
    client: stripe.StripeClient, double: StripeDouble
) -> None:
    double.faults(rate=1.0, kinds=("stored_500",))
    with pytest.raises(stripe.APIError):
        client.v1.customers.create({"name": "s"}, {"idempotency_key": "cus-500"})
    double.faults()

    with pytest.raises(stripe.APIError) as replayed:
        client.v1.customers.create({"name": "s"}, {"idempotency_key": "cus-500"})
    fresh = client.v1.customers.create({"name": "s"}, {"idempotency_key": "cus-500-new"})

    assert replayed.value.headers is not None
    assert replayed.value.headers["Idempotent-Replayed"] == "true"
    assert [c["id"] for c in double.inspect().customers] == [fresh.id]


def test_a_stored_500_after_the_effect_leaves_the_object_behind_it(
    client: stripe.StripeClient, double: StripeDouble
) -> None:
    double.faults(rate=1.0, kinds=("stored_500_applied",))
    with pytest.raises(stripe.APIError):
        client.v1.customers.create({"name": "a"}, {"idempotency_key": "cus-500a"})
    double.faults()

    with pytest.raises(stripe.APIError):
        client.v1.customers.create({"name": "a"}, {"idempotency_key": "cus-500a"})

    assert [c["name"] for c in double.inspect().customers] == ["a"]


# --------------------------------------------------- versions, limits, invalid requests


def test_a_stripe_version_of_another_release_is_refused(double: StripeDouble) -> None:
    old = stripe.StripeClient("sk_test_old", base_addresses={"api": double.url},
                              stripe_version="2024-04-10", max_network_retries=0)

    with pytest.raises(stripe.InvalidRequestError, match="Invalid Stripe API version"):
        old.v1.customers.list()

    assert double.inspect().invalid_requests[0]["request"] == "GET /v1/customers"


def test_a_misspelled_nested_parameter_is_refused_and_recorded(
    client: stripe.StripeClient, double: StripeDouble
) -> None:
    typo: Any = {"display_name": "x", "event_name": "e", "default_aggregation": {"formula": "sum"},
                 "customer_mapping": {"event_payload_key": "k", "type": "by_id", "typo": "x"}}

    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.billing.meters.create(typo)

    assert (raised.value.code, raised.value.param) == ("parameter_unknown",
                                                       "customer_mapping[typo]")
    [invalid] = double.inspect().invalid_requests
    assert invalid["problems"][0]["param"] == "customer_mapping[typo]"
    assert double.inspect().meters == ()


# ------------------------------------------------ meter error reports as thin events


class Receiver:
    """A webhook endpoint for the double's thin events: what arrived, verified."""

    def __init__(self, secret: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []  # type: list[tuple[str, str]]
        self.secret = secret

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                received.append((body, self.headers["Stripe-Signature"]))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"


def test_a_rejected_meter_event_is_reported_by_a_signed_thin_event_the_sdk_can_fetch(
    client: stripe.StripeClient, double: StripeDouble, meter_id: str
) -> None:
    receiver = Receiver("whsec_double_test")
    double.webhooks(receiver.url, receiver.secret)
    try:
        client.v1.billing.meter_events.create({
            "event_name": "api_calls", "identifier": "for-nobody",
            "payload": {"stripe_customer_id": "cus_nobody", "value": "3"}})
        [(body, signature)] = wait_until(lambda: receiver.received)

        notification = client.parse_event_notification(body, signature, receiver.secret)
        event = notification.fetch_event().to_dict()
    finally:
        receiver.server.shutdown()

    assert notification.type == "v1.billing.meter.error_report_triggered"
    [error] = event["data"]["reason"]["error_types"]
    assert error["code"] == "meter_event_customer_not_found"
    assert error["sample_errors"][0]["request"]["identifier"] == "for-nobody"
    assert event["related_object"]["id"] == meter_id
    assert double.inspect().webhook_deliveries[0]["status"] == 200


def wait_until(probe: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, "nothing arrived"
        time.sleep(0.05)
    return value


# -------------------------------------------------------------- invoice collection


@pytest.mark.parametrize(("payment_method", "status"), [(None, "open"), ("pm_card_visa", "paid")])
def test_charge_automatically_collects_only_from_a_default_payment_method(
    client: stripe.StripeClient, payment_method: str | None, status: str
) -> None:
    params: Any = {"name": "c"}
    if payment_method:
        params |= {"payment_method": payment_method,
                   "invoice_settings": {"default_payment_method": payment_method}}
    customer = client.v1.customers.create(params)
    invoice = client.v1.invoices.create({"customer": customer.id, "currency": "usd",
                                         "auto_advance": False})
    client.v1.invoice_items.create({"customer": customer.id, "invoice": invoice.id,
                                    "amount": 500, "currency": "usd"})

    final = client.v1.invoices.finalize_invoice(invoice.id, {"auto_advance": True})

    assert (final.status, final.attempted) == (status, True)
    assert final.hosted_invoice_url and final.invoice_pdf
    assert (final.last_payment_error is None) == (payment_method is not None)
