"""Fixtures of the billing job tests: a fresh database, the Stripe double, seeded rows.

Job-level tests write `usage_by_period` / `subscriptions` rows directly (what the projector
would write) and pass the catalog in, so they need Postgres and the double but no broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

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
