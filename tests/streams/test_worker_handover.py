"""Two workers share the partitions; one stops, the other takes over, counters stay exact."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import orjson

from runtime.settings import Settings
from tests.conftest import WorkerProcess
from tests.helpers import record, usage
from tests.kafka_helpers import publish, publish_seed_catalog, read_compacted, wait_for

NOW = datetime.now(UTC)
TENANTS = [f"tenant-{t}" for t in range(12)]


def counters_by_tenant(settings: Settings) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = {}
    for value in read_compacted(settings, settings.topics.counters).values():
        totals[value["tenant_id"]] = totals.get(value["tenant_id"], Decimal(0)) + Decimal(
            value["value"])
    return totals


def partitions(worker: WorkerProcess) -> set[int]:
    """The partitions a worker holds state for (its /healthz); empty while down."""
    try:
        url = f"http://127.0.0.1:{worker.web_port}/healthz"
        with urllib.request.urlopen(url, timeout=2) as r:
            return set(orjson.loads(r.read())["partitions"])
    except OSError:
        return set()


def batches(start: int, count: int) -> list[tuple[str | None, bytes]]:
    """`count` records of 50 one-unit events each, round-robin over the tenants."""
    out: list[tuple[str | None, bytes]] = []
    for n in range(start, start + count):
        tenant = TENANTS[n % len(TENANTS)]
        out.append((tenant, record(*[usage(tenant, quantity="1", event_id=f"{n}-{i}", time=NOW)
                                     for i in range(50)])))
    return out


def expected_after(count: int) -> dict[str, Decimal]:
    expected = dict.fromkeys(TENANTS, Decimal(0))
    for n in range(count):
        expected[TENANTS[n % len(TENANTS)]] += 50
    return expected


def test_two_workers_share_the_partitions_and_one_takes_over_when_the_other_stops(
    settings_factory: Callable[..., Settings],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    settings = settings_factory(partitions=4)
    publish_seed_catalog(settings)
    first, second = worker_factory(settings), worker_factory(settings)  # own web ports
    assert first.web_port != second.web_port
    wait_for(lambda: first.healthy() and second.healthy(), bool, what="two ready workers")

    total = 240
    publish(settings, settings.topics.usage, batches(0, 60))
    held = wait_for(lambda: (partitions(first), partitions(second)),
                    lambda got: bool(got[0]) and bool(got[1]) and not got[0] & got[1]
                    and got[0] | got[1] == set(range(4)),
                    what="the partitions split between the two workers")
    wait_for(lambda: counters_by_tenant(settings), lambda got: got == expected_after(60),
             what="exact counters from both workers")

    # Usage keeps coming while the first worker stops (SIGTERM: finish, flush, commit).
    sent = [60]
    stopped = threading.Event()

    def trickle() -> None:
        while sent[0] < total:
            publish(settings, settings.topics.usage, batches(sent[0], 10))
            sent[0] += 10
            time.sleep(0.05 if stopped.is_set() else 0.2)

    publisher = threading.Thread(target=trickle)
    publisher.start()
    try:
        wait_for(lambda: sent[0], lambda n: n >= 100, what="more usage on the way")
        assert first.stop() == 0
        stopped.set()
    finally:
        publisher.join()

    wait_for(lambda: partitions(second), lambda got: got == set(range(4)), timeout=60,
             what=f"the second worker to take over the first's partitions {held[0]}")
    wait_for(lambda: counters_by_tenant(settings), lambda got: got == expected_after(total),
             timeout=120, what="exact counters after the handover")
    assert second.stop() == 0
