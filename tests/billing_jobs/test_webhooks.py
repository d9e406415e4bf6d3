"""`POST /stripe/webhook`: signatures, redelivery, subscription events to Kafka, invoice
statuses to Postgres. Real Postgres and the real broker; Stripe's side is signed JSON."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from billing_jobs.webhooks import WebhookReceiver, serve
from devtools.devstack import free_port
from runtime.settings import Settings
from schemas.codec import loads
from tests.billing_jobs.conftest import sql
from tests.kafka_helpers import read_records
from tests.network import assert_reachable_only_on_loopback, wait_accepting

SECRET = "whsec_test_tally"
PERIOD = (1_790_000_000, 1_792_600_000)


def signed(body: str, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    """The `Stripe-Signature` header Stripe sends: `t=<time>,v1=<HMAC-SHA256>`."""
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={mac}", "Content-Type": "application/json"}


def event(event_id: str, kind: str, obj: dict[str, Any]) -> str:
    return json.dumps({"id": event_id, "object": "event", "type": kind, "api_version": "2025-03-31",
                       "created": int(time.time()), "livemode": False, "pending_webhooks": 1,
                       "data": {"object": obj}})


def subscription(status: str = "active", plan: str = "pro") -> dict[str, Any]:
    return {"id": "sub_123", "object": "subscription", "customer": "cus_acme", "status": status,
            "metadata": {"tally_tenant_id": "acme"}, "cancel_at_period_end": False,
            "items": {"object": "list", "data": [{
                "id": "si_1", "object": "subscription_item",
                "current_period_start": PERIOD[0], "current_period_end": PERIOD[1],
                "price": {"id": "price_1", "object": "price",
                          "metadata": {"tally_plan_id": plan}}}]}}


def deliver(settings: Settings,
            *requests: tuple[str | bytes, dict[str, str]]) -> list[tuple[int, Any]]:
    """POST each (body, headers) to a running receiver; the (status, JSON) answers."""

    async def run() -> list[tuple[int, Any]]:
        receiver = WebhookReceiver(settings, SECRET)
        async with TestClient(TestServer(receiver.app())) as client:
            answers = []
            for body, headers in requests:
                response = await client.post("/stripe/webhook", data=body, headers=headers)
                answers.append((response.status, await response.json(content_type=None)))
            return answers

    return asyncio.run(run())


def test_webhook_with_a_good_signature_moves_the_invoice_status_forward_only(
    settings_factory: Callable[..., Settings], db: str,
) -> None:
    settings = settings_factory(database_url=db)
    sql(db, "INSERT INTO tally.invoices (invoice_id, tenant_id, period_start, period_end,"
            " currency, subtotal_cents, total_cents, status, stripe_invoice_id)"
            " VALUES ('acme:1', 'acme', now(), now(), 'usd', 100, 100, 'open', 'in_1')")
    paid = event("evt_paid", "invoice.paid", {"id": "in_1", "object": "invoice"})
    late_finalized = event("evt_fin", "invoice.finalized", {"id": "in_1", "object": "invoice"})

    answers = deliver(settings, (paid, signed(paid)), (late_finalized, signed(late_finalized)))

    assert [status for status, _ in answers] == [200, 200]
    assert [a["outcome"] for _, a in answers] == ["invoice paid", "invoice unchanged"]
    assert sql(db, "SELECT status FROM tally.invoices") == [("paid",)]


def test_webhook_with_a_forged_or_missing_signature_is_rejected_with_400(
    settings_factory: Callable[..., Settings], db: str,
) -> None:
    settings = settings_factory(database_url=db)
    body = event("evt_forged", "invoice.paid", {"id": "in_1", "object": "invoice"})
    tampered = body.replace("in_1", "in_2")

    answers = deliver(settings, (body, signed(body, secret="whsec_attacker")),
                      (tampered, signed(body)), (body, {"Content-Type": "application/json"}))

    assert [status for status, _ in answers] == [400, 400, 400]
    assert sql(db, "SELECT count(*) FROM tally.stripe_webhook_events") == [(0,)]


def test_webhook_with_a_stale_signature_is_rejected_with_400(
    settings_factory: Callable[..., Settings], db: str,
) -> None:
    settings = settings_factory(database_url=db)
    body = event("evt_old", "invoice.paid", {"id": "in_1", "object": "invoice"})

    [(status, answer)] = deliver(settings, (body, signed(body, at=int(time.time()) - 600)))

    assert status == 400 and "tolerance" in answer["error"]


def test_webhook_timestamped_beyond_the_tolerance_in_the_future_is_rejected_with_400(
    settings_factory: Callable[..., Settings], db: str,
) -> None:
    settings = settings_factory(database_url=db)
    body = event("evt_future", "invoice.paid", {"id": "in_1", "object": "invoice"})
    soon = event("evt_soon", "invoice.paid", {"id": "in_1", "object": "invoice"})

    answers = deliver(settings, (body, signed(body, at=int(time.time()) + 86_400)),
                      (soon, signed(soon, at=int(time.time()) + 60)))

    (status, answer), (soon_status, _) = answers
    assert status == 400 and "tolerance" in answer["error"] and "future" in answer["error"]
    assert soon_status == 200  # clocks differ a little: within the tolerance is fine
    assert sql(db, "SELECT event_id FROM tally.stripe_webhook_events") == [("evt_soon",)]


def test_a_body_that_is_not_utf8_is_rejected_with_400(
    settings_factory: Callable[..., Settings], db: str,
) -> None:
    settings = settings_factory(database_url=db)
    body = b'{"id": "evt_\xff"}'
    [(status, answer)] = deliver(settings, (body, signed(body.decode("latin-1"))))
    assert status == 400 and "invalid webhook" in answer["error"]


def _unusable_count(cause: str) -> float:
    value = REGISTRY.get_sample_value("tally_billing_webhooks_unusable_total", {"cause": cause})
    return value or 0.0


def test_a_signed_event_tally_cannot_use_is_recorded_and_acknowledged(
    settings_factory: Callable[..., Settings], db: str,
) -> None:
    settings = settings_factory(database_url=db)
    bad_period = subscription()
    bad_period["items"]["data"][0]["current_period_start"] = "soon"
    huge_period = subscription()
    huge_period["items"]["data"][0]["current_period_end"] = 10**30
    items_not_a_list = {**subscription(), "items": "sub_items"}
    no_tenant = {**subscription(), "customer": "cus_stranger", "metadata": {}}
    bodies = [
        event("evt_bad_period", "customer.subscription.created", bad_period),
        event("evt_huge_period", "customer.subscription.created", huge_period),
        event("evt_items", "customer.subscription.updated", items_not_a_list),
        event("evt_stranger", "customer.subscription.created", no_tenant),
        json.dumps({**json.loads(event("evt_list", "invoice.paid", {})),
                    "data": {"object": ["in_1"]}}),
        "[]",
    ]
    malformed, unmapped = _unusable_count("malformed"), _unusable_count("unmapped")

    answers = deliver(settings, *((b, signed(b)) for b in bodies),
                      (bodies[0], signed(bodies[0])))  # Stripe redelivers: already recorded

    assert [status for status, _ in answers] == [200] * 7
    assert all(a["outcome"].startswith("unusable: ") for _, a in answers[:6])
    assert answers[6][1] == {"received": True, "duplicate": True}
    rows = dict(sql(db, "SELECT event_id, reason FROM tally.stripe_webhook_unusable"))
    assert set(rows) == {"evt_bad_period", "evt_huge_period", "evt_items", "evt_stranger",
                         "evt_list", f"sha256:{hashlib.sha256(b'[]').hexdigest()}"}
    assert "current_period_start is not a Unix time: 'soon'" in rows["evt_bad_period"]
    assert "not a Tally tenant" in rows["evt_stranger"]
    assert "not a Stripe event: no valid data.object" in rows["evt_list"]
    payloads = dict(sql(db, "SELECT event_id, payload FROM tally.stripe_webhook_unusable"))
    assert payloads["evt_items"] == bodies[2]
    assert _unusable_count("malformed") - malformed == 5
    assert _unusable_count("unmapped") - unmapped == 1
    assert read_records(settings, settings.topics.subscriptions) == []  # nothing published


def test_subscription_webhook_becomes_one_tally_event_even_when_stripe_redelivers_it(
    settings_factory: Callable[..., Settings], db: str,
) -> None:
    settings = settings_factory(database_url=db)
    created = event("evt_sub_1", "customer.subscription.created", subscription())
    deleted = event("evt_sub_2", "customer.subscription.deleted", subscription("canceled"))

    answers = deliver(settings, (created, signed(created)), (created, signed(created)),
                      (deleted, signed(deleted)))

    assert [a for _, a in answers] == [
        {"received": True, "outcome": "subscription created"},
        {"received": True, "duplicate": True},
        {"received": True, "outcome": "subscription canceled"}]
    events = [e for r in read_records(settings, settings.topics.subscriptions)
              for e in (lambda v: v if isinstance(v, list) else [v])(loads(r.value))]
    assert [(e["id"], e["type"], e["subject"]) for e in events] == [
        ("stripe-evt_sub_1", "tally.subscription.created.v1", "acme"),
        ("stripe-evt_sub_2", "tally.subscription.canceled.v1", "acme")]
    assert events[0]["data"]["plan_id"] == "pro"
    assert events[0]["data"]["stripe_customer_id"] == "cus_acme"
    assert events[0]["data"]["period_start"].startswith(
        datetime.fromtimestamp(PERIOD[0], UTC).strftime("%Y-%m-%dT%H:%M:%S"))


def test_the_receiver_listens_on_loopback_unless_its_setting_says_otherwise(
    settings_factory: Callable[..., Settings], db: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_factory(database_url=db)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", SECRET)
    port = free_port()

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(serve(settings, port, stop=stop))
        try:
            await asyncio.to_thread(wait_accepting, "127.0.0.1", port, 60)
            assert not task.done(), task.exception()  # the receiver, not another process
            await asyncio.to_thread(assert_reachable_only_on_loopback, port)
        finally:
            stop.set()
            await task

    assert settings.webhooks_host == "127.0.0.1"
    asyncio.run(scenario())
