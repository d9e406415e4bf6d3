"""Fixtures of the billing job tests: a fresh database, the Stripe double, seeded rows.

Job-level tests write `usage_by_period` / `subscriptions` rows directly (what the projector
would write) and pass the catalog in, so they need Postgres and the double but no broker.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import psycopg
import pytest
from stripe_testkit import StripeDouble

from billing_jobs.journal import RetryPolicy
from runtime.postgres import migrate
from runtime.settings import Settings
from schemas.plans import Catalog, default_catalog_path, load_catalog

CATALOG = load_catalog(default_catalog_path())
FAST = RetryPolicy(attempts=10, base_delay=0.005, max_delay=0.02, timeout=0.3)
# A period that ended long enough ago to invoice, recent enough for meter events.
START = datetime(2026, 10, 1, tzinfo=UTC)
END = datetime(2026, 11, 1, tzinfo=UTC)
NEXT_END = datetime(2026, 12, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 2, tzinfo=UTC)  # END + a day: closed, and within 35 days


@pytest.fixture
def double() -> Iterator[StripeDouble]:
    # Pinned clock: the double's "now" is the tests' NOW, so 35-day checks line up
    # (`double.advance` moves it on).
    with StripeDouble(clock=lambda: NOW.timestamp()) as running:
        yield running
        # Every request Tally sent in the test broke nothing in Stripe's OpenAPI document.
        assert running.inspect().invalid_requests == ()


@pytest.fixture
def db(database_url: str) -> str:
    migrate(database_url)
    return database_url


@pytest.fixture
def settings(db: str, double: StripeDouble) -> Settings:
    return Settings(database_url=db, stripe_api_key="sk_test_jobs", stripe_api_base=double.url)


def sql(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def put_usage(db: str) -> Callable[..., None]:
    """Set a tenant's period total for a meter, as the projector's rollup would."""

    def put(tenant: str, meter: str, quantity: int | str, plan: str = "starter",
            start: datetime = START, end: datetime = END) -> None:
        sql(db, "INSERT INTO tally.usage_by_period (tenant_id, meter, period_start, period_end,"
                " plan_id, quantity, event_count) VALUES (%s,%s,%s,%s,%s,%s,1)"
                " ON CONFLICT (tenant_id, meter, period_start)"
                " DO UPDATE SET quantity = excluded.quantity",
            tenant, meter, start, end, plan, Decimal(quantity))

    return put


def catalog_with(**plans: Any) -> Catalog:
    """The seed catalog plus extra plans (plan id -> plan document)."""
    doc = CATALOG.model_dump(mode="json")
    doc["plans"].update(plans)
    return Catalog.model_validate(doc)


@pytest.fixture
def history(db: str) -> Callable[..., None]:
    """Add a subscription event to a tenant's history, as the projector stores it."""
    offsets = iter(range(1_000_000))

    def add(tenant: str, kind: str, plan: str, time: datetime = START,
            received: datetime | None = None, start: datetime = START, end: datetime = END,
            **extra: Any) -> None:
        data = {"plan_id": plan, "period_start": start.isoformat(),
                "period_end": end.isoformat(), **extra}
        sql(db, "INSERT INTO tally.subscription_events (tenant_id, event_id, type, source,"
                ' event_time, data, record_timestamp, topic, partition, "offset", item)'
                " VALUES (%s,%s,%s,'svc/test',%s,%s,%s,'tally.subscriptions',0,%s,0)",
            tenant, str(uuid.uuid4()), f"tally.subscription.{kind}.v1", time,
            orjson.dumps(data).decode(), received or time, next(offsets))

    return add


@pytest.fixture
def ledger(db: str) -> Callable[..., None]:
    """Add one counted event to the ledger, as the projector writes it."""

    def add(tenant: str, meter: str, quantity: int | str, time: datetime,
            ingested: datetime | None = None) -> None:
        month = time.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = (month + timedelta(days=32)).replace(day=1)
        sql(db, f"CREATE TABLE IF NOT EXISTS tally.usage_events_y{month:%Ym%m}"
                " PARTITION OF tally.usage_events FOR VALUES FROM"
                f" ('{month.isoformat()}') TO ('{following.isoformat()}')")
        sql(db, "INSERT INTO tally.usage_events (event_id, tenant_id, meter, quantity,"
                " event_time, ingested_at, source, period_start, period_end, plan_id)"
                " VALUES (%s,%s,%s,%s,%s,%s,'svc/test',%s,%s,'starter')",
            str(uuid.uuid4()), tenant, meter, Decimal(quantity), time, ingested or time,
            month, following)

    return add
