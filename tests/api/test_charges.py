"""The current usage's charges are the next invoice's: the API rates the current cycle with
the billing model the invoice job uses, on the same subscription history and ledger."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import psycopg
from psycopg.types.json import Jsonb

from domain.cycles import cycle_containing
from domain.invoices import UsageRecord, invoice_schedule
from domain.periods import add_months
from domain.subscriptions import derive_subscriptions
from projections.ledger import create_month_partitions
from runtime import read_models
from schemas.plans import Catalog, default_catalog_path, load_catalog
from tests.api import test_history
from tests.api.conftest import ApiServer


def test_current_usage_charges_equal_the_next_invoice_for_the_same_cycle(api: ApiServer
                                                                         ) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=10)
    end = add_months(start, 1)
    url = api.settings.database_url
    assert url is not None
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO tally.subscription_events (tenant_id, event_id, type, source,"
            " event_time, data, record_timestamp, topic, partition, \"offset\", item)"
            " VALUES ('acme', 's1', 'tally.subscription.created.v1', 'test', %s, %s, %s,"
            " 'subs', 0, 0, 0)",
            (start, Jsonb({"plan_id": "starter", "period_start": start.isoformat(),
                           "period_end": end.isoformat()}), start))
        months = {datetime(m.year, m.month, 1, tzinfo=UTC) for m in (start, now)}
        create_month_partitions(conn, months)
        usage = [("u1", "api_calls", Decimal(12_345)), ("u2", "tokens", Decimal(1_500_001)),
                 ("u3", "executions", Decimal(1_001))]
        for event_id, meter, quantity in usage:
            conn.execute(
                "INSERT INTO tally.usage_events (event_id, tenant_id, meter, quantity,"
                " event_time, ingested_at, source, period_start, period_end, plan_id)"
                " VALUES (%s, 'acme', %s, %s, %s, %s, 't', %s, %s, 'starter')",
                (event_id, meter, quantity, now - timedelta(days=1),
                 now - timedelta(minutes=5), start, end))
    answer = httpx.get(f"{api.url}/v1/tenants/acme/usage/current", headers=api.headers(),
                       timeout=10)
    assert answer.status_code == 200, answer.text
    current = answer.json()
    assert current["plan_id"] == "starter"
    assert current["period_start"].startswith(start.strftime("%Y-%m-%dT%H:%M:%S"))

    # The next invoice, as the invoice job makes it (its reads, the domain's schedule),
    # once the cycle has ended and its lateness window passed.
    catalog = load_catalog(default_catalog_path())
    with psycopg.connect(url) as conn:
        events = [e.event for e in read_models.fetch(
            conn, read_models.subscription_history("acme"))]
        subscriptions = derive_subscriptions("acme", events, catalog)
        cycle = cycle_containing(subscriptions[0].anchor, now)
        issued_by = cycle.end + timedelta(hours=2)
        records = read_models.fetch(conn, read_models.usage_records(
            "acme", issued_by, UsageRecord))
    invoices = invoice_schedule("acme", subscriptions, catalog, records, [], issued_by)
    cycle_invoice = next(i for i in invoices if i.kind == "cycle" and i.issued_at == cycle.end)
    usage_lines = [line for line in cycle_invoice.lines if line.kind in ("usage", "minimum")]
    assert current["charges_cents"] == sum(line.amount_cents for line in usage_lines)
    by_meter = {m["meter"]: m["amount_cents"] for m in current["meters"]}
    for line in usage_lines:
        assert by_meter[line.meter] == line.amount_cents
    # 2,345 calls over at 0.1c, 1,000,001 tokens over in packages of 1,000 at 2c, one
    # execution over at 1c: to the cent, as on the invoice.
    assert current["charges_cents"] == 234 + 1002 + 1


# The seed catalog with Pro billed in euros, for the API's topics and the invoice job.
api_catalog = test_history.api_catalog


def test_current_usage_of_a_cycle_changing_currency_equals_each_currencys_invoice(
        api: ApiServer, stripe_double_url: str, api_catalog: Catalog) -> None:
    # Starter in dollars for ten days, then Pro billed in euros, the cycle still running:
    # the current usage shows each currency's charges apart, and once the cycle has ended
    # the invoice job issues one invoice per currency (docs/billing.md rule 10) whose usage
    # lines are those charges, to the cent. Before the fix, the dollar and euro amounts
    # were added into one figure "in euros".
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=20)
    end = add_months(start, 1)
    change = start + timedelta(days=10)
    period = {"period_start": start.isoformat(), "period_end": end.isoformat()}
    test_history.record_history(
        api, "acme",
        [("created", {"plan_id": "starter", **period}, start),
         ("plan_changed", {"plan_id": "pro_eur", **period}, change)],
        [("u1", "api_calls", 19_000, start + timedelta(days=5)),  # Starter's slice, in USD
         ("u2", "executions", 1_400, start + timedelta(days=6)),
         ("u3", "api_calls", 170_000, start + timedelta(days=12)),  # Pro's, in EUR
         ("u4", "executions", 9_500, start + timedelta(days=13))])
    answer = httpx.get(f"{api.url}/v1/tenants/acme/usage/current", headers=api.headers(),
                       timeout=10)
    assert answer.status_code == 200, answer.text
    current = answer.json()
    assert (current["plan_id"], current["currency"]) == ("pro_eur", "eur")
    # The quota is the worker's, over the whole period: both slices' usage.
    used = {m["meter"]: m["used"] for m in current["meters"]}
    assert (used["api_calls"], used["executions"]) == ("189000", "10900")

    test_history.issue_invoices(api, stripe_double_url, end + timedelta(days=1), api_catalog)
    invoices = test_history.invoiced(api, "acme")
    assert set(invoices) == {(start, "eur"), (start, "usd")}
    assert_charges_are_the_invoice(current, invoices[(start, "eur")])
    assert [(o["currency"], o["plan_id"]) for o in current["other_currencies"]] == [
        ("usd", "starter")]
    assert_charges_are_the_invoice(current["other_currencies"][0], invoices[(start, "usd")])


def assert_charges_are_the_invoice(entry: dict[str, Any],
                                   lines: list[tuple[str | None, str, int]]) -> None:
    """The entry's charges are the invoice's usage and minimum lines (meter, kind, amount),
    each meter's amount its usage lines', to the cent."""
    assert entry["charges_cents"] == sum(amount for _, _, amount in lines) > 0
    per_meter: dict[str, int] = defaultdict(int)
    for meter, kind, amount in lines:
        if kind == "usage" and meter is not None:
            per_meter[meter] += amount
    assert {m["meter"]: m["amount_cents"] for m in entry["meters"]
            if m["amount_cents"] is not None} == per_meter
