"""The invoice job against real Postgres and the Stripe double, on history rows as the
projector writes them (`tally.subscription_events`, `tally.ingestion_watermarks`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from stripe_testkit import StripeDouble

from billing_jobs.invoice_run import run_invoices
from billing_jobs.stripe_catalog import sync_catalog
from runtime.settings import Settings
from tally.cli import main
from tests.billing_jobs.conftest import CATALOG, FAST, catalog_with, sql

JAN, FEB, MAR, APR = (datetime(2026, m, 1, tzinfo=UTC) for m in (1, 2, 3, 4))
HOUR = timedelta(hours=1)
MONTH = {"start": JAN, "end": FEB}


@pytest.fixture
def invoiced(settings: Settings, double: StripeDouble) -> Callable[[datetime], Any]:
    sync_catalog(settings, CATALOG, FAST)
    return lambda now: run_invoices(settings, now, FAST, catalog=CATALOG)


def totals(db: str) -> dict[str, int]:
    return dict(sql(db, "SELECT invoice_id, total_cents FROM tally.invoices"))


def test_a_plan_change_reaching_tally_after_the_invoice_it_changes_stops_that_tenant(
    history: Callable[..., None], invoiced: Callable[[datetime], Any], db: str,
) -> None:
    history("late", "created", "starter", JAN, **MONTH)
    history("steady", "created", "starter", JAN, **MONTH)
    invoiced(FEB + HOUR)
    # Jan 11's upgrade reaches Tally on Feb 5, after the Feb 1 invoice it changes; a
    # renewal restating the plan reaches it late too, and changes nothing.
    history("late", "plan_changed", "pro", datetime(2026, 1, 11, tzinfo=UTC),
            received=datetime(2026, 2, 5, tzinfo=UTC), **MONTH)
    history("steady", "renewed", "starter", FEB, received=datetime(2026, 2, 2, tzinfo=UTC),
            start=FEB, end=MAR)
    before = totals(db)

    result = invoiced(MAR + HOUR)

    assert list(result.skipped) == ["late"]
    assert "reached Tally after invoice(s) late/20260101T000000Z/20260201T000000Z/cycle/usd" \
        in result.skipped["late"]
    assert [i.invoice_id for i in result.issued] == [
        "steady/20260101T000000Z/20260301T000000Z/cycle/usd"]
    assert {i: t for i, t in totals(db).items() if i in before} == before
    [(error,)] = sql(db, "SELECT last_error FROM tally.stripe_pushes"
                         " WHERE idempotency_key = 'tally-billing-late'")
    assert error.startswith("LateHistoryError: subscription event(s)")


def test_invoices_wait_for_the_ledger_to_hold_the_usage_they_count(
    history: Callable[..., None], invoiced: Callable[[datetime], Any], db: str,
) -> None:
    history("acme", "created", "starter", JAN, **MONTH)
    sql(db, "INSERT INTO tally.ingestion_watermarks VALUES"
            " ('read_models', 'tally.usage.accepted', 0, %s),"
            " ('read_models', 'tally.usage.accepted', 1, %s)",
        datetime(2026, 1, 20, tzinfo=UTC), MAR)

    waiting = invoiced(FEB + HOUR)
    sql(db, "UPDATE tally.ingestion_watermarks SET ingested_through = %s", MAR)
    caught_up = invoiced(FEB + HOUR)

    assert waiting.known_through == datetime(2026, 1, 20, tzinfo=UTC)
    assert "the ledger is complete only up to then" in waiting.summary()
    assert [i.kind for i in waiting.issued] == ["opening"]
    assert [(i.kind, i.total_cents) for i in caught_up.issued] == [("cycle", 2900)]


def test_a_coupon_created_and_applied_with_the_cli_discounts_the_next_cycles(
    history: Callable[..., None], invoiced: Callable[[datetime], Any], db: str,
    double: StripeDouble, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DATABASE_URL", db)
    monkeypatch.setenv("TALLY_HOME", str(tmp_path))
    history("acme", "created", "starter", JAN, **MONTH)
    assert main(["coupons", "create", "HALF", "--percent-off", "50", "--duration",
                 "repeating", "--months", "2"]) == 0
    assert main(["coupons", "apply", "HALF", "--tenant", "acme", "--at",
                 "2026-01-15T00:00:00Z"]) == 0
    assert main(["coupons", "create", "HALF", "--percent-off", "10", "--duration",
                 "once"]) == 2  # the code exists

    for now in (JAN + HOUR, FEB + HOUR, MAR + HOUR, APR + HOUR):
        invoiced(now)
    capsys.readouterr()
    assert main(["invoices", "list", "--tenant", "acme", "--json"]) == 0
    listed = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert [(i["issued_at"], i["total_cents"]) for i in listed] == [
        ("2026-01-01T00:00:00Z", 2900), ("2026-02-01T00:00:00Z", 1450),
        ("2026-03-01T00:00:00Z", 1450), ("2026-04-01T00:00:00Z", 2900)]
    assert listed[1]["lines"][-1] == {"kind": "discount", "meter": None, "quantity": "1",
                                      "description": "Coupon HALF: 50% off",
                                      "amount_cents": -1450}
    assert sorted(i["total"] for i in double.inspect().invoices) == [1450, 1450, 2900, 2900]


def test_a_tenant_on_a_plan_missing_from_the_catalog_is_invoiced_once_the_plan_exists(
    history: Callable[..., None], settings: Settings, double: StripeDouble, db: str,
) -> None:
    history("acme", "created", "platinum", JAN, **MONTH)
    history("globex", "created", "starter", JAN, **MONTH)
    platinum = {"name": "Platinum", "monthly_fee_cents": "49900"}
    with_platinum = catalog_with(platinum=platinum)
    sync_catalog(settings, with_platinum, FAST)

    skipped = run_invoices(settings, JAN + HOUR, FAST, catalog=CATALOG)
    journaled = sql(db, "SELECT last_error FROM tally.stripe_pushes"
                        " WHERE idempotency_key = 'tally-billing-acme'")
    fixed = run_invoices(settings, JAN + HOUR, FAST, catalog=with_platinum)

    assert list(skipped.skipped) == ["acme"]
    assert [i.tenant_id for i in skipped.issued] == ["globex"]
    assert "plan 'platinum' is not in the catalog" in journaled[0][0]
    assert [(i.tenant_id, i.total_cents) for i in fixed.issued] == [("acme", 49900)]
    assert sql(db, "SELECT count(*) FROM tally.stripe_pushes"
                   " WHERE idempotency_key = 'tally-billing-acme'") == [(0,)]
