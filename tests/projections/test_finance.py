"""What finance gets: the cookbook queries on real data, as the read-only tally_finance
role; as-of usage for audits; and no way to change anything."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from projections.cookbook import recipes
from runtime.settings import Settings
from tests.kafka_helpers import publish_seed_catalog
from tests.projections.support import (
    PERIOD_END,
    PERIOD_START,
    accepted,
    by_period,
    publish_accepted,
    wait_for_offsets,
)
from tests.services import ProjectorThread

DOC = Path(__file__).resolve().parents[2] / "docs" / "finance.md"
FIRST_INGEST = PERIOD_START + timedelta(days=5)
LATE_INGEST = PERIOD_END + timedelta(minutes=30)  # a late event, after the invoice


@pytest.fixture(scope="module")
def finance_db(settings_factory_module: Callable[..., Settings], module_database_url: str
               ) -> Iterator[str]:
    """Usage of three tenants on the seed catalog's plans, projected; two invoices."""
    settings = settings_factory_module(database_url=module_database_url)
    publish_seed_catalog(settings)
    at = PERIOD_START + timedelta(days=4)

    def event(tenant: str, n: int, quantity: str, plan: str, ingested: datetime) -> Any:
        e = accepted(tenant, f"{tenant}-{n}", "api_calls", quantity, at=at, plan_id=plan)
        return e.model_copy(update={"ingested_at": ingested})

    log = [
        [event("acme", i, "6000", "starter", FIRST_INGEST) for i in range(2)],  # 2,000 over
        [event("bolt", i, "300", "starter", FIRST_INGEST) for i in range(3)],
        [event("core", i, "40000", "pro", FIRST_INGEST) for i in range(2)],
        [event("acme", 9, "500", "starter", LATE_INGEST)],
    ]
    with ProjectorThread(settings):
        publish_accepted(settings, log)
        wait_for_offsets(module_database_url, settings.topics.usage_accepted, len(log))
        wait_for_offsets(module_database_url, settings.topics.plans, 5)
    with psycopg.connect(module_database_url) as conn:  # as the invoicing job writes them
        conn.execute(
            "INSERT INTO tally.invoices (invoice_id, tenant_id, period_start, period_end,"
            " currency, subtotal_cents, total_cents, status, stripe_invoice_id, created_at)"
            " VALUES ('inv_acme', 'acme', %(s)s, %(e)s, 'usd', 3100, 3100, 'open', 'in_1', %(c)s),"
            " ('inv_bolt', 'bolt', %(s)s, %(e)s, 'usd', 2900, 2900, 'paid', 'in_2', %(c)s)",
            {"s": PERIOD_START, "e": PERIOD_END, "c": PERIOD_END + timedelta(minutes=5)})
        conn.execute(
            "INSERT INTO tally.invoice_lines (invoice_id, line_no, meter, description, quantity,"
            " unit_amount_cents, amount_cents) VALUES"
            " ('inv_acme', 1, NULL, 'Starter', 1, 2900, 2900),"
            " ('inv_acme', 2, 'api_calls', 'API calls', 12000, 0.1, 200),"
            " ('inv_bolt', 1, 'api_calls', 'API calls', 900, 0, 0)")
    yield module_database_url


def _as_finance(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        conn.execute("SET ROLE tally_finance")
        return conn.execute(sql).fetchall()


def _cookbook(url: str, name: str) -> list[tuple[Any, ...]]:
    return _as_finance(url, recipes()[name].sql)


def test_usage_by_tenant_and_period(finance_db: str) -> None:
    rows = _cookbook(finance_db, "usage_by_tenant_and_period")
    assert [(r[0], r[1], r[4], r[5], r[6]) for r in rows] == [
        ("acme", "api_calls", "starter", Decimal(12500), 3),
        ("bolt", "api_calls", "starter", Decimal(900), 3),
        ("core", "api_calls", "pro", Decimal(80000), 2),
    ]


def test_top_consumers(finance_db: str) -> None:
    rows = _cookbook(finance_db, "top_consumers")
    assert [(r[2], r[3]) for r in rows] == [(1, "core"), (2, "acme"), (3, "bolt")]


def test_overage_by_plan_uses_the_plan_catalog_projected_from_the_plans_topic(
    finance_db: str
) -> None:
    rows = _cookbook(finance_db, "overage_by_plan")
    # starter includes 10,000 API calls, pro 100,000 (tally/catalog/plans.toml)
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [("starter", "api_calls", 1, Decimal(2500))]


def test_revenue_by_month_and_unpaid_invoices(finance_db: str) -> None:
    assert [(str(r[0]), r[1], r[2], r[3]) for r in _cookbook(finance_db, "revenue_by_month")] == [
        ("2026-11-01", "usd", 2, 6000)]
    assert [(r[0], r[5]) for r in _cookbook(finance_db, "unpaid_invoices")] == [
        ("inv_acme", "open")]


def test_invoice_audit_sees_usage_as_it_stood_when_the_invoice_was_made(finance_db: str) -> None:
    rows = _cookbook(finance_db, "invoice_audit")
    # The late event (ingested after the invoice) is in the rollup but not in the audit.
    assert [(r[0], r[3], r[4], r[5]) for r in rows] == [
        ("inv_acme", Decimal(12000), Decimal(12000), Decimal(0)),
        ("inv_bolt", Decimal(900), Decimal(900), Decimal(0)),
    ]


def test_usage_as_of_the_end_of_time_equals_the_rollups_and_as_of_earlier_leaves_later_rows_out(
    finance_db: str
) -> None:
    now = _as_finance(finance_db, "SELECT tenant_id, meter, quantity, event_count"
                      " FROM tally.usage_as_of('infinity')")
    assert {(t, m): (q, n) for t, m, q, n in now} == by_period(finance_db)
    before = _as_finance(finance_db, "SELECT tenant_id, quantity FROM tally.usage_as_of("
                         f"'{(LATE_INGEST - timedelta(seconds=1)).isoformat()}', 'acme')")
    assert before == [("acme", Decimal(12000))]


@pytest.mark.parametrize("statement", [
    "INSERT INTO tally.usage_by_period (tenant_id, meter, period_start, period_end, plan_id,"
    " quantity, event_count) VALUES ('x', 'm', now(), now(), 'p', 1, 1)",
    "UPDATE tally.usage_events SET quantity = 0",
    "DELETE FROM tally.invoices",
    "UPDATE tally.plan_meters SET included = 0",
    "DELETE FROM tally.subscriptions",
    "TRUNCATE tally.quota_state",
    "SELECT * FROM tally.projection_offsets",
    "SELECT * FROM tally.stripe_pushes",
    "SELECT * FROM tally.usage_event_keys",
])
def test_finance_role_cannot_change_anything_or_read_internals(
    finance_db: str, statement: str
) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        _as_finance(finance_db, statement)


def test_every_cookbook_query_is_in_the_finance_doc_verbatim() -> None:
    doc = DOC.read_text()
    for recipe in recipes().values():
        assert recipe.sql in doc, f"docs/finance.md is missing or changed {recipe.name}"
    assert len(recipes()) >= 6
