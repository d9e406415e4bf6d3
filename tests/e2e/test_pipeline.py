"""The whole pipeline on the real broker and real Postgres: producer -> worker ->
projector -> push-usage -> Stripe double. Totals must be exact at every stage."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest
from stripe_testkit import StripeDouble

from billing_jobs.journal import RetryPolicy
from billing_jobs.push_usage import run_push_usage
from runtime.settings import Settings
from tests.conftest import WorkerProcess
from tests.helpers import record, usage
from tests.kafka_helpers import publish, publish_seed_catalog, wait_for
from tests.services import ProjectorThread

pytestmark = pytest.mark.e2e
NOW = datetime.now(UTC)
FAST_RETRIES = RetryPolicy(attempts=8, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def stripe_double() -> Iterator[StripeDouble]:
    with StripeDouble() as double:
        yield double
        assert double.inspect().invalid_requests == ()  # Stripe's OpenAPI document holds


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


def test_events_with_duplicates_arrive_exactly_once_in_ledger_rollups_and_stripe(
    settings_factory: Callable[..., Settings],
    worker_factory: Callable[[Settings], WorkerProcess],
    database_url: str,
    stripe_double: StripeDouble,
) -> None:
    settings = settings_factory(database_url=database_url, stripe_api_key="sk_test_e2e",
                                stripe_api_base=stripe_double.url)
    publish_seed_catalog(settings)
    worker = worker_factory(settings)
    projector = ProjectorThread(settings)

    expected: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    distinct = 0
    records: list[tuple[str | None, bytes]] = []
    for t in range(6):
        tenant = f"acme-{t}"
        events = [usage(tenant, meter=("api_calls", "tokens")[i % 2], quantity=str(i % 5 + 1),
                        event_id=f"{tenant}-{i}", time=NOW) for i in range(400)]
        for e in events:
            expected[(tenant, e["data"]["meter"])] += Decimal(e["data"]["quantity"])
        distinct += len(events)
        records += [(tenant, record(*events[i:i + 100])) for i in range(0, 400, 100)]
        records += [(tenant, record(*events[50:150]))]  # a producer retry: 100 duplicates
        records += [(tenant, record(e)) for e in events[:10]]  # single-event redeliveries
    publish(settings, settings.topics.usage, records)

    ledger_count = wait_for(
        lambda: query(database_url, "SELECT count(*) FROM tally.usage_events")[0][0],
        lambda n: n == distinct, timeout=90, what=f"{distinct} ledger rows",
    )
    assert ledger_count == distinct
    by_period = {(t, m): q for t, m, q in query(
        database_url, "SELECT tenant_id, meter, quantity FROM tally.usage_by_period")}
    daily: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for t, m, q in query(database_url, "SELECT tenant_id, meter, quantity FROM tally.usage_daily"):
        daily[(t, m)] += q  # type: ignore[operator]
    ledger: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for t, m, q in query(database_url,
                         "SELECT tenant_id, meter, sum(quantity) FROM tally.usage_events"
                         " GROUP BY 1, 2"):
        ledger[(t, m)] += q  # type: ignore[operator]
    assert ledger == expected
    assert daily == expected
    assert by_period == expected

    stripe_double.faults(rate=0.33, kinds=("429", "500"), seed=7)  # a third of calls fail
    first = run_push_usage(settings, policy=FAST_RETRIES)
    assert not first.failed, first.summary()
    stripe_double.faults()
    second = run_push_usage(settings, policy=FAST_RETRIES)  # a re-run sends nothing new
    assert second.events_sent == 0 and not second.failed

    snapshot = stripe_double.inspect()
    customers = {c["id"]: c["metadata"]["tally_tenant_id"] for c in snapshot.customers}
    meters = {m["id"]: m["event_name"] for m in snapshot.meters}
    received: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for event in snapshot.meter_events:
        tenant = customers[event["payload"]["stripe_customer_id"]]
        received[(tenant, event["event_name"].removeprefix("tally_"))] += Decimal(
            event["payload"]["value"])
    assert received == expected
    assert sorted(meters.values()) == ["tally_api_calls", "tally_tokens"]
    assert snapshot.faults_injected > 0

    projector.stop()
    assert worker.stop() == 0
