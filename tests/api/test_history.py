"""Past usage is rated as the invoice rated it (docs/billing.md): `usage/history` shows, for
each ended cycle, the amounts of the usage and minimum lines of the invoice the invoice job
issued for it, to the cent. Cycles of every kind the contract names: an upgrade inside the
cycle (two plan slices with prorated allowances), a trial (its usage is in no cycle), a
plan's minimum charge topping the usage up, a plan billed in euros."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb

from billing_jobs.invoice_run import run_invoices
from billing_jobs.journal import RetryPolicy
from domain.periods import add_months
from projections.ledger import create_month_partitions
from schemas.plans import Catalog, default_catalog_path, load_catalog, parse_catalog
from tests.api.conftest import ApiServer

Usage = tuple[str, str, int, datetime]  # event id, meter, quantity, event time


@pytest.fixture
def api_catalog() -> Catalog:
    """The seed catalog and two plans PLANS.md has not (its figures are all in USD, none
    with a minimum): Starter with a $50 usage minimum, and Pro billed in euros."""
    doc = load_catalog(default_catalog_path()).model_dump(mode="json")
    doc["plans"]["starter_min"] = {**doc["plans"]["starter"], "name": "Starter (minimum)",
                                   "minimum_cents": 5000}
    doc["plans"]["pro_eur"] = {**doc["plans"]["pro"], "name": "Pro (EUR)", "currency": "eur"}
    return parse_catalog(doc)


def record_history(api: ApiServer, tenant: str,
                   events: Sequence[tuple[str, dict[str, Any], datetime]],
                   usage: Sequence[Usage],
                   worker_periods: Sequence[tuple[str, int, datetime, datetime, str]] = ()
                   ) -> None:
    """What the projector would have written for the tenant: its subscription events
    (type suffix, data, time), its ledger and, where given, the worker's periods (meter,
    quantity, start, end, plan)."""
    url = api.settings.database_url
    assert url is not None
    with psycopg.connect(url) as conn:
        for n, (kind, data, at) in enumerate(events):
            conn.execute(
                "INSERT INTO tally.subscription_events (tenant_id, event_id, type, source,"
                " event_time, data, record_timestamp, topic, partition, \"offset\", item)"
                " VALUES (%s, %s, %s, 'test', %s, %s, %s, 'subs', 0, %s, 0)",
                (tenant, f"{tenant}-s{n}", f"tally.subscription.{kind}.v1", at, Jsonb(data),
                 at, n))
        create_month_partitions(conn, {datetime(at.year, at.month, 1, tzinfo=UTC)
                                       for _, _, _, at in usage})
        for event_id, meter, quantity, at in usage:
            conn.execute(
                "INSERT INTO tally.usage_events (event_id, tenant_id, meter, quantity,"
                " event_time, ingested_at, source, period_start, period_end, plan_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, 't', %s, %s, 'free')",
                (event_id, tenant, meter, Decimal(quantity), at, at + timedelta(minutes=1),
                 at, at + timedelta(days=1)))
        for meter, quantity, start, end, plan in worker_periods:
            conn.execute(
                "INSERT INTO tally.usage_by_period (tenant_id, meter, period_start,"
                " period_end, plan_id, quantity, event_count) VALUES (%s, %s, %s, %s, %s,"
                " %s, 1)", (tenant, meter, start, end, plan, quantity))


def issue_invoices(api: ApiServer, stripe_double_url: str, now: datetime,
                   catalog: Catalog) -> None:
    settings = api.settings.model_copy(update={"stripe_api_key": "sk_test_history",
                                               "stripe_api_base": stripe_double_url})
    run_invoices(settings, now, RetryPolicy(3, 0.005, 0.02, 10), catalog=catalog)


def invoiced(api: ApiServer, tenant: str) -> dict[tuple[datetime, str], list[tuple[
        str | None, str, int]]]:
    """The tenant's issued cycle and final invoices by cycle start and currency (one invoice
    per currency, docs/billing.md rule 10): their usage and minimum lines (meter, kind,
    amount)."""
    url = api.settings.database_url
    assert url is not None
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT i.period_start, i.currency, l.meter, l.kind, l.amount_cents"
            " FROM tally.invoices i LEFT JOIN tally.invoice_lines l ON l.invoice_id ="
            " i.invoice_id AND l.kind IN ('usage', 'minimum') WHERE i.tenant_id = %s"
            " AND i.kind IN ('cycle', 'final') ORDER BY l.line_no", (tenant,)).fetchall()
    found: dict[tuple[datetime, str], list[tuple[str | None, str, int]]] = {}
    for start, currency, meter, kind, amount in rows:
        lines = found.setdefault((start, currency), [])
        if kind is not None:
            lines.append((meter, kind, amount))
    return found


def history(api: ApiServer, tenant: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{api.url}/v1/tenants/{tenant}/usage/history?cycles=6",
                       headers=api.headers(), timeout=10)
    assert answer.status_code == 200, answer.text
    cycles: list[dict[str, Any]] = answer.json()["cycles"]
    return cycles


def assert_history_is_the_invoices(api: ApiServer, tenant: str) -> list[dict[str, Any]]:
    """Every entry of the tenant's history is one issued invoice's cycle and currency,
    each meter's amount the sum of its usage lines, the charges those and the minimum
    top-up; and every issued cycle invoice is in the history, once."""
    cycles = history(api, tenant)
    invoices = invoiced(api, tenant)
    shown_invoices = [(datetime.fromisoformat(c["period_start"]), c["currency"])
                      for c in cycles]
    assert sorted(shown_invoices) == sorted(invoices)
    for cycle, key in zip(cycles, shown_invoices, strict=True):
        lines = invoices[key]
        assert cycle["charges_cents"] == sum(amount for _, _, amount in lines)
        per_meter: dict[str, int] = defaultdict(int)
        for meter, kind, amount in lines:
            if kind == "usage":
                assert meter is not None
                per_meter[meter] += amount
        shown = {m["meter"]: m["amount_cents"] for m in cycle["meters"]
                 if m["amount_cents"] is not None}
        assert shown == per_meter, cycle["period_start"]
    return cycles


def test_history_of_a_cycle_with_an_upgrade_equals_its_issued_invoice(
        api: ApiServer, stripe_double_url: str, api_catalog: Catalog) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=50)
    end = add_months(start, 1)
    upgrade = start + timedelta(days=10)
    period = {"period_start": start.isoformat(), "period_end": end.isoformat()}
    record_history(
        api, "acme",
        [("created", {"plan_id": "starter", **period}, start),
         ("plan_changed", {"plan_id": "pro", **period}, upgrade)],
        [("u1", "api_calls", 6_000, start + timedelta(days=5)),  # Starter's slice
         ("u2", "api_calls", 90_000, start + timedelta(days=20)),  # Pro's
         ("u3", "executions", 2_500, start + timedelta(days=3)),
         ("u4", "tokens", 3_000_000, start + timedelta(days=25)),
         ("u5", "api_calls", 500, now - timedelta(days=1))],  # the current cycle
        # The worker's periods (what history rated before: one plan per period, no slices).
        [(meter, quantity, start, end, "pro") for meter, quantity in (
            ("api_calls", 96_000), ("executions", 2_500), ("tokens", 3_000_000))])
    issue_invoices(api, stripe_double_url, now, api_catalog)
    assert invoiced(api, "acme")[(start, "usd")]  # usage lines of both slices

    cycles = assert_history_is_the_invoices(api, "acme")
    assert len(cycles) == 1  # one cycle ended; the current one is not history
    past = cycles[0]
    assert datetime.fromisoformat(past["period_end"]) == end
    assert past["plan_id"] == "pro"  # the plan at the cycle's end
    by_meter = {m["meter"]: m for m in past["meters"]}
    assert by_meter["api_calls"]["used"] == "96000"  # both slices, not the current cycle's


def test_history_of_a_trial_bills_no_usage_of_the_trial(
        api: ApiServer, stripe_double_url: str, api_catalog: Catalog) -> None:
    # docs/billing.md worked example 4, shifted to end before now: Pro with a 14-day trial,
    # 5,000 executions in the trial, 12,000 in the first paid cycle: 2,000 over x 0.8.
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=60)
    trial_end = start + timedelta(days=14)
    period = {"period_start": start.isoformat(), "period_end": add_months(start, 1).isoformat(),
              "trial_end": trial_end.isoformat()}
    record_history(
        api, "acme", [("created", {"plan_id": "pro", **period}, start)],
        [("t1", "executions", 5_000, start + timedelta(days=3)),
         ("t2", "api_calls", 150_000, start + timedelta(days=4)),
         ("p1", "executions", 12_000, trial_end + timedelta(days=5))])
    # A tenant still in its trial, with usage far over Pro's allowance and a period the
    # worker closed: nothing of it is billed, so history has no cycle to show.
    trial_start = now - timedelta(days=10)
    month = datetime(now.year, now.month, 1, tzinfo=UTC)
    record_history(
        api, "globex", [("created", {
            "plan_id": "pro", "period_start": trial_start.isoformat(),
            "period_end": add_months(trial_start, 1).isoformat(),
            "trial_end": (trial_start + timedelta(days=14)).isoformat()}, trial_start)],
        [("g1", "api_calls", 5_000_000, trial_start + timedelta(days=1))],
        [("api_calls", 5_000_000, add_months(month, -1), month, "pro")])
    issue_invoices(api, stripe_double_url, now, api_catalog)

    cycles = assert_history_is_the_invoices(api, "acme")
    assert len(cycles) == 1  # the trial is no cycle
    assert datetime.fromisoformat(cycles[0]["period_start"]) == trial_end
    assert cycles[0]["charges_cents"] == 1600
    by_meter = {m["meter"]: m for m in cycles[0]["meters"]}
    assert by_meter["executions"]["used"] == "12000"  # not the trial's 5,000
    assert by_meter["api_calls"]["used"] == "0"
    assert assert_history_is_the_invoices(api, "globex") == []  # nothing billed in a trial


def test_history_of_a_cycle_topped_up_to_the_plans_minimum(
        api: ApiServer, stripe_double_url: str, api_catalog: Catalog) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=40)
    period = {"period_start": start.isoformat(), "period_end": add_months(start, 1).isoformat()}
    record_history(
        api, "acme", [("created", {"plan_id": "starter_min", **period}, start)],
        [("u1", "api_calls", 12_000, start + timedelta(days=2)),  # 2,000 over: 200
         ("u2", "executions", 900, start + timedelta(days=3))])  # within the allowance
    issue_invoices(api, stripe_double_url, now, api_catalog)

    cycles = assert_history_is_the_invoices(api, "acme")
    assert len(cycles) == 1
    assert sorted(invoiced(api, "acme")[(start, "usd")], key=str) == sorted(
        [("api_calls", "usage", 200), ("executions", "usage", 0), ("tokens", "usage", 0),
         (None, "minimum", 4800)],
        key=str)
    assert cycles[0]["charges_cents"] == 5000  # the minimum, not the usage's 200


def test_history_of_a_tenant_billed_in_euros(
        api: ApiServer, stripe_double_url: str, api_catalog: Catalog) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=40)
    period = {"period_start": start.isoformat(), "period_end": add_months(start, 1).isoformat()}
    record_history(
        api, "acme", [("created", {"plan_id": "pro_eur", **period}, start)],
        [("u1", "api_calls", 180_000, start + timedelta(days=2)),  # 80,000 over, two tiers
         ("u2", "executions", 10_001, start + timedelta(days=3))])
    issue_invoices(api, stripe_double_url, now, api_catalog)

    cycles = assert_history_is_the_invoices(api, "acme")
    assert [c["currency"] for c in cycles] == ["eur"]
    assert list(invoiced(api, "acme")) == [(start, "eur")]
    assert cycles[0]["charges_cents"] > 0


def test_history_of_a_cycle_changing_currency_shows_each_currencys_invoice(
        api: ApiServer, stripe_double_url: str, api_catalog: Catalog) -> None:
    # Starter in dollars for ten days, then Pro billed in euros: the cycle has an invoice
    # per currency (docs/billing.md rule 10), and so an entry per currency in history, its
    # usage that of its own plan slice and its amounts its own invoice's.
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=50)
    end = add_months(start, 1)
    change = start + timedelta(days=10)
    period = {"period_start": start.isoformat(), "period_end": end.isoformat()}
    record_history(
        api, "acme",
        [("created", {"plan_id": "starter", **period}, start),
         ("plan_changed", {"plan_id": "pro_eur", **period}, change)],
        [("u1", "api_calls", 9_000, start + timedelta(days=5)),  # Starter's slice, in USD
         ("u2", "executions", 1_400, start + timedelta(days=6)),
         ("u3", "api_calls", 170_000, start + timedelta(days=20)),  # Pro's, in EUR
         ("u4", "executions", 9_500, start + timedelta(days=21))])
    issue_invoices(api, stripe_double_url, now, api_catalog)
    invoices = invoiced(api, "acme")
    assert set(invoices) == {(start, "eur"), (start, "usd")}
    assert all(sum(a for _, _, a in invoices[key]) > 0 for key in invoices)

    cycles = assert_history_is_the_invoices(api, "acme")
    assert [(c["currency"], c["plan_id"]) for c in cycles] == [("eur", "pro_eur"),
                                                               ("usd", "starter")]
    assert {datetime.fromisoformat(c["period_end"]) for c in cycles} == {end}
    used = {c["currency"]: {m["meter"]: m["used"] for m in c["meters"]} for c in cycles}
    assert used["usd"]["api_calls"] == "9000"  # its own slice's, not the cycle's 179,000
    assert used["usd"]["executions"] == "1400"
    assert used["eur"]["api_calls"] == "170000"
    assert used["eur"]["executions"] == "9500"
