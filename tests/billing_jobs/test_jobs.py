"""The billing jobs against real Postgres and the Stripe double, through the real SDK."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import REGISTRY
from stripe_testkit import DoubleSnapshot, StripeDouble

from billing_jobs import stripe_api
from billing_jobs.invoice_run import run_invoices
from billing_jobs.push_usage import run_push_usage
from billing_jobs.reconcile import run_reconcile
from billing_jobs.stripe_catalog import price_specs, sync_catalog
from runtime.settings import Settings
from tests.billing_jobs.conftest import (
    CATALOG,
    END,
    FAST,
    NOW,
    START,
    catalog_with,
    sql,
)

# Starter, 2026-10: 2,000 API calls over at 0.1c, 500 executions over at 1c, 501 started
# packages of 1,000 tokens at 2c, and the $29 base fee.
STARTER_USAGE = {"api_calls": 12_000, "executions": 1_500, "tokens": 1_500_500}
STARTER_TOTAL = 2900 + 200 + 500 + 1002


def received(snapshot: DoubleSnapshot) -> dict[tuple[str, str], Decimal]:
    """What Stripe holds per (tenant, meter), summed over every meter event."""
    tenants = {c["id"]: c["metadata"]["tally_tenant_id"] for c in snapshot.customers}
    out: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for e in snapshot.meter_events:
        key = (tenants[e["payload"]["stripe_customer_id"]], e["event_name"].removeprefix("tally_"))
        out[key] += Decimal(e["payload"]["value"])
    return dict(out)


def items_per_line(snapshot: DoubleSnapshot) -> Counter[tuple[str, str]]:
    return Counter((i["metadata"]["tally_invoice_id"], i["metadata"]["tally_line_no"])
                   for i in snapshot.invoice_items)


# --- sync-catalog ----------------------------------------------------------------------------


def test_sync_catalog_creates_each_meter_and_price_once_however_often_it_runs(
    settings: Settings, double: StripeDouble,
) -> None:
    first = sync_catalog(settings, CATALOG, FAST)
    second = sync_catalog(settings, CATALOG, FAST)

    snapshot = double.inspect()
    assert not first.failed and not second.failed
    assert first.prices == second.prices
    assert sorted(m["event_name"] for m in snapshot.meters) == [
        "tally_api_calls", "tally_executions", "tally_storage_mb", "tally_tokens"]
    assert len(snapshot.prices) == len(price_specs(CATALOG))
    by_lookup = {p["lookup_key"]: p for p in snapshot.prices}
    assert by_lookup["tally_starter_month"]["unit_amount_decimal"] == "2900"
    assert by_lookup["tally_starter_year"]["recurring"]["interval"] == "year"
    pro_api = by_lookup["tally_pro_api_calls"]  # 100k included, then two graduated tiers
    assert [t["up_to"] for t in pro_api["tiers"]] == [100_000, 150_000, None]
    assert pro_api["recurring"]["usage_type"] == "metered"


def test_a_changed_catalog_price_becomes_a_new_price_holding_the_lookup_key(
    settings: Settings, double: StripeDouble,
) -> None:
    sync_catalog(settings, CATALOG, FAST)
    starter = CATALOG.plans["starter"].model_dump(mode="json")
    changed = catalog_with(starter={**starter, "monthly_fee_cents": "3900"})
    sync_catalog(settings, changed, FAST)

    prices = [p for p in double.inspect().prices if p["metadata"]["tally_item"] == "month"
              and p["metadata"]["tally_plan_id"] == "starter"]
    assert sorted(p["unit_amount_decimal"] for p in prices) == ["2900", "3900"]
    assert [p["unit_amount_decimal"] for p in prices if p["lookup_key"]] == ["3900"]


# --- invoice ------------------------------------------------------------------------------
# The invoices are the billing model's (docs/billing.md); these tests are about the job
# and its Stripe side. Starter from 2026-10-01: an opening invoice then, and the October
# cycle's invoice on Nov 1 (due an hour later): November's fee plus October's usage.

CYCLE = "acme/20261001T000000Z/20261101T000000Z/cycle/usd"


def test_a_due_invoice_becomes_one_finalized_stripe_invoice_with_the_rated_amounts(
    settings: Settings, double: StripeDouble, history: Callable[..., None],
    ledger: Callable[..., None], db: str,
) -> None:
    history("acme", "created", "starter")
    for meter, quantity in STARTER_USAGE.items():
        ledger("acme", meter, quantity, START + timedelta(days=9))
    sync_catalog(settings, CATALOG, FAST)

    result = run_invoices(settings, NOW, FAST, catalog=CATALOG)
    again = run_invoices(settings, NOW, FAST, catalog=CATALOG)

    assert result.billed == {"acme/20261001T000000Z/20261001T000000Z/opening/usd": 2900,
                             CYCLE: STARTER_TOTAL}, result.summary()
    assert not again.billed and not again.issued
    cycle = next(i for i in double.inspect().invoices
                 if i["metadata"]["tally_invoice_id"] == CYCLE)
    assert cycle["status"] == "open" and cycle["total"] == STARTER_TOTAL
    assert sql(db, "SELECT status, total_cents, stripe_invoice_id FROM tally.invoices"
                   " WHERE invoice_id = %s", CYCLE) == [("open", STARTER_TOTAL, cycle["id"])]
    lines = sql(db, "SELECT kind, meter, amount_cents FROM tally.invoice_lines"
                    " WHERE invoice_id = %s ORDER BY line_no", CYCLE)
    assert lines == [("fee", None, 2900), ("usage", "api_calls", 200),
                     ("usage", "executions", 500), ("usage", "tokens", 1002)]
    assert all(i["metadata"]["stripe_price_id"].startswith("price_")
               for i in double.inspect().invoice_items)


def test_a_cycle_is_not_invoiced_until_its_lateness_window_has_passed(
    settings: Settings, double: StripeDouble, history: Callable[..., None],
) -> None:
    history("acme", "created", "starter")
    sync_catalog(settings, CATALOG, FAST)
    lateness = max(m.lateness for m in CATALOG.meters.values())

    early = run_invoices(settings, END + lateness - timedelta(seconds=1), FAST, catalog=CATALOG)
    on_time = run_invoices(settings, END + lateness, FAST, catalog=CATALOG)

    assert [i.kind for i in early.issued] == ["opening"]
    assert [i.invoice_id for i in on_time.issued] == [CYCLE]


def test_a_zero_total_invoice_is_stored_and_not_sent_to_stripe(
    settings: Settings, double: StripeDouble, history: Callable[..., None], db: str,
) -> None:
    history("hobbyist", "created", "free")
    result = run_invoices(settings, NOW, FAST, catalog=CATALOG)
    assert len(result.issued) == 2 and not result.billed and not double.inspect().invoices
    assert sql(db, "SELECT DISTINCT status, total_cents FROM tally.invoices") == [
        ("no_charge", 0)]


class Crash(BaseException):
    """The process dies here: after Stripe acted, before the journal recorded it."""


def test_invoice_job_crashing_after_a_stripe_call_and_rerun_creates_everything_once(
    settings: Settings, double: StripeDouble, history: Callable[..., None],
    ledger: Callable[..., None], monkeypatch: pytest.MonkeyPatch,
) -> None:
    for tenant in ("acme", "globex"):
        history(tenant, "created", "starter")
        for meter, quantity in STARTER_USAGE.items():
            ledger(tenant, meter, quantity, START + timedelta(days=9))
    sync_catalog(settings, CATALOG, FAST)
    real = stripe_api.create_invoice_item
    calls = 0

    def crash_on_third(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        item = real(*args, **kwargs)
        if calls == 3:
            raise Crash
        return item

    monkeypatch.setattr(stripe_api, "create_invoice_item", crash_on_third)
    with pytest.raises(Crash):  # in acme's cycle invoice, its opening one already sent
        run_invoices(settings, NOW, FAST, catalog=CATALOG)
    monkeypatch.setattr(stripe_api, "create_invoice_item", real)
    result = run_invoices(settings, NOW, FAST, catalog=CATALOG)

    snapshot = double.inspect()
    assert sorted(result.billed.values()) == [2900, STARTER_TOTAL, STARTER_TOTAL]
    assert len(snapshot.invoices) == 4
    assert set(items_per_line(snapshot).values()) == {1}
    assert len(snapshot.invoice_items) == 10
    assert sorted(i["total"] for i in snapshot.invoices) == [
        2900, 2900, STARTER_TOTAL, STARTER_TOTAL]


# --- push-usage ---------------------------------------------------------------------------


def test_late_usage_of_a_pushed_period_goes_to_stripe_as_a_new_delta(
    settings: Settings, double: StripeDouble, put_usage: Callable[..., None],
) -> None:
    put_usage("acme", "api_calls", 100)
    run_push_usage(settings, NOW, FAST, catalog=CATALOG)
    put_usage("acme", "api_calls", 130)  # 30 late events reached October

    result = run_push_usage(settings, NOW, FAST, catalog=CATALOG)

    events = double.inspect().meter_events
    assert [e["payload"]["value"] for e in events] == ["100", "30"]
    assert [e["identifier"] for e in events] == [
        "acme:api_calls:20261001T000000Z:100", "acme:api_calls:20261001T000000Z:130"]
    assert result.events_sent == 1 and dict(result.pushed) == {("acme", "api_calls"): 30}


@pytest.mark.parametrize("high_volume", [False, True], ids=["v1-events", "v2-stream"])
def test_faults_on_a_third_of_calls_still_end_with_everything_pushed_and_invoiced_once(
    settings: Settings, double: StripeDouble, put_usage: Callable[..., None],
    history: Callable[..., None], high_volume: bool,
) -> None:
    expected = {}
    for t in range(4):
        history(f"tenant-{t}", "created", "starter")
        for meter in ("api_calls", "tokens"):
            put_usage(f"tenant-{t}", meter, 20_000 + t)
            expected[(f"tenant-{t}", meter)] = Decimal(20_000 + t)
    # A timeout is a lost response: the call took effect, the client hears nothing.
    double.faults(rate=0.33, kinds=("429", "500", "timeout"), seed=11, timeout=0.5)
    sync_catalog(settings, CATALOG, FAST)
    pushed = run_push_usage(settings, NOW, FAST, high_volume=high_volume, catalog=CATALOG)
    invoiced = run_invoices(settings, NOW, FAST, catalog=CATALOG)
    double.faults()
    again = run_push_usage(settings, NOW, FAST, high_volume=high_volume, catalog=CATALOG)

    snapshot = double.inspect()
    assert not pushed.failed and not invoiced.failed, pushed.summary() + invoiced.summary()
    assert snapshot.faults_injected > 5
    assert received(snapshot) == expected
    assert again.events_sent == 0
    assert len(snapshot.customers) == 4 and len(snapshot.meters) == 4
    assert len(snapshot.prices) == len(price_specs(CATALOG))
    assert len(snapshot.invoices) == 8 and set(items_per_line(snapshot).values()) == {1}
    assert all(i["status"] == "open" for i in snapshot.invoices)
    assert not snapshot.rejected_meter_events


# --- reconcile -----------------------------------------------------------------------------


def test_reconcile_agrees_after_a_clean_run_and_finds_a_deliberate_mismatch(
    settings: Settings, double: StripeDouble, put_usage: Callable[..., None],
    history: Callable[..., None], ledger: Callable[..., None], db: str,
) -> None:
    history("acme", "created", "starter")
    for meter, quantity in STARTER_USAGE.items():
        put_usage("acme", meter, quantity)
        ledger("acme", meter, quantity, START + timedelta(days=9))
    put_usage("globex", "api_calls", 50)
    sync_catalog(settings, CATALOG, FAST)
    run_push_usage(settings, NOW, FAST, catalog=CATALOG)
    run_invoices(settings, NOW, FAST, catalog=CATALOG)

    clean = run_reconcile(settings, NOW, FAST)
    sql(db, "UPDATE tally.usage_by_period SET quantity = 51 WHERE tenant_id = 'globex'")
    sql(db, "UPDATE tally.invoices SET total_cents = total_cents + 1 WHERE invoice_id = %s",
        CYCLE)
    dirty = run_reconcile(settings, NOW, FAST)

    assert clean.mismatches == [] and clean.checked == 6, clean.summary()
    assert dirty.mismatches == [
        "usage globex api_calls 2026-10-01: Tally 51, Stripe 50",
        f"invoice {CYCLE}: Tally total {STARTER_TOTAL + 1}, Stripe {STARTER_TOTAL}",
    ]


# --- bad input ------------------------------------------------------------------------------


def test_tenant_without_customer_plan_without_price_and_unknown_meter_fail_alone_and_journaled(
    settings: Settings, double: StripeDouble, put_usage: Callable[..., None],
    history: Callable[..., None], ledger: Callable[..., None], db: str,
) -> None:
    sync_catalog(settings, CATALOG, FAST)
    put_usage("acme", "api_calls", 12_000)  # a customer (from its subscription), a price
    history("acme", "created", "starter")
    sql(db, "INSERT INTO tally.subscriptions VALUES ('acme', 'starter', 'active', %s, %s,"
            " %s, NULL, now())", START, END,
        stripe_api.create_customer(stripe_api.client(settings), "acme", "k-acme").id)
    put_usage("nocust", "api_calls", 12_000)  # no customer, and creation is off
    history("nocust", "created", "starter")
    history("teamco", "created", "team")  # a plan Stripe has no price for
    put_usage("gpuco", "gpu_seconds", 10)  # a meter neither the catalog nor Stripe knows
    history("gpuco", "created", "starter")
    ledger("gpuco", "gpu_seconds", 10, START + timedelta(days=3))
    team = {"name": "Team", "monthly_fee_cents": "19900",
            "meters": {"api_calls": {"included": "10000"}}}
    catalog = catalog_with(team=team)

    def errors(job: str, reason: str) -> float:
        labels = {"job": job, "reason": reason}
        return REGISTRY.get_sample_value("tally_billing_push_errors_total", labels) or 0.0

    before = errors("invoice", "MissingStripeObject")
    pushed = run_push_usage(settings, NOW, FAST, create_missing=False, catalog=CATALOG)
    invoiced = run_invoices(settings, NOW, FAST, catalog=catalog, create_missing=False)

    assert received(double.inspect())[("acme", "api_calls")] == 12_000
    assert sorted(invoiced.billed) == [f"acme/20261001T000000Z/{d}" for d in (
        "20261001T000000Z/opening/usd", "20261101T000000Z/cycle/usd")]
    failed = dict(sql(db, "SELECT idempotency_key, last_error FROM tally.stripe_pushes"
                          " WHERE status = 'failed'"))
    assert "has no Stripe customer and auto-creation is off" in failed["tally-customer-nocust"]
    assert "'gpu_seconds' is not in the plan catalog" in failed["tally-meter-gpu_seconds"]
    assert "plan 'team' has no Stripe price for team/month" in failed[
        "tally-invoice-teamco/20261001T000000Z/20261001T000000Z/opening/usd"]
    assert "RatingError: meter 'gpu_seconds' is not in the catalog" in failed[
        "tally-billing-gpuco"]
    assert len(pushed.failed) == 2  # gpuco, nocust
    assert list(invoiced.skipped) == ["gpuco"]  # nothing of its is invoiced
    assert len(invoiced.failed) == 4  # nocust's and teamco's two invoices each
    assert errors("invoice", "MissingStripeObject") == before + 4
