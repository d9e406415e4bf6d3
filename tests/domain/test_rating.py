"""Rating specification: tables with figures worked by hand, then properties.

Periods are November 2026 (30 days, 2026-11-01 to 2026-12-01 UTC) unless a test says otherwise,
so a day is 1/30 of a monthly fee.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal, localcontext

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from domain.rating import (
    AppliedCoupon,
    Coupon,
    Interval,
    InvoiceDraft,
    PlanChange,
    RatingContext,
    RatingError,
    graduated_amount,
    rate_period,
    to_cents,
    volume_amount,
)
from schemas.plans import (
    Graduated,
    Package,
    PerUnit,
    Plan,
    PlanMeter,
    Pricing,
    Tier,
    Volume,
    default_catalog_path,
    load_catalog,
)

D = Decimal
ZERO = D(0)
CATALOG = load_catalog(default_catalog_path())
STARTER = CATALOG.plans["starter"]  # $29/month; executions: 1,000 included, then 1c each
PRO = CATALOG.plans["pro"]  # $99/month
FREE = CATALOG.plans["free"]
ENTERPRISE = CATALOG.plans["enterprise"]
PERIOD_START = datetime(2026, 11, 1, tzinfo=UTC)
PERIOD_END = datetime(2026, 12, 1, tzinfo=UTC)
# The brief's example: first 1,000 units at 1c, the rest at 0.5c.
TWO_TIERS = [Tier(up_to=D(1000), unit_amount_cents=D(1)), Tier(unit_amount_cents=D("0.5"))]


def nov(day: int, seconds: int = 0) -> datetime:
    return datetime(2026, 11, day, tzinfo=UTC) + timedelta(seconds=seconds)


def context(**fields: object) -> RatingContext:
    return RatingContext.model_validate(
        {"period_start": PERIOD_START, "period_end": PERIOD_END, **fields}
    )


def synthetic(pricing: Pricing | None, included: Decimal = ZERO) -> Plan:
    """A free plan with one meter, `units`, priced by `pricing` above `included`."""
    return Plan(name="Synthetic", meters={"units": PlanMeter(included=included, overage=pricing)})


def units_charge(plan: Plan, used: str) -> int:
    draft = rate_period(plan, "month", {"units": D(used)})
    return next(line.amount_cents for line in draft.lines if line.meter == "units")


def coupon_draft(coupon: Coupon, period_index: int, interval: Interval = "month") -> InvoiceDraft:
    applied = AppliedCoupon(coupon=coupon, redeemed_at=PERIOD_START, period_index=period_index)
    return rate_period(STARTER, interval, {}, context(coupon=applied))


def percent_coupon(duration: str, months: int | None = None, percent: str = "20") -> Coupon:
    return Coupon.model_validate({"code": "WELCOME", "percent_off": percent,
                                  "duration": duration, "duration_in_months": months})


# --- seed catalog: base fees and included units --------------------------------------------


@pytest.mark.parametrize(
    ("plan_id", "interval", "usage", "total"),
    [
        ("free", "month", {}, 0),
        ("free", "month", {"api_calls": "5000", "tokens": "9e9"}, 0),  # no overage price
        ("starter", "month", {}, 2900),
        ("starter", "year", {}, 29000),
        ("pro", "month", {}, 9900),
        ("pro", "year", {"executions": "10500"}, 99000 + 400),  # 500 over at 0.8c
        ("enterprise", "month", {"api_calls": "1e12", "executions": "1e9"}, 29900),
        ("starter", "month", {"storage_mb": "999999"}, 2900),  # storage has no overage price
        ("starter", "month", {"executions": "1500", "api_calls": "12000"}, 2900 + 500 + 200),
        ("pro", "month", {"api_calls": "180000"}, 9900 + 4000 + 1500),  # 50k at .08, 30k at .05
        ("pro", "month", {"tokens": "10000001"}, 9900 + 1),  # one started package of 1,000
    ],
)
def test_seed_plan_totals_match_figures_worked_by_hand(
    plan_id: str, interval: Interval, usage: dict[str, str], total: int
) -> None:
    usage_decimals = {meter: D(quantity) for meter, quantity in usage.items()}
    draft = rate_period(CATALOG.plans[plan_id], interval, usage_decimals)
    assert draft.total_cents == total
    assert draft.currency == "usd"


def test_yearly_interval_on_a_plan_without_yearly_price_is_an_error() -> None:
    with pytest.raises(RatingError, match="no yearly price"):
        rate_period(FREE, "year", {})


def test_base_fee_is_one_full_line_without_trial_or_change() -> None:
    base = rate_period(STARTER, "month", {}).lines[0]
    assert (base.kind, base.meter, base.quantity, base.amount_cents) == (
        "base_fee", "base_fee", D(1), 2900,
    )
    assert base.unit_amount_cents == D(2900)


@pytest.mark.parametrize(
    ("executions", "charge"),
    [("0", 0), ("999", 0), ("1000", 0), ("1001", 1), ("1000.6", 1), ("1000.4", 0)],
)
def test_usage_is_charged_only_above_included(executions: str, charge: int) -> None:
    draft = rate_period(STARTER, "month", {"executions": D(executions)})
    assert [ln.amount_cents for ln in draft.lines if ln.meter == "executions"] == [charge]


def test_usage_at_exactly_included_is_not_charged() -> None:
    draft = rate_period(STARTER, "month", {"executions": D(1000), "api_calls": D(10000)})
    assert draft.total_cents == 2900


def test_one_unit_over_included_is_charged_one_unit() -> None:
    assert rate_period(STARTER, "month", {"executions": D(1001)}).total_cents == 2901


def test_unlimited_meter_has_no_line_and_no_charge() -> None:
    draft = rate_period(ENTERPRISE, "month", {"api_calls": D("1e12")})
    assert [line.kind for line in draft.lines] == ["base_fee"]


def test_meter_without_overage_price_has_no_line_but_billed_meters_show_zero_lines() -> None:
    draft = rate_period(STARTER, "month", {"storage_mb": D(10**6)})
    assert [line.meter for line in draft.lines] == ["base_fee", "api_calls", "executions", "tokens"]
    assert all(line.amount_cents == 0 for line in draft.lines[1:])


def test_missing_meters_count_as_zero_usage() -> None:
    assert rate_period(STARTER, "month", {}) == rate_period(
        STARTER, "month", {m: D(0) for m in STARTER.meters}
    )


def test_usage_of_a_meter_not_on_the_plan_is_an_error_not_free() -> None:
    with pytest.raises(RatingError, match="'gpu_seconds' is not on plan"):
        rate_period(STARTER, "month", {"gpu_seconds": D(1)})


@pytest.mark.parametrize("bad", ["-1", "NaN", "Infinity"])
def test_negative_or_non_finite_usage_is_an_error(bad: str) -> None:
    with pytest.raises(RatingError, match="finite, non-negative"):
        rate_period(STARTER, "month", {"executions": D(bad)})


# --- rounding ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api_calls", "charge"),
    [
        ("10004", 0),  # 0.4c rounds down
        ("10005", 0),  # 0.5c: a tie, to the even cent
        ("10015", 2),  # 1.5c: rounded once for the line; per-unit rounding would give 0
        ("12345", 234),  # 234.5c: a tie, to the even cent
        ("12355", 236),  # 235.5c
    ],
)
def test_each_line_is_rounded_once_half_to_even(api_calls: str, charge: int) -> None:
    draft = rate_period(STARTER, "month", {"api_calls": D(api_calls)})
    assert [ln.amount_cents for ln in draft.lines if ln.meter == "api_calls"] == [charge]


def test_sub_cent_unit_price_is_kept_exact_on_the_line() -> None:
    line = rate_period(STARTER, "month", {"api_calls": D(12345)}).lines[1]
    assert (line.quantity, line.unit_amount_cents) == (D(2345), D("0.1"))


# --- pricing models ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("used", "graduated", "volume"),
    [
        ("0", 0, 0),
        ("500", 500, 500),
        ("1000", 1000, 1000),  # up_to is inclusive: unit 1,000 is still in the first tier
        ("1001", 1000, 500),  # 1000 + 0.5 = 1000.5 -> 1000;  1001 x 0.5 = 500.5 -> 500
        ("1500", 1250, 750),  # 1000 + 500 x 0.5;  1500 x 0.5
        ("3000", 2000, 1500),
    ],
)
def test_graduated_and_volume_price_the_same_usage_differently(
    used: str, graduated: int, volume: int
) -> None:
    assert units_charge(synthetic(Graduated(tiers=TWO_TIERS)), used) == graduated
    assert units_charge(synthetic(Volume(tiers=TWO_TIERS)), used) == volume


def test_tiers_apply_to_usage_above_included() -> None:
    # 2,500 used, 1,000 included: the tiers see 1,500 units.
    assert units_charge(synthetic(Graduated(tiers=TWO_TIERS), included=D(1000)), "2500") == 1250
    assert units_charge(synthetic(Volume(tiers=TWO_TIERS), included=D(1000)), "2500") == 750


def test_volume_pricing_can_charge_less_for_more_usage() -> None:
    plan = synthetic(Volume(tiers=TWO_TIERS))
    assert units_charge(plan, "1001") < units_charge(plan, "1000")


FLAT_TIERS = [
    Tier(up_to=D(100), flat_amount_cents=D(500)),
    Tier(unit_amount_cents=D(2), flat_amount_cents=D(100)),
]


@pytest.mark.parametrize(
    ("used", "graduated", "volume"),
    [
        ("0", 0, 0),  # no unit in any tier: no flat amount either
        ("1", 500, 500),
        ("100", 500, 500),
        ("150", 500 + 50 * 2 + 100, 150 * 2 + 100),
    ],
)
def test_flat_amount_is_charged_once_any_unit_reaches_its_tier(
    used: str, graduated: int, volume: int
) -> None:
    assert units_charge(synthetic(Graduated(tiers=FLAT_TIERS)), used) == graduated
    assert units_charge(synthetic(Volume(tiers=FLAT_TIERS)), used) == volume


def test_tiered_line_shows_overage_units_and_average_unit_price() -> None:
    draft = rate_period(synthetic(Graduated(tiers=TWO_TIERS)), "month", {"units": D(1500)})
    line = draft.lines[1]
    assert (line.quantity, line.unit_amount_cents, line.amount_cents) == (
        D(1500), D("0.833333333333"), 1250,
    )


@pytest.mark.parametrize(
    ("used", "packages", "charge"),
    [("0", 0, 0), ("1", 1, 250), ("100", 1, 250), ("101", 2, 500), ("250.5", 3, 750)],
)
def test_package_pricing_rounds_started_packages_up(used: str, packages: int, charge: int) -> None:
    plan = synthetic(Package(package_size=D(100), package_amount_cents=D(250)))
    line = rate_period(plan, "month", {"units": D(used)}).lines[1]
    assert (line.quantity, line.unit_amount_cents, line.amount_cents) == (
        D(packages), D(250), charge,
    )


@pytest.mark.parametrize(
    ("tokens", "charge"),
    [("1000000", 0), ("1000001", 2), ("1002500", 6), ("1003000", 6)],
)
def test_seed_starter_tokens_are_sold_in_started_packages_of_a_thousand(
    tokens: str, charge: int
) -> None:
    draft = rate_period(STARTER, "month", {"tokens": D(tokens)})
    assert draft.total_cents == 2900 + charge


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ([Tier(up_to=D(10)), Tier(up_to=D(5)), Tier()], "increase strictly"),
        ([Tier(up_to=D(10)), Tier(up_to=D(10)), Tier()], "increase strictly"),
        ([Tier(), Tier(up_to=D(10))], "only the last tier"),
        ([Tier(up_to=D(10))], "beyond the last tier"),
    ],
)
def test_malformed_tier_tables_are_errors_not_misprices(tiers: list[Tier], message: str) -> None:
    for pricing in (Graduated(tiers=tiers), Volume(tiers=tiers)):
        with pytest.raises(RatingError, match=message):
            units_charge(synthetic(pricing), "20")


def test_a_bounded_last_tier_is_fine_while_usage_stays_inside_it() -> None:
    assert units_charge(synthetic(Graduated(tiers=[Tier(up_to=D(10), unit_amount_cents=D(3))])),
                        "10") == 30


# --- trials --------------------------------------------------------------------------------


@pytest.mark.parametrize("trial_end", [PERIOD_END, PERIOD_END + timedelta(days=9)])
def test_period_entirely_inside_trial_charges_nothing(trial_end: datetime) -> None:
    draft = rate_period(STARTER, "month", {"executions": D(5000)},
                        context(trial_end=trial_end, minimum_cents=D(10000)))
    assert draft.total_cents == 0
    assert [(line.kind, line.quantity, line.amount_cents) for line in draft.lines] == [
        ("base_fee", D(0), 0),
    ]


@pytest.mark.parametrize(
    ("trial_end", "fee"),
    [
        (nov(16), 1450),  # 15 of 30 days billed
        (nov(11), 1933),  # 20/30 x 2900 = 1933.33
        (nov(1, seconds=1), 2900),  # 2900 x 2591999/2592000 = 2899.9989
        (PERIOD_START, 2900),  # the trial ended as the period began
        (PERIOD_START - timedelta(days=3), 2900),
    ],
)
def test_period_partly_inside_trial_prorates_the_base_fee(trial_end: datetime, fee: int) -> None:
    draft = rate_period(STARTER, "month", {}, context(trial_end=trial_end))
    assert draft.total_cents == fee


def test_usage_in_a_partly_trialing_period_is_charged_in_full() -> None:
    draft = rate_period(STARTER, "month", {"executions": D(1100)}, context(trial_end=nov(16)))
    assert draft.total_cents == 1450 + 100


# --- plan changes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "before", "after"),
    [
        (nov(16), 1450, 4950),  # half and half
        (nov(11), 967, 6600),  # 2900/3 = 966.67;  9900 x 2/3
        (nov(1, seconds=1), 0, 9900),  # one second of Starter: 0.0011c
        (datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC), 2900, 0),  # one second of Pro: 0.0038c
    ],
)
def test_mid_period_upgrade_prorates_both_plans_by_elapsed_time(
    at: datetime, before: int, after: int
) -> None:
    change = PlanChange(at=at, previous_plan=STARTER)
    draft = rate_period(PRO, "month", {}, context(plan_change=change))
    fees = [(line.kind, line.amount_cents) for line in draft.lines if line.kind != "usage"]
    assert fees == [("proration", before), ("proration", after)]
    assert draft.total_cents == before + after


def test_usage_after_a_plan_change_is_rated_on_the_new_plan() -> None:
    change = PlanChange(at=nov(16), previous_plan=STARTER)
    # 5,000 executions: 4,000 over Starter's 1,000 would be 4000c; Pro includes 10,000.
    draft = rate_period(PRO, "month", {"executions": D(5000)}, context(plan_change=change))
    assert draft.total_cents == 1450 + 4950


def test_yearly_plan_change_prorates_yearly_fees() -> None:
    year_start, year_end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    change = PlanChange(at=datetime(2026, 7, 2, 12, tzinfo=UTC), previous_plan=STARTER)
    ctx = RatingContext(period_start=year_start, period_end=year_end, plan_change=change)
    # 2026 has 365 days; the change is 182.5 days in, exactly half.
    assert rate_period(PRO, "year", {}, ctx).total_cents == 14500 + 49500


def test_plan_change_and_trial_bill_only_time_after_the_trial() -> None:
    change = PlanChange(at=nov(16), previous_plan=STARTER)
    draft = rate_period(PRO, "month", {}, context(plan_change=change, trial_end=nov(11)))
    assert [line.amount_cents for line in draft.lines[:2]] == [483, 4950]  # 5 and 15 days
    draft = rate_period(PRO, "month", {}, context(plan_change=change, trial_end=nov(21)))
    assert [line.amount_cents for line in draft.lines[:2]] == [0, 3300]  # 0 and 10 days


@pytest.mark.parametrize("at", [PERIOD_START, PERIOD_END, nov(1) - timedelta(days=1)])
def test_plan_change_must_fall_strictly_inside_the_period(at: datetime) -> None:
    with pytest.raises(ValidationError, match="strictly inside"):
        context(plan_change=PlanChange(at=at, previous_plan=STARTER))


def test_plan_change_cannot_switch_currency() -> None:
    euro = STARTER.model_copy(update={"currency": "eur"})
    with pytest.raises(RatingError, match="currency"):
        rate_period(PRO, "month", {}, context(plan_change=PlanChange(at=nov(16),
                                                                     previous_plan=euro)))


def test_period_must_end_after_it_starts() -> None:
    with pytest.raises(ValidationError, match="period_end must be after"):
        RatingContext(period_start=PERIOD_END, period_end=PERIOD_START)


# --- minimum spend -------------------------------------------------------------------------


def test_charges_below_minimum_are_topped_up_to_it() -> None:
    draft = rate_period(STARTER, "month", {"executions": D(1500)}, context(minimum_cents=D(5000)))
    assert draft.lines[-1].kind == "minimum"
    assert draft.lines[-1].amount_cents == 5000 - 2900 - 500
    assert draft.total_cents == 5000


@pytest.mark.parametrize("executions", [4100, 5000])
def test_charges_at_or_above_minimum_get_no_minimum_line(executions: int) -> None:
    # 3,100 or 4,000 executions over at 1c: 6000c / 6900c >= 5000c.
    draft = rate_period(STARTER, "month", {"executions": D(executions)},
                        context(minimum_cents=D(5000)))
    assert "minimum" not in [line.kind for line in draft.lines]


def test_minimum_is_prorated_by_the_non_trial_fraction() -> None:
    draft = rate_period(STARTER, "month", {}, context(minimum_cents=D(5000), trial_end=nov(16)))
    assert draft.total_cents == 2500  # 1450 fee + 1050 top-up


# --- coupons -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "months", "interval", "period_index", "discount"),
    [
        ("once", None, "month", 0, 580),
        ("once", None, "month", 1, 0),
        ("repeating", 3, "month", 0, 580),
        ("repeating", 3, "month", 2, 580),
        ("repeating", 3, "month", 3, 0),
        ("repeating", 12, "year", 0, 5800),
        ("repeating", 12, "year", 1, 0),
        ("repeating", 13, "year", 1, 5800),  # month 12 of 13 is still covered
        ("forever", None, "month", 0, 580),
        ("forever", None, "month", 240, 580),
    ],
)
def test_coupon_applies_for_its_duration(
    duration: str, months: int | None, interval: Interval, period_index: int, discount: int
) -> None:
    draft = coupon_draft(percent_coupon(duration, months), period_index, interval)
    assert draft.discount_cents == discount
    assert draft.total_cents == draft.subtotal_cents - discount
    assert ("discount" in [line.kind for line in draft.lines]) == (discount > 0)


@pytest.mark.parametrize(
    ("coupon", "discount"),
    [
        ({"percent_off": "100"}, 2900),
        ({"percent_off": "12.5"}, 362),  # 362.5 rounds half to even
        ({"amount_off_cents": 1000}, 1000),
        ({"amount_off_cents": 5000}, 2900),  # capped at the subtotal: never a negative total
    ],
)
def test_coupon_takes_percent_or_fixed_amount_off(coupon: dict[str, object], discount: int) -> None:
    draft = coupon_draft(Coupon.model_validate({"code": "X", "duration": "once", **coupon}), 0)
    assert (draft.subtotal_cents, draft.discount_cents, draft.total_cents) == (
        2900, discount, 2900 - discount,
    )
    assert draft.lines[-1].amount_cents == -discount


def test_coupon_on_a_free_period_discounts_nothing() -> None:
    applied = AppliedCoupon(
        coupon=Coupon(code="X", amount_off_cents=500, duration="forever"),
        redeemed_at=PERIOD_START, period_index=0,
    )
    assert rate_period(FREE, "month", {}, context(coupon=applied)).total_cents == 0


def test_coupon_applies_after_the_minimum_top_up() -> None:
    applied = AppliedCoupon(coupon=percent_coupon("once", percent="50"),
                            redeemed_at=PERIOD_START, period_index=0)
    draft = rate_period(STARTER, "month", {}, context(minimum_cents=D(5000), coupon=applied))
    assert draft.total_cents == 2500


def test_coupon_redeemed_in_its_window_keeps_applying_after_the_window_closes() -> None:
    coupon = Coupon(code="BF", percent_off=D(20), duration="forever",
                    valid_from=nov(1), valid_until=nov(2))
    applied = AppliedCoupon(coupon=coupon, redeemed_at=nov(1, seconds=5), period_index=7)
    assert rate_period(STARTER, "month", {}, context(coupon=applied)).discount_cents == 580


@pytest.mark.parametrize("redeemed_at", [nov(1) - timedelta(seconds=1), nov(2)])
def test_coupon_redeemed_outside_its_validity_window_is_an_error(redeemed_at: datetime) -> None:
    coupon = Coupon(code="BF", percent_off=D(20), duration="forever",
                    valid_from=nov(1), valid_until=nov(2))
    applied = AppliedCoupon(coupon=coupon, redeemed_at=redeemed_at, period_index=0)
    with pytest.raises(RatingError, match="validity window"):
        rate_period(STARTER, "month", {}, context(coupon=applied))


def test_fixed_amount_coupon_in_another_currency_is_an_error() -> None:
    coupon = Coupon(code="EU", amount_off_cents=500, currency="eur", duration="once")
    applied = AppliedCoupon(coupon=coupon, redeemed_at=PERIOD_START, period_index=0)
    with pytest.raises(RatingError, match="eur"):
        rate_period(STARTER, "month", {}, context(coupon=applied))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"duration": "once"}, "exactly one of"),
        ({"duration": "once", "percent_off": "5", "amount_off_cents": 5}, "exactly one of"),
        ({"duration": "repeating", "percent_off": "5"}, "duration_in_months is required"),
        ({"duration": "once", "percent_off": "5", "duration_in_months": 2}, "only for it"),
        ({"duration": "once", "percent_off": "101"}, "less than or equal to 100"),
        ({"duration": "once", "percent_off": "5", "valid_from": "2026-11-02T00:00:00Z",
          "valid_until": "2026-11-01T00:00:00Z"}, "valid_until must be after"),
    ],
)
def test_malformed_coupons_are_rejected(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Coupon.model_validate({"code": "X", **fields})


# --- properties ----------------------------------------------------------------------------

METERS = ("alpha", "beta", "gamma")
# Small ranges, so generated usage often crosses included and tier boundaries.
prices = st.decimals(min_value=0, max_value=100, places=3)
quantities = st.one_of(
    st.integers(0, 10**4).map(D), st.decimals(min_value=0, max_value=10**4, places=2)
)


@st.composite
def tier_tables(draw: st.DrawFn, non_increasing_unit_prices: bool = False) -> list[Tier]:
    widths = draw(st.lists(st.integers(1, 2000), min_size=0, max_size=3))
    units = draw(st.lists(prices, min_size=len(widths) + 1, max_size=len(widths) + 1))
    if non_increasing_unit_prices:
        units.sort(reverse=True)
    flats = [D(0)] * len(units) if non_increasing_unit_prices else draw(
        st.lists(prices, min_size=len(units), max_size=len(units))
    )
    bounds: list[Decimal | None] = []
    for width in widths:
        bounds.append((bounds[-1] or D(0)) + width if bounds else D(width))
    bounds.append(None)
    return [
        Tier(up_to=b, unit_amount_cents=u, flat_amount_cents=f)
        for b, u, f in zip(bounds, units, flats, strict=True)
    ]


def pricings(with_volume: bool = True) -> st.SearchStrategy[Pricing | None]:
    options: list[st.SearchStrategy[Pricing | None]] = [
        st.none(),
        st.builds(PerUnit, unit_amount_cents=prices),
        st.builds(Package, package_size=st.decimals(min_value=D("0.5"), max_value=10**4, places=1),
                  package_amount_cents=prices),
        st.builds(Graduated, tiers=tier_tables()),
    ]
    if with_volume:
        options.append(st.builds(Volume, tiers=tier_tables()))
    return st.one_of(options)


def plans(with_volume: bool = True) -> st.SearchStrategy[Plan]:
    meter = st.builds(
        PlanMeter,
        # Mostly finite: an unlimited meter never charges, so it exercises little.
        included=st.one_of(st.none(), *[st.integers(0, 2000).map(D)] * 3),
        overage=pricings(with_volume),
    )
    return st.builds(
        Plan,
        name=st.just("Generated"),
        monthly_fee_cents=st.decimals(min_value=0, max_value=10**6, places=2),
        meters=st.fixed_dictionaries({name: meter for name in METERS}),
    )


usages = st.fixed_dictionaries({name: quantities for name in METERS})
moments = st.datetimes(
    min_value=datetime(2026, 10, 15), max_value=datetime(2026, 12, 15), timezones=st.just(UTC)
)
inside = st.datetimes(
    min_value=datetime(2026, 11, 1, 0, 0, 1), max_value=datetime(2026, 11, 30, 23, 59, 59),
    timezones=st.just(UTC),
)
coupons = st.builds(
    AppliedCoupon,
    coupon=st.one_of(
        st.builds(Coupon, code=st.just("P"), percent_off=st.decimals(
            min_value=D("0.01"), max_value=100, places=2), duration=st.just("forever")),
        st.builds(Coupon, code=st.just("A"), amount_off_cents=st.integers(1, 10**7),
                  duration=st.just("forever")),
    ),
    redeemed_at=st.just(PERIOD_START),
    period_index=st.integers(0, 3),
)


@st.composite
def contexts(draw: st.DrawFn, with_coupon: bool = True) -> RatingContext | None:
    if draw(st.booleans()):
        return None
    previous = draw(st.one_of(st.none(), plans()))
    return context(
        trial_end=draw(st.one_of(st.none(), moments)),
        plan_change=None if previous is None else PlanChange(at=draw(inside),
                                                             previous_plan=previous),
        minimum_cents=draw(st.one_of(st.none(), st.decimals(min_value=0, max_value=10**6,
                                                            places=2))),
        coupon=draw(st.one_of(st.none(), coupons)) if with_coupon else None,
    )


@settings(max_examples=300)
@given(plans(), usages, contexts())
def test_total_is_never_negative_and_equals_the_sum_of_lines(
    plan: Plan, usage: dict[str, Decimal], ctx: RatingContext | None
) -> None:
    draft = rate_period(plan, "month", usage, ctx)
    assert draft.total_cents >= 0
    assert draft.total_cents == sum(line.amount_cents for line in draft.lines)
    assert draft.total_cents == draft.subtotal_cents - draft.discount_cents
    assert 0 <= draft.discount_cents <= draft.subtotal_cents


@settings(max_examples=300)
@given(plans(with_volume=False), usages, st.sampled_from(METERS),
       st.decimals(min_value=0, max_value=5000, places=2), contexts(with_coupon=False))
def test_more_usage_never_lowers_the_total_without_volume_pricing_or_coupons(
    plan: Plan, usage: dict[str, Decimal], meter: str, extra: Decimal, ctx: RatingContext | None
) -> None:
    more = {**usage, meter: usage[meter] + extra}
    assert rate_period(plan, "month", more, ctx).total_cents >= rate_period(
        plan, "month", usage, ctx
    ).total_cents


@given(tier_tables(non_increasing_unit_prices=True), quantities)
def test_volume_never_costs_more_than_graduated_when_unit_prices_fall_and_tiers_are_not_flat(
    tiers: list[Tier], used: Decimal
) -> None:
    assert volume_amount(tiers, used) <= graduated_amount(tiers, used)
    assert units_charge(synthetic(Volume(tiers=tiers)), str(used)) <= units_charge(
        synthetic(Graduated(tiers=tiers)), str(used)
    )


@given(prices, quantities)
def test_a_single_open_tier_prices_like_per_unit(unit: Decimal, used: Decimal) -> None:
    tiers = [Tier(unit_amount_cents=unit)]
    expected = units_charge(synthetic(PerUnit(unit_amount_cents=unit)), str(used))
    assert units_charge(synthetic(Graduated(tiers=tiers)), str(used)) == expected
    assert units_charge(synthetic(Volume(tiers=tiers)), str(used)) == expected


@settings(max_examples=100)
@given(plans(), usages, contexts())
def test_same_inputs_give_the_same_invoice_whatever_the_callers_decimal_context(
    plan: Plan, usage: dict[str, Decimal], ctx: RatingContext | None
) -> None:
    first = rate_period(plan, "month", usage, ctx)
    with localcontext(prec=3, rounding=ROUND_DOWN):
        second = rate_period(plan, "month", usage, ctx)
    assert first == second
    assert first.model_dump_json() == second.model_dump_json()


def test_public_pricing_functions_ignore_the_callers_decimal_context() -> None:
    with localcontext(prec=3, rounding=ROUND_DOWN):
        assert graduated_amount(TWO_TIERS, D(1501)) == D("1250.5")
        assert to_cents(D("12345.5")) == 12346
