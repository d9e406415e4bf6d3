"""Invoices from subscriptions (docs/billing.md): the issue's worked examples to the cent,
then each rule the examples do not reach.

Catalog: tally/catalog/plans.toml. All times 00:00 UTC, 2026, unless said otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

import pytest

from domain.invoices import (
    CouponRedemption,
    Invoice,
    UsageRecord,
    invoice_schedule,
    invoices_due,
)
from domain.rating import Coupon, RatingError
from domain.subscriptions import derive_subscriptions
from schemas.events import SubscriptionEvent
from schemas.plans import Catalog, Graduated, PerUnit
from tests.domain.billing_helpers import CATALOG, TENANT, d, event, use

D = Decimal
FAR = d(1, 1, year=2028)


def schedule(events: Sequence[SubscriptionEvent], usage: Sequence[UsageRecord] = (),
             now: datetime = FAR, coupons: Sequence[CouponRedemption] = (),
             catalog: Catalog = CATALOG) -> tuple[Invoice, ...]:
    subscriptions = derive_subscriptions(TENANT, events, catalog)
    return invoice_schedule(TENANT, subscriptions, catalog, usage, coupons, now)


def totals(invoices: Sequence[Invoice]) -> list[tuple[datetime, str, int]]:
    return [(i.issued_at, i.kind, i.total_cents) for i in invoices]


def amounts(invoice: Invoice) -> list[tuple[str, str | None, int]]:
    """The invoice's non-zero lines as (kind, meter, cents)."""
    return [(ln.kind, ln.meter, ln.amount_cents) for ln in invoice.lines if ln.amount_cents]


def on(invoices: Sequence[Invoice], date: datetime) -> Invoice:
    (found,) = [i for i in invoices if i.issued_at == date]
    return found


# --- the figures the examples assume ------------------------------------------------------


def test_the_catalog_has_the_figures_the_worked_examples_assume() -> None:
    starter, pro = CATALOG.plans["starter"], CATALOG.plans["pro"]
    assert (starter.monthly_fee_cents, starter.yearly_fee_cents) == (D(2900), D(29000))
    assert (pro.monthly_fee_cents, pro.yearly_fee_cents) == (D(9900), D(99000))
    assert (starter.meters["api_calls"].included, starter.meters["executions"].included) == (
        D(10000), D(1000))
    assert starter.meters["api_calls"].overage == PerUnit(unit_amount_cents=Decimal("0.1"))
    assert starter.meters["executions"].overage == PerUnit(unit_amount_cents=Decimal(1))
    assert (pro.meters["api_calls"].included, pro.meters["executions"].included) == (
        D(100000), D(10000))
    pro_calls = pro.meters["api_calls"].overage
    assert isinstance(pro_calls, Graduated)
    assert [(t.up_to, t.unit_amount_cents) for t in pro_calls.tiers] == [
        (50000, Decimal("0.08")), (None, Decimal("0.05"))]
    assert pro.meters["executions"].overage == PerUnit(unit_amount_cents=Decimal("0.8"))
    assert {m.lateness_seconds for m in CATALOG.meters.values()} == {3600}


# --- the worked examples of the issue -----------------------------------------------------


def test_example_idle_starter_is_invoiced_29_dollars_every_month() -> None:
    invoices = schedule([event("created", d(1, 1), "starter")], now=d(3, 1, 1))
    assert totals(invoices) == [(d(1, 1), "opening", 2900), (d(2, 1), "cycle", 2900),
                                (d(3, 1), "cycle", 2900)]


def test_example_starter_overage_in_january_is_39_dollars_on_feb_1() -> None:
    invoices = schedule([event("created", d(1, 1), "starter")],
                        [use(d(1, 10), "api_calls", 15000), use(d(1, 12), "executions", 1500)])
    feb = on(invoices, d(2, 1))
    assert amounts(feb) == [("fee", None, 2900), ("usage", "api_calls", 500),
                            ("usage", "executions", 500)]
    assert feb.total_cents == 3900


def test_example_upgrade_starter_to_pro_on_jan_11_is_167_dollars_on_feb_1() -> None:
    invoices = schedule(
        [event("created", d(1, 1), "starter"),
         event("plan_changed", d(1, 11), "pro", d(1, 1), d(2, 1))],
        [use(d(1, 5), "api_calls", 6000), use(d(1, 20), "api_calls", 90000)])
    feb = on(invoices, d(2, 1))
    assert amounts(feb) == [
        ("fee", None, 9900),
        ("usage", "api_calls", 278),  # Starter slice: allowance 3,225, 2,775 over
        ("usage", "api_calls", 1781),  # Pro slice: allowance 67,741, 22,259 over
        ("proration_credit", None, -1965),
        ("proration_charge", None, 6706),
    ]
    starter_calls, pro_calls = [ln.description for ln in feb.lines if ln.meter == "api_calls"]
    assert "6000 used, 3225 included, 2775 over" in starter_calls
    assert "90000 used, 67741 included, 22259 over" in pro_calls
    assert feb.total_cents == 16700


def test_example_pro_trial_to_jan_15_is_invoiced_from_the_trials_end() -> None:
    invoices = schedule(
        [event("created", d(1, 1), "pro", trial_end=d(1, 15))],
        [use(d(1, 5), "executions", 5000), use(d(1, 20), "executions", 12000)],
        now=d(2, 15, 1))
    assert totals(invoices) == [(d(1, 15), "opening", 9900), (d(2, 15), "cycle", 11500)]
    assert amounts(invoices[1]) == [("fee", None, 9900), ("usage", "executions", 1600)]


def test_example_pro_canceled_at_once_on_jan_21_ends_with_a_credit_of_6_74() -> None:
    invoices = schedule(
        [event("created", d(1, 1), "pro"), event("canceled", d(1, 21), "pro", d(1, 1), d(2, 1))],
        [use(d(1, 10), "executions", 10000)])
    assert totals(invoices) == [(d(1, 1), "opening", 9900), (d(1, 21), "final", -674)]
    final = invoices[1]
    assert amounts(final) == [("usage", "executions", 2839), ("unused_fee_credit", None, -3513)]
    assert "6451 included" in final.lines[1].description


def test_example_starter_yearly_pays_290_once_and_usage_monthly_on_10000_calls() -> None:
    invoices = schedule([event("created", d(1, 1), "starter", months=12)],
                        [use(d(2, 10), "api_calls", 12000), use(d(3, 10), "api_calls", 9000)],
                        now=d(1, 1, 1, year=2027))
    assert totals(invoices)[:4] == [(d(1, 1), "opening", 29000), (d(2, 1), "cycle", 0),
                                    (d(3, 1), "cycle", 200), (d(4, 1), "cycle", 0)]
    assert "10000 included" in on(invoices, d(3, 1)).lines[0].description
    assert len(invoices) == 13
    assert amounts(invoices[-1]) == [("fee", None, 29000)]  # Jan 1, 2027: the second year


def test_example_late_january_calls_are_a_2_dollar_adjustment_on_mar_1() -> None:
    invoices = schedule([event("created", d(1, 1), "starter")],
                        [use(d(1, 10), "api_calls", 15000),
                         use(d(1, 20), "api_calls", 2000, ingested_at=d(2, 3))], now=d(3, 1, 1))
    assert amounts(on(invoices, d(2, 1))) == [("fee", None, 2900), ("usage", "api_calls", 500)]
    march = on(invoices, d(3, 1))
    assert amounts(march) == [("fee", None, 2900), ("usage_adjustment", "api_calls", 200)]
    assert march.lines[-1].description == (
        "Usage adjustment for cycle 2026-01-01 to 2026-02-01: api_calls, 2000 late")


# --- the invoice job: due times, idempotence ----------------------------------------------


def test_a_cycle_invoice_is_due_after_the_lateness_window_and_counts_usage_until_then() -> None:
    events = [event("created", d(1, 1), "starter")]
    usage = [use(d(1, 31, 23), "api_calls", 11000, ingested_at=d(2, 1, 0)),
             use(d(1, 31, 23), "api_calls", 1000, ingested_at=d(2, 1, 1))]
    assert [i.kind for i in schedule(events, usage, now=d(2, 1, 0))] == ["opening"]
    feb = on(schedule(events, usage, now=d(2, 1, 1)), d(2, 1))
    assert feb.due_at == d(2, 1, 1)
    assert amounts(feb) == [("fee", None, 2900), ("usage", "api_calls", 200)]


def test_running_the_job_again_issues_nothing_new() -> None:
    subs = derive_subscriptions(TENANT, [event("created", d(1, 1), "starter")], CATALOG)
    usage = [use(d(1, 10), "api_calls", 15000)]
    first = invoices_due(TENANT, subs, CATALOG, usage, [], set(), d(2, 1, 1))
    assert [i.invoice_id for i in first] == ["acme/20260101T000000Z/20260101T000000Z/opening/usd",
                                             "acme/20260101T000000Z/20260201T000000Z/cycle/usd"]
    issued = {i.invoice_id for i in first}
    assert invoices_due(TENANT, subs, CATALOG, usage, [], issued, d(2, 1, 1)) == ()
    assert invoices_due(TENANT, subs, CATALOG, usage, [], issued, d(2, 15)) == ()


def test_stripe_billed_subscriptions_get_no_tally_invoice() -> None:
    events = [event("created", d(1, 1), "pro", stripe_subscription_id="sub_1")]
    assert schedule(events, [use(d(1, 10), "executions", 20000)]) == ()


# --- plan changes, cancels, trials ---------------------------------------------------------


def test_each_plan_change_in_a_cycle_credits_the_plan_it_ends() -> None:
    invoices = schedule([event("created", d(1, 1), "starter"),
                         event("plan_changed", d(1, 11), "pro", d(1, 1), d(2, 1)),
                         event("plan_changed", d(1, 21), "enterprise", d(1, 1), d(2, 1))],
                        now=d(2, 1, 1))
    feb = on(invoices, d(2, 1))
    # 21 and 11 of 31 days remain after the changes.
    assert amounts(feb) == [("fee", None, 29900),
                            ("proration_credit", None, -1965), ("proration_charge", None, 6706),
                            ("proration_credit", None, -3513), ("proration_charge", None, 10610)]


def test_a_change_at_a_cycle_boundary_is_not_prorated_and_the_fee_is_the_new_plans() -> None:
    invoices = schedule([event("created", d(1, 1), "starter"),
                         event("plan_changed", d(2, 1), "pro", d(2, 1), d(3, 1))], now=d(3, 1, 1))
    assert amounts(on(invoices, d(2, 1))) == [("fee", None, 9900)]
    assert amounts(on(invoices, d(3, 1))) == [("fee", None, 9900)]


def test_cancel_at_period_end_has_a_last_invoice_with_usage_and_no_fee() -> None:
    invoices = schedule([event("created", d(1, 1), "starter"),
                         event("canceled", d(1, 10), "starter", d(1, 1), d(2, 1),
                               cancel_at_period_end=True)],
                        [use(d(1, 20), "executions", 1200)])
    assert totals(invoices) == [(d(1, 1), "opening", 2900), (d(2, 1), "final", 200)]


def test_a_yearly_plan_change_prorates_the_rest_of_the_year_on_the_next_monthly_invoice() -> None:
    invoices = schedule([event("created", d(1, 1), "starter", months=12),
                         event("plan_changed", d(7, 2), "pro", d(7, 2), d(7, 2, year=2027))],
                        now=d(8, 1, 1))
    # 183 of 365 days remain: 29000 x 183/365 = 14539.73, 99000 x 183/365 = 49635.62.
    assert amounts(on(invoices, d(8, 1))) == [("proration_credit", None, -14540),
                                              ("proration_charge", None, 49636)]


def test_a_yearly_subscription_canceled_at_once_is_credited_the_rest_of_its_year() -> None:
    invoices = schedule([event("created", d(1, 1), "starter", months=12),
                         event("canceled", d(3, 1), "starter", d(1, 1), d(1, 1, year=2027))])
    # 306 of 365 days remain: 29000 x 306 / 365 = 24312.33
    assert totals(invoices) == [(d(1, 1), "opening", 29000), (d(2, 1), "cycle", 0),
                                (d(3, 1), "final", -24312)]


def test_an_interval_change_ends_with_a_final_invoice_and_opens_a_new_subscription() -> None:
    invoices = schedule([event("created", d(1, 1), "starter"),
                         event("plan_changed", d(1, 11), "starter", d(1, 11),
                               d(1, 11, year=2027))], now=d(1, 11, 1))
    assert [(i.subscription_id, i.kind, i.total_cents) for i in invoices] == [
        ("acme/20260101T000000Z", "opening", 2900),
        ("acme/20260101T000000Z", "final", -1965),  # 21 of 31 days of $29 unused
        ("acme/20260111T000000Z", "opening", 29000),
    ]


def test_a_trial_canceled_before_its_end_is_never_invoiced() -> None:
    assert schedule([event("created", d(1, 1), "pro", trial_end=d(1, 15)),
                     event("canceled", d(1, 10), "pro", d(1, 1), d(2, 1))],
                    [use(d(1, 5), "executions", 50000)]) == ()


def test_cycles_anchored_on_the_31st_are_invoiced_on_clamped_days() -> None:
    invoices = schedule([event("created", d(1, 31), "starter")], now=d(4, 30, 1))
    assert [i.issued_at for i in invoices] == [d(1, 31), d(2, 28), d(3, 31), d(4, 30)]


def test_late_usage_after_the_end_gets_an_adjustment_invoice_of_its_own() -> None:
    invoices = schedule([event("created", d(1, 1), "starter"),
                         event("canceled", d(1, 21), "starter", d(1, 1), d(2, 1))],
                        [use(d(1, 20), "api_calls", 9000),
                         use(d(1, 20), "api_calls", 2000, ingested_at=d(2, 20))], now=d(4, 1))
    # Allowance 6,451 for 20 days: 9,000 -> 2,549 over = 254.9 -> 255, less 11 of 31 days of
    # $29 unused (1029.03 -> 1029); the late 2,000 arrive after the final invoice: 11,000 ->
    # 4,549 over = 455, 200 more, on the first cycle date after they arrived (Feb 20).
    assert totals(invoices) == [(d(1, 1), "opening", 2900), (d(1, 21), "final", -774),
                                (d(3, 1), "adjustment", 200)]
    assert invoices[2].lines[0].quantity == 2000


def test_late_usage_within_the_allowance_changes_nothing() -> None:
    invoices = schedule([event("created", d(1, 1), "starter")],
                        [use(d(1, 20), "api_calls", 2000, ingested_at=d(2, 20))], now=d(3, 1, 1))
    assert amounts(on(invoices, d(3, 1))) == [("fee", None, 2900)]


# --- rounding ------------------------------------------------------------------------------


def test_each_line_is_rounded_half_to_even() -> None:
    # 10,005 calls: 5 over x 0.1c = 0.5c -> 0; 10,015: 1.5c -> 2; 10,025: 2.5c -> 2.
    for used, cents in [(10005, 0), (10015, 2), (10025, 2), (10035, 4)]:
        invoices = schedule([event("created", d(1, 1), "starter")],
                            [use(d(1, 10), "api_calls", used)], now=d(2, 1, 1))
        assert [ln.amount_cents for ln in on(invoices, d(2, 1)).lines
                if ln.meter == "api_calls"] == [cents]


# --- coupons and minimums ------------------------------------------------------------------


def coupon(**fields: object) -> Coupon:
    return Coupon.model_validate({"code": "C", **fields})


def test_a_repeating_coupon_discounts_the_invoices_of_its_first_n_dates() -> None:
    redeemed = [CouponRedemption(coupon(percent_off="25", duration="repeating",
                                        duration_in_months=2), d(1, 15))]
    invoices = schedule([event("created", d(1, 1), "starter")], now=d(4, 1, 1),
                        coupons=redeemed)
    assert totals(invoices) == [(d(1, 1), "opening", 2900), (d(2, 1), "cycle", 2175),
                                (d(3, 1), "cycle", 2175), (d(4, 1), "cycle", 2900)]
    assert invoices[1].lines[-1].description == "Coupon C: 25% off"


def test_an_amount_coupon_is_capped_at_the_subtotal_and_skips_credits() -> None:
    redeemed = [CouponRedemption(coupon(amount_off_cents=5000, duration="forever"), d(1, 1))]
    invoices = schedule([event("created", d(1, 1), "pro"),
                         event("canceled", d(1, 21), "pro", d(1, 1), d(2, 1))],
                        coupons=redeemed)
    assert totals(invoices) == [(d(1, 1), "opening", 4900), (d(1, 21), "final", -3513)]


def test_a_coupon_redeemed_outside_its_window_is_an_error() -> None:
    late = coupon(percent_off="10", duration="once", valid_until=d(1, 10))
    with pytest.raises(RatingError, match="validity window"):
        schedule([event("created", d(1, 1), "starter")],
                 coupons=[CouponRedemption(late, d(1, 15))])


def with_plans(**plans: dict[str, object]) -> Catalog:
    document = CATALOG.model_dump()
    for plan_id, changes in plans.items():
        base = document["plans"][str(changes.pop("like"))]
        document["plans"][plan_id] = {**base, **changes}
    return Catalog.model_validate(document)


def test_a_minimum_tops_usage_up_per_cycle_prorated_by_slice() -> None:
    catalog = with_plans(metered={"like": "starter", "minimum_cents": 1000})
    invoices = schedule([event("created", d(1, 1), "metered"),
                         event("plan_changed", d(1, 11), "starter", d(1, 1), d(2, 1))],
                        [use(d(1, 5), "executions", 500)], catalog=catalog, now=d(2, 1, 1))
    # 10 of 31 days of a 1000c minimum: 322.58 -> 323. The slice's usage: 500 executions on an
    # allowance of 322, 178c. The Starter slice has no minimum. Top-up: 323 - 178 = 145.
    assert amounts(on(invoices, d(2, 1)))[1:3] == [("usage", "executions", 178),
                                                   ("minimum", None, 145)]


def test_plans_in_two_currencies_in_one_cycle_get_one_invoice_each() -> None:
    catalog = with_plans(pro_eur={"like": "pro", "currency": "eur", "monthly_fee_cents": 9000})
    invoices = schedule([event("created", d(1, 1), "pro"),
                         event("plan_changed", d(1, 11), "pro_eur", d(1, 1), d(2, 1))],
                        catalog=catalog, now=d(2, 1, 1))
    feb = [i for i in invoices if i.issued_at == d(2, 1)]
    assert [(i.currency, amounts(i)) for i in feb] == [
        ("eur", [("fee", None, 9000), ("proration_charge", None, 6097)]),
        ("usd", [("proration_credit", None, -6706)]),
    ]
