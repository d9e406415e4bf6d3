"""From the first event to a finalized Stripe invoice: producer SDK -> broker -> worker ->
projector -> push-usage -> invoice -> reconcile, with the Stripe double. The invoice job
counts usage only as far as the ledger holds it (its ingestion watermark): the period's
invoice waits until an event ingested after its due time has been projected."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from stripe_testkit import StripeDouble

from billing_jobs.invoice_run import run_invoices
from billing_jobs.push_usage import run_push_usage
from billing_jobs.reconcile import run_reconcile
from billing_jobs.stripe_catalog import sync_catalog
from domain.periods import calendar_month
from producers import SyncUsageProducer
from runtime.postgres import migrate
from runtime.settings import Settings
from tests.billing_jobs.conftest import CATALOG, FAST, sql
from tests.conftest import WorkerProcess
from tests.helpers import ms, record, usage
from tests.kafka_helpers import publish, publish_seed_catalog, publish_stamped, wait_for
from tests.services import ProjectorThread

pytestmark = pytest.mark.e2e


@pytest.fixture
def live_double() -> Iterator[StripeDouble]:
    with StripeDouble() as double:  # the real clock: events are timestamped now
        yield double
        assert double.inspect().invalid_requests == ()  # Stripe's OpenAPI document holds


def test_a_period_of_events_ends_as_one_finalized_invoice_with_the_expected_amounts(
    settings_factory: Callable[..., Settings], worker_factory: Callable[[Settings], WorkerProcess],
    database_url: str, live_double: StripeDouble,
) -> None:
    settings = settings_factory(database_url=database_url, stripe_api_key="sk_test_e2e",
                                stripe_api_base=live_double.url)
    publish_seed_catalog(settings)
    migrate(database_url)
    worker = worker_factory(settings)
    projector = ProjectorThread(settings)
    now = datetime.now(UTC)
    period = calendar_month(now)
    with SyncUsageProducer(settings) as producer:  # the tenant subscribes to Starter
        producer.subscription_created("acme", "starter", period.start, period.end,
                                      time=period.start, event_id="acme-sub-1")
    wait_for(lambda: sql(database_url, "SELECT plan_id FROM tally.subscriptions"),
             lambda rows: rows == [("starter",)], timeout=60, what="the subscription")
    # 12,000 API calls (2,000 over at 0.1c) and 1.5M tokens (500 packages over at 2c),
    # with a producer retry that repeats 20 events.
    events = [usage("acme", "api_calls", "100", event_id=f"a-{i}", time=now) for i in range(120)]
    events += [usage("acme", "tokens", "25000", event_id=f"t-{i}", time=now) for i in range(60)]
    publish(settings, settings.topics.usage,
            [("acme", record(*events[i:i + 50])) for i in range(0, len(events), 50)]
            + [("acme", record(*events[100:120]))])
    wait_for(lambda: sql(database_url, "SELECT meter, quantity, plan_id FROM"
                                       " tally.usage_by_period ORDER BY meter"),
             lambda rows: rows == [("api_calls", 12_000, "starter"),
                                   ("tokens", 1_500_000, "starter")],
             timeout=90, what="the period's usage")

    sync_catalog(settings, CATALOG, FAST)
    pushed = run_push_usage(settings, policy=FAST, catalog=CATALOG)
    opening = run_invoices(settings, datetime.now(UTC), FAST, catalog=CATALOG)
    waiting = run_invoices(settings, period.end + timedelta(hours=2), FAST, catalog=CATALOG)
    reconciled = run_reconcile(settings, policy=FAST)
    # The next period's traffic: an event ingested after the period's invoice is due.
    later = period.end + timedelta(hours=2)
    publish_stamped(settings, settings.topics.usage, [
        ("acme", record(usage("acme", "api_calls", "1", event_id="next-1", time=later)),
         ms(later))])
    wait_for(lambda: sql(database_url, "SELECT count(*) FROM tally.usage_events"),
             lambda rows: rows == [(181,)], timeout=60, what="the next period's event")
    invoiced = run_invoices(settings, later, FAST, catalog=CATALOG)

    start = f"{period.start:%Y%m%dT%H%M%SZ}"
    assert not pushed.failed and pushed.events_sent == 2
    assert opening.billed == {f"acme/{start}/{start}/opening/usd": 2900}
    assert not waiting.issued and waiting.known_through < period.end
    cycle = f"acme/{start}/{period.end:%Y%m%dT%H%M%SZ}/cycle/usd"
    assert invoiced.billed == {cycle: 2900 + 200 + 1000}
    invoice = next(i for i in live_double.inspect().invoices
                   if i["metadata"]["tally_invoice_id"] == cycle)
    assert (invoice["status"], invoice["total"]) == ("open", 4100)
    assert [line["amount"] for line in invoice["lines"]["data"]] == [2900, 200, 0, 1000]
    assert reconciled.mismatches == [], reconciled.summary()
    projector.stop()
    assert worker.stop() == 0
