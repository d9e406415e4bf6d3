"""Past usage is rated as the invoice rated it: a cycle with an upgrade inside it (Starter,
then Pro: two plan slices with prorated allowances) shows in `usage/history` with the
amounts of the usage lines of the invoice the invoice job issued for it, to the cent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import psycopg
from psycopg.types.json import Jsonb

from billing_jobs.invoice_run import run_invoices
from billing_jobs.journal import RetryPolicy
from domain.periods import add_months
from projections.ledger import create_month_partitions
from schemas.plans import default_catalog_path, load_catalog
from tests.api.conftest import ApiServer


def test_history_of_a_cycle_with_an_upgrade_equals_its_issued_invoice(
        api: ApiServer, stripe_double_url: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=50)
    end = add_months(start, 1)
    upgrade = start + timedelta(days=10)
    url = api.settings.database_url
    assert url is not None
    with psycopg.connect(url) as conn:
        for n, (kind, plan, at) in enumerate([("created", "starter", start),
                                              ("plan_changed", "pro", upgrade)]):
            conn.execute(
                "INSERT INTO tally.subscription_events (tenant_id, event_id, type, source,"
                " event_time, data, record_timestamp, topic, partition, \"offset\", item)"
                " VALUES ('acme', %s, %s, 'test', %s, %s, %s, 'subs', 0, %s, 0)",
                (f"s{n}", f"tally.subscription.{kind}.v1", at,
                 Jsonb({"plan_id": plan, "period_start": start.isoformat(),
                        "period_end": end.isoformat()}), at, n))
        months = {datetime(m.year, m.month, 1, tzinfo=UTC)
                  for m in (start, upgrade, end, now)}
        create_month_partitions(conn, months)
        usage = [("u1", "api_calls", 6_000, start + timedelta(days=5)),  # Starter's slice
                 ("u2", "api_calls", 90_000, start + timedelta(days=20)),  # Pro's
                 ("u3", "executions", 2_500, start + timedelta(days=3)),
                 ("u4", "tokens", 3_000_000, start + timedelta(days=25)),
                 ("u5", "api_calls", 500, now - timedelta(days=1))]  # the current cycle
        for event_id, meter, quantity, at in usage:
            conn.execute(
                "INSERT INTO tally.usage_events (event_id, tenant_id, meter, quantity,"
                " event_time, ingested_at, source, period_start, period_end, plan_id)"
                " VALUES (%s, 'acme', %s, %s, %s, %s, 't', %s, %s, 'starter')",
                (event_id, meter, Decimal(quantity), at, at + timedelta(minutes=1), start,
                 end))
        # The worker's periods (what history rated before: one plan per period, no slices).
        for meter, quantity in (("api_calls", 96_000), ("executions", 2_500),
                                ("tokens", 3_000_000)):
            conn.execute(
                "INSERT INTO tally.usage_by_period (tenant_id, meter, period_start,"
                " period_end, plan_id, quantity, event_count) VALUES ('acme', %s, %s, %s,"
                " 'pro', %s, 1)", (meter, start, end, quantity))
    settings = api.settings.model_copy(update={"stripe_api_key": "sk_test_history",
                                               "stripe_api_base": stripe_double_url})
    issued = run_invoices(settings, now, RetryPolicy(3, 0.005, 0.02, 10), catalog=load_catalog(
        default_catalog_path()))
    assert [i.kind for i in issued.issued if i.period_start == start] == ["opening", "cycle"]
    with psycopg.connect(url) as conn:
        lines = conn.execute(
            "SELECT l.meter, l.amount_cents FROM tally.invoice_lines l JOIN tally.invoices i"
            " USING (invoice_id) WHERE i.tenant_id = 'acme' AND i.kind = 'cycle'"
            " AND i.period_start = %s AND l.kind IN ('usage', 'minimum')", (start,)).fetchall()
    assert lines  # usage lines of both slices

    answer = httpx.get(f"{api.url}/v1/tenants/acme/usage/history?cycles=3",
                       headers=api.headers(), timeout=10)
    assert answer.status_code == 200, answer.text
    cycles = answer.json()["cycles"]
    assert len(cycles) == 1  # one cycle ended; the current one is not history
    past = cycles[0]
    assert datetime.fromisoformat(past["period_start"]) == start
    assert datetime.fromisoformat(past["period_end"]) == end
    assert past["plan_id"] == "pro"  # the plan at the cycle's end
    assert past["charges_cents"] == sum(amount for _, amount in lines)
    per_meter: dict[str, int] = {}
    for meter, amount in lines:
        per_meter[meter] = per_meter.get(meter, 0) + amount
    by_meter = {m["meter"]: m for m in past["meters"]}
    for meter, amount in per_meter.items():
        assert by_meter[meter]["amount_cents"] == amount, meter
    assert by_meter["api_calls"]["used"] == "96000"  # both slices, not the current cycle's
