"""Tally meters a tenant the same whatever partitioner its producers use (issue 17, item 6).

Tally's SDK publishes with aiokafka's default partitioner (murmur2, as Java clients do);
services in Go, Node or Python's confluent-kafka publish through librdkafka, whose
default partitioner (`consistent_random`) is CRC32 of the key modulo the partition count.
For the tenants chosen here the two put the tenant on different partitions (asserted, so
the test cannot pass vacuously), and the real worker must still place each tenant's usage
under its subscription, in one counter, with duplicates across clients counted once.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from confluent_kafka import Producer

from domain.periods import calendar_month
from producers import ProducerOptions, SyncUsageProducer
from runtime.kafka import owner_partition
from runtime.settings import Settings
from schemas.codec import loads
from tests.conftest import WorkerProcess
from tests.helpers import record, subscription, usage
from tests.kafka_helpers import publish_seed_catalog, read_compacted, read_records, wait_for

pytestmark = pytest.mark.e2e
PARTITIONS = 4
NOW = datetime.now(UTC)
PERIOD = calendar_month(NOW)


def _librdkafka_partition(tenant: str) -> int:
    """librdkafka's `consistent_random` for a non-empty key."""
    return zlib.crc32(tenant.encode()) % PARTITIONS


def _split_tenants(count: int) -> list[str]:
    """Tenants that the two default partitioners put on different partitions."""
    candidates = (f"tenant-{i}" for i in range(1000))
    return [t for t in candidates
            if _librdkafka_partition(t) != owner_partition(t.encode(), PARTITIONS)][:count]


class Librdkafka:
    """A service publishing through confluent-kafka with its default partitioner."""

    def __init__(self, settings: Settings) -> None:
        self.producer = Producer({"bootstrap.servers": settings.require_kafka(), "acks": "all"})
        self.partitions: dict[str, set[int]] = {}  # tenant -> partitions it landed on

    def send(self, topic: str, tenant: str, value: bytes) -> None:
        def delivered(error: Any, message: Any) -> None:
            assert error is None, error
            self.partitions.setdefault(tenant, set()).add(message.partition())

        self.producer.produce(topic, key=tenant.encode(), value=value, on_delivery=delivered)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0, "confluent-kafka did not deliver everything"


def _quantity(i: int) -> str:
    return str(i % 3 + 1)


def test_usage_meets_its_subscription_whatever_partitioner_published_either(
    settings_factory: Callable[..., Settings],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    settings = settings_factory(partitions=PARTITIONS)
    publish_seed_catalog(settings)
    a, b, c = _split_tenants(3)
    topics = settings.topics
    worker = worker_factory(settings)
    wait_for(worker.healthy, bool, what="the worker to be ready")
    librdkafka = Librdkafka(settings)
    sdk = SyncUsageProducer(settings, ProducerOptions(source="svc/partitioners"))

    # A subscribes through librdkafka and uses through the SDK; B the other way round.
    librdkafka.send(topics.subscriptions, a, record(subscription(
        a, "created", "pro", PERIOD.start, PERIOD.end, time=PERIOD.start)))
    librdkafka.flush()
    sdk.subscription_created(b, "starter", PERIOD.start, PERIOD.end, time=PERIOD.start)
    sdk.flush()
    wait_for(lambda: read_compacted(settings, topics.worker_state).keys(),
             lambda keys: {f"s/{a}", f"s/{b}"} <= keys, what="both subscriptions applied")

    for i in range(40):
        sdk.record(a, "api_calls", _quantity(i), event_id=f"a-{i}", time=NOW)
    for i in range(0, 40, 10):
        librdkafka.send(topics.usage, b, record(*[
            usage(b, quantity=_quantity(j), event_id=f"b-{j}", time=NOW)
            for j in range(i, i + 10)]))
    # C publishes through both clients, ids 20-29 through each: a retry across services.
    for i in range(30):
        sdk.record(c, "api_calls", _quantity(i), event_id=f"c-{i}", time=NOW)
    for i in range(20, 40):
        librdkafka.send(topics.usage, c, record(
            usage(c, quantity=_quantity(i), event_id=f"c-{i}", time=NOW)))
    sdk.close()
    librdkafka.flush()

    # Not vacuous: librdkafka put every tenant elsewhere than the SDK does.
    for tenant in (a, b, c):
        assert librdkafka.partitions[tenant] == {_librdkafka_partition(tenant)}
        assert _librdkafka_partition(tenant) != owner_partition(tenant.encode(), PARTITIONS)

    total = sum(Decimal(_quantity(i)) for i in range(40))
    key = f"/api_calls/{PERIOD.start.isoformat()}"
    expected = {a + key: total, b + key: total, c + key: total}
    wait_for(lambda: {k: Decimal(v["value"]) for k, v in
                      read_compacted(settings, topics.counters).items()},
             lambda got: got == expected, timeout=90, what="exact counters")

    # One counter per tenant and meter: every record of it comes from the owner.
    writers: dict[str, set[int]] = {}
    for r in read_records(settings, topics.counters):
        writers.setdefault(r.key.decode(), set()).add(r.partition)
    assert writers == {a + key: {owner_partition(a.encode(), PARTITIONS)},
                       b + key: {owner_partition(b.encode(), PARTITIONS)},
                       c + key: {owner_partition(c.encode(), PARTITIONS)}}

    accepted: dict[str, dict[str, str]] = {}
    for r in read_records(settings, topics.usage_accepted):
        for event in loads(r.value):
            accepted.setdefault(event["tenant_id"], {}).setdefault(event["event_id"],
                                                                   event["plan_id"])
    assert accepted[a] == {f"a-{i}": "pro" for i in range(40)}
    assert accepted[b] == {f"b-{i}": "starter" for i in range(40)}
    assert accepted[c] == {f"c-{i}": "free" for i in range(40)}
    states = read_compacted(settings, topics.quota_state)
    assert (states[f"{a}/api_calls"]["plan_id"], Decimal(states[f"{a}/api_calls"]["used"])) \
        == ("pro", total)
    assert (states[f"{b}/api_calls"]["plan_id"], Decimal(states[f"{b}/api_calls"]["used"])) \
        == ("starter", total)
    assert worker.metric('tally_worker_events_total{outcome="duplicate"}') == 10
    assert worker.stop() == 0
