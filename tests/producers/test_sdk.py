"""The SDK against a real broker: what is recorded arrives, batched per tenant, intact."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from producers import (
    PayloadTooLargeError,
    ProducerClosedError,
    ProducerOptions,
    SyncUsageProducer,
    UsageProducer,
    build_usage_event,
)
from runtime.settings import Settings
from schemas import codec
from schemas.events import SubscriptionEvent, UsageEvent
from tests.producers import all_events, consume, run

SettingsFactory = Callable[..., Settings]
T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def test_recorded_events_arrive_as_batch_records_keyed_by_tenant_exactly_as_recorded(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory()
    tenants = ["tenant-a", "tenant-b", "tenant-c"]
    recorded: dict[str, dict[str, Any]] = {}

    async def scenario() -> list[Any]:
        options = ProducerOptions(source="svc/api-gateway", max_batch_events=100)
        async with UsageProducer(settings, options) as producer:
            for i in range(900):
                tenant = tenants[i % 3]
                args: dict[str, Any] = {
                    "quantity": [1, Decimal("2.5"), 0.25, "7"][i % 4],
                    "dimensions": {"endpoint": f"/v1/{i % 5}"} if i % 2 else None,
                    "time": T0 + timedelta(seconds=i) if i % 3 == 0 else None,
                    "event_id": f"caller-{i}" if i % 10 == 0 else None,
                }
                await producer.record(tenant, "api_calls", **args)
                recorded[f"{tenant}#{i}"] = {"tenant": tenant, **args}
        return await consume(settings, settings.topics.usage, 900)

    received = run(scenario())
    events = [UsageEvent.model_validate(e) for e in all_events(received)]
    assert len(events) == 900
    assert len({e.id for e in events}) == 900
    for record in received:
        assert record.headers["content-type"] == codec.BATCH_CONTENT_TYPE.encode()
        assert {e["subject"] for e in record.events} == {record.key}
        assert len(record.events) <= 100
    # Per tenant, events arrive in the order they were recorded, as they were recorded.
    for tenant in tenants:
        mine = [e for e in events if e.subject == tenant]
        wanted = [v for v in recorded.values() if v["tenant"] == tenant]
        assert len(mine) == len(wanted) == 300
        for event, args in zip(mine, wanted, strict=True):
            assert event.source == "svc/api-gateway"
            assert event.data.meter == "api_calls"
            assert event.data.quantity == Decimal(str(args["quantity"]))
            assert event.data.dimensions == (args["dimensions"] or {})
            if args["time"] is not None:
                assert event.time == args["time"]
            if args["event_id"] is not None:
                assert event.id == args["event_id"]


def test_batch_records_stay_under_the_byte_bound(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()

    async def scenario() -> list[Any]:
        options = ProducerOptions(max_batch_bytes=4096, max_batch_events=10_000)
        async with UsageProducer(settings, options) as producer:
            for _ in range(300):
                await producer.record("tenant-a", "api_calls", 1, dimensions={"k": "v" * 100})
        return await consume(settings, settings.topics.usage, 300)

    received = run(scenario())
    assert sum(len(r.events) for r in received) == 300
    assert len(received) > 1
    assert all(r.value_bytes <= 4096 for r in received)


def test_a_partial_batch_is_sent_after_linger_without_flush(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory()

    async def scenario() -> list[Any]:
        async with UsageProducer(settings, ProducerOptions(linger_ms=20)) as producer:
            for _ in range(3):
                await producer.record("tenant-a", "api_calls", 1)
            # No flush: the 20 ms bound alone must get these out.
            received = await consume(settings, settings.topics.usage, 3, timeout=10)
            assert producer.buffered_events == 0
            return received

    received = run(scenario())
    assert [len(r.events) for r in received] == [3]


def test_record_with_wait_returns_once_the_broker_acknowledged_the_event(
    settings_factory: SettingsFactory,
) -> None:
    # The entitlement API publishes a consumed use this way: its answer must not go out
    # before the event is in the log.
    settings = settings_factory()

    async def scenario() -> list[Any]:
        async with UsageProducer(settings, ProducerOptions(linger_ms=200)) as producer:
            await producer.record("tenant-a", "api_calls", 1)
            assert producer.buffered_events == 1  # without wait: buffered, lingering
            await producer.record("tenant-b", "api_calls", Decimal("2.5"), event_id="use-1",
                                  dimensions={"endpoint": "/v1/x"}, time=T0, wait=True)
            # tenant-b's batch is acknowledged (and tenant-a's, sealed before it: batches
            # are settled in seal order).
            assert producer.buffered_events == 0
            received = await consume(settings, settings.topics.usage, 2, timeout=10)
            return received

    events = {e["subject"]: e for e in all_events(run(scenario()))}
    assert events["tenant-b"]["id"] == "use-1"
    assert events["tenant-b"]["data"] == {"meter": "api_calls", "quantity": "2.5",
                                          "dimensions": {"endpoint": "/v1/x"}}


def test_publish_with_wait_returns_when_a_batch_settled_before_the_wait_began(
    settings_factory: SettingsFactory,
) -> None:
    # Room for one event: the second event of the call waits for room until the first
    # one's batch is acknowledged, so that batch is settled before `publish` starts waiting
    # on its batches. The wait must see it settled, not hang on a waiter nobody resolves.
    settings = settings_factory()
    events = [UsageEvent.model_validate(build_usage_event(
        tenant, "api_calls", 1, event_id=f"e-{tenant}", time=T0, source="svc/test"))
        for tenant in ("tenant-a", "tenant-b")]

    async def scenario() -> int:
        async with UsageProducer(settings, ProducerOptions(
                max_buffered_events=1, linger_ms=0)) as producer:
            await asyncio.wait_for(producer.publish(events, wait=True), 30)
            return producer.buffered_events

    assert run(scenario()) == 0


def test_subscription_helpers_publish_to_the_subscriptions_topic(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory()
    end = T0 + timedelta(days=30)

    async def scenario() -> tuple[list[Any], list[Any]]:
        async with UsageProducer(settings, ProducerOptions(source="svc/billing")) as producer:
            await producer.subscription_created("tenant-a", "pro", T0, end,
                                                stripe_customer_id="cus_1")
            await producer.subscription_plan_changed("tenant-a", "enterprise", T0, end)
            await producer.subscription_renewed("tenant-a", "enterprise", end,
                                                end + timedelta(days=30))
            await producer.subscription_canceled("tenant-a", "enterprise", end,
                                                 end + timedelta(days=30),
                                                 cancel_at_period_end=True)
        subs = await consume(settings, settings.topics.subscriptions, 4)
        usage = await consume(settings, settings.topics.usage, 0, linger=0.3)
        return subs, usage

    subs, usage = run(scenario())
    events = [SubscriptionEvent.model_validate(e) for e in all_events(subs)]
    assert [e.type for e in events] == [
        "tally.subscription.created.v1", "tally.subscription.plan_changed.v1",
        "tally.subscription.renewed.v1", "tally.subscription.canceled.v1",
    ]
    assert events[0].data.stripe_customer_id == "cus_1"
    assert events[3].data.cancel_at_period_end is True
    assert {r.key for r in subs} == {"tenant-a"}
    assert usage == []


def test_an_event_larger_than_the_record_bound_is_refused(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory()

    async def scenario() -> None:
        async with UsageProducer(settings, ProducerOptions(max_batch_bytes=2048)) as producer:
            with pytest.raises(PayloadTooLargeError) as info:
                await producer.record("tenant-a", "api_calls", 1,
                                      dimensions={f"k{i}": "v" * 200 for i in range(20)})
            assert info.value.problems[0].field == "event"
            assert producer.buffered_events == 0

    run(scenario())


def test_the_buffer_never_holds_more_than_its_bound(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()

    async def scenario() -> int:
        options = ProducerOptions(max_buffered_events=50, max_batch_events=10)
        peak = 0
        async with UsageProducer(settings, options) as producer:
            for i in range(2000):
                await producer.record(f"tenant-{i % 7}", "api_calls", 1)
                peak = max(peak, producer.buffered_events)
        assert sum(len(r.events) for r in await consume(settings, settings.topics.usage, 2000))\
            == 2000
        return peak

    assert run(scenario()) <= 50


def test_record_after_close_is_refused(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()

    async def scenario() -> None:
        producer = UsageProducer(settings)
        with pytest.raises(ProducerClosedError):
            await producer.record("tenant-a", "api_calls", 1)  # not started
        await producer.start()
        await producer.close()
        with pytest.raises(ProducerClosedError):
            await producer.record("tenant-a", "api_calls", 1)

    run(scenario())


def test_close_delivers_what_was_buffered(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()

    async def scenario() -> list[Any]:
        producer = UsageProducer(settings, ProducerOptions(linger_ms=60_000))
        await producer.start()
        for _ in range(10):
            await producer.record("tenant-a", "api_calls", 1)
        await producer.close()  # linger is a minute: only close can have sent these
        return await consume(settings, settings.topics.usage, 10)

    assert len(all_events(run(scenario()))) == 10


def test_sync_producer_records_and_delivers_without_an_event_loop(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory()
    with SyncUsageProducer(settings, ProducerOptions(source="svc/cron")) as producer:
        for _ in range(5):
            producer.record("tenant-a", "api_calls", 2)
        producer.subscription_created("tenant-a", "pro", T0, T0 + timedelta(days=30))
        producer.flush()
    usage = run(consume(settings, settings.topics.usage, 5))
    subs = run(consume(settings, settings.topics.subscriptions, 1))
    assert [e["data"]["quantity"] for e in all_events(usage)] == ["2"] * 5
    assert all_events(subs)[0]["source"] == "svc/cron"
