"""The double's view of Stripe's OpenAPI document: what it holds, where it came from, and
how a request is checked against it (every problem, nested names included)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import stripe
from stripe_testkit import StripeDouble
from stripe_testkit.openapi import API_MAJOR, DOCUMENT_VERSION, check_version, operation
from stripe_testkit.proxy import RecordingProxy
from stripe_testkit.routes import ROUTES

from billing_jobs import stripe_api

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "testkit"
SHARED = REPO.parent / "shared" / "stripe-openapi"


def problems(method: str, path: str, params: dict[str, object]) -> list[tuple[str, str]]:
    found = operation(method, path)
    assert found is not None
    return [(p.param, p.message) for p in found.problems(params)]


def test_every_route_of_the_double_is_an_operation_of_the_document() -> None:
    assert all(route.operation is not None for route in ROUTES)
    assert operation("GET", "/v1/customers/search").key == "GET /v1/customers/search"  # type: ignore[union-attr]
    assert operation("GET", "/v1/customers/cus_1").key == "GET /v1/customers/{customer}"  # type: ignore[union-attr]
    assert operation("POST", "/v1/charges") is None


def test_the_document_describes_the_release_tally_pins() -> None:
    assert DOCUMENT_VERSION == "2026-09-30.endive" and API_MAJOR == "endive"
    assert stripe.api_version == stripe_api.API_VERSION  # the version the SDK's types describe
    assert check_version(stripe_api.API_VERSION) is None
    assert check_version("2024-04-10") is not None and check_version(None) is not None


def test_a_misspelled_nested_parameter_is_a_problem_with_its_full_name() -> None:
    meter = {"display_name": "x", "event_name": "e", "default_aggregation": {"formula": "sum"},
             "customer_mapping": {"event_payload_key": "k", "type": "by_id", "typo": "x"}}

    [(param, message)] = problems("POST", "/v1/billing/meters", meter)

    assert param == "customer_mapping[typo]"
    assert message.startswith("Received unknown parameter: customer_mapping[typo]")


def test_every_problem_of_a_request_is_reported_not_only_the_first() -> None:
    item = {"customer": "cus_1", "amount": "12.5", "currency": "usd", "frobnicate": "1",
            "period": {"start": "1"}, "metadata": {"k" * 41: "v", "ok": "v" * 501},
            "tax_behavior": "sometimes"}

    found = dict(problems("POST", "/v1/invoiceitems", item))

    assert set(found) == {"amount", "frobnicate", "period[end]", f"metadata[{'k' * 41}]",
                          "metadata[ok]", "tax_behavior"}
    assert found["period[end]"] == "Missing required param: period[end]."
    assert "one of exclusive, inclusive, unspecified" in found["tax_behavior"]


def test_the_overlay_of_what_changed_since_the_document_is_applied() -> None:
    aggregation = {"display_name": "x", "event_name": "e",
                   "default_aggregation": {"formula": "last"}}
    assert problems("POST", "/v1/billing/meters", aggregation) == []
    old_style = {"customer": "cus_1", "currency": "usd", "price": "price_1"}
    assert problems("POST", "/v1/invoiceitems", old_style)[0][0] == "price"
    assert problems("POST", "/v1/invoiceitems", {"customer": "c", "quantity_decimal": "1.5",
                                                 "pricing": {"price": "price_1"}}) == []


def test_json_bodies_are_checked_with_their_types() -> None:
    event = {"event_name": "e", "payload": {"value": 3}, "identifier": "x" * 101,
             "timestamp": "yesterday"}

    found = dict(problems("POST", "/v2/billing/meter_event_stream", {"events": [event]}))

    assert set(found) == {"events[0][payload][value]", "events[0][identifier]",
                          "events[0][timestamp]"}


def test_empty_string_unsets_where_the_document_allows_it() -> None:
    assert problems("POST", "/v1/invoiceitems", {"customer": "c", "metadata": ""}) == []
    assert problems("GET", "/v1/invoices", {"created": {"gte": "1", "lt": "2"}}) == []
    assert problems("GET", "/v1/invoices", {"created": {"after": "1"}})[0][0] == \
        "created[after]"


@pytest.mark.skipif(not SHARED.is_dir(), reason="Stripe's documents are not beside the repo")
def test_the_committed_subset_is_what_the_generator_makes_of_stripes_documents(
    tmp_path: Path,
) -> None:
    copy = tmp_path / "testkit"
    shutil.copytree(KIT / "scripts", copy / "scripts")
    (copy / "src" / "stripe_testkit").mkdir(parents=True)
    subprocess.run([sys.executable, str(copy / "scripts" / "extract_stripe_openapi.py"),
                    str(SHARED)], check=True, capture_output=True, timeout=120)

    made = json.loads((copy / "src" / "stripe_testkit" / "stripe_openapi.json").read_text())
    committed = json.loads((KIT / "src" / "stripe_testkit" / "stripe_openapi.json").read_text())
    assert made == committed
    assert committed["documents"]["spec3.2024-04-10.json.xz"]["sha256"] == (
        "aca5d9eb68e64d928494b79b5c0dbadfa6df269f9566a63860256158f8169ad4")


def test_the_subset_ships_with_the_test_kit() -> None:
    spec = importlib.util.find_spec("stripe_testkit")
    assert spec is not None and spec.origin is not None
    assert (Path(spec.origin).parent / "stripe_openapi.json").is_file()
    pyproject = (KIT / "pyproject.toml").read_text()
    assert '"stripe_openapi.json"' in pyproject and '"STRIPE_OPENAPI.md"' in pyproject


def test_the_recording_proxy_forwards_and_records_what_breaks_the_document() -> None:
    with StripeDouble() as double, RecordingProxy(api=double.url,
                                                   meter_events=double.url) as proxy:
        client = stripe.StripeClient("sk_test_proxy", base_addresses={"api": proxy.url},
                                     max_network_retries=0)
        created = client.v1.customers.create({"name": "via proxy"})
        with pytest.raises(stripe.InvalidRequestError):
            client.v1.customers.create({"name": "x", "invoice_settings": {"typo": "1"}})  # type: ignore[typeddict-unknown-key]

        assert [c["id"] for c in double.inspect().customers] == [created.id]
        assert [r["request"] for r in proxy.requests] == ["POST /v1/customers"] * 2
        assert [p["param"] for r in proxy.invalid_requests for p in r["problems"]] == [
            "invoice_settings[typo]"]
