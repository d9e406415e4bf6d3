"""Rating: turn a plan and one period's usage into an invoice draft. Pure and deterministic.

Entry point: `rate_period(plan, interval, usage, context)`. No I/O; the billing jobs call it and
push the draft to Stripe and Postgres.

Money rule
    Every amount is computed in Decimal cents (sub-cent unit prices stay exact) and rounded ONCE
    per invoice line to whole cents, half to even (docs/billing.md, rule 7: the one rounding
    rule of every amount Tally bills). Subtotal, discount and total are sums of
    those rounded line amounts, so `total_cents == sum(line.amount_cents)` always holds. The
    arithmetic runs in a fixed decimal context (`_DECIMAL`), never the caller's, so the same
    inputs give the same invoice on every machine and thread.

Decisions
    - Base fee: `monthly_fee_cents` or `yearly_fee_cents` by interval; a yearly interval on a plan
      without a yearly price raises RatingError. The base-fee line's quantity is the fraction of
      the period billed (1 unless a trial or plan change cuts it).
    - Usage: a meter is charged only for its overage, `usage - included`. `included=None` means
      unlimited, so nothing is charged. All pricing models, including the tiers of graduated and
      volume pricing, apply to the overage quantity, not to total usage: tier `up_to` counts
      units above `included`. `up_to` is inclusive (Stripe's convention).
    - One line per billed meter, even when its overage is zero (it shows usage against
      `included`). A meter that is never billed (`overage=None` or unlimited) gets no line:
      invoice lines carry money; usage reporting lives in the read models.
    - Usage of a meter the plan does not define raises RatingError rather than going unbilled;
      negative usage raises too. Meters missing from `usage` count as zero.
    - Package pricing bills whole packages, rounding up; the line's quantity is packages.
    - Graduated/volume lines: quantity is overage units and `unit_amount_cents` the average
      price per unit to 12 places (Stripe's precision), for display; the amount is exact.
      A tier's `flat_amount_cents` is charged once any unit falls in it; zero units cost nothing.
      Volume pricing is not monotonic (crossing into a cheaper tier can lower the charge).
    - Trials: `context.trial_end` (from the subscription, not `plan.trial_days`). A period
      entirely inside the trial charges nothing: a zero base-fee line, no usage lines, no
      minimum. A period partly inside prorates the base fee (and the minimum) by the
      non-trial fraction; its usage is charged in full — pass only post-trial usage if trial
      usage should be free, since rating only sees the period's total.
    - Plan change mid-period: the base fee becomes two "proration" lines, the previous plan for
      the time before the change and the new plan (`plan`) after, each a fraction of the period
      measured in elapsed time (exact to the microsecond; Stripe's proration is per second).
      The net equals Stripe's credit for unused time plus charge for remaining time. Usage is
      rated on the new plan only, since rating sees only the period's total usage.
    - Minimum spend (`context.minimum_cents`; the catalog has no field for it yet): if the
      charges (fees + usage) are below it, a "minimum" line tops them up to it. The coupon
      applies after the top-up.
    - Coupons: at most one per subscription (Stripe's default). Percent or fixed amount off the
      subtotal; a fixed amount is capped at the subtotal, so the total is never negative.
      Duration: "once" applies to the first period (index 0), "repeating" while fewer than
      `duration_in_months` months have passed at the period's start (a yearly period counts
      12), "forever" always. The validity window bounds redemption, like Stripe's `redeem_by`:
      a coupon redeemed outside it raises RatingError.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Context, Decimal, localcontext
from itertools import pairwise
from typing import Annotated, Literal, ParamSpec, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from domain.errors import DomainError
from schemas.plans import Graduated, Package, PerUnit, Plan, PlanMeter, Pricing, Tier

Interval = Literal["month", "year"]
LineKind = Literal["base_fee", "proration", "usage", "minimum", "discount"]

_Frozen = ConfigDict(frozen=True, extra="forbid")
_NonNegative = Annotated[Decimal, Field(ge=0)]
# Large enough that no product of a quantity (< 1e15) and a price loses digits.
_DECIMAL = Context(prec=60, rounding=ROUND_HALF_EVEN)
_ONE_CENT = Decimal(1)
_UNIT_PRICE_PLACES = Decimal("1e-12")
_MONTHS_PER_PERIOD: dict[Interval, int] = {"month": 1, "year": 12}
_P = ParamSpec("_P")
_R = TypeVar("_R")


class RatingError(DomainError):
    """The inputs cannot be rated: a missing price, an unknown meter, a bad tier table."""


class Coupon(BaseModel):
    """A discount definition: percent or fixed amount off, for a duration."""

    model_config = _Frozen

    code: str
    percent_off: Annotated[Decimal, Field(gt=0, le=100)] | None = None
    amount_off_cents: Annotated[int, Field(gt=0)] | None = None
    currency: Literal["usd", "eur", "gbp"] = "usd"  # of amount_off_cents
    duration: Literal["once", "repeating", "forever"]
    duration_in_months: Annotated[int, Field(ge=1)] | None = None
    valid_from: AwareDatetime | None = None
    valid_until: AwareDatetime | None = None  # exclusive

    @model_validator(mode="after")
    def _consistent(self) -> Coupon:
        problems = []
        if (self.percent_off is None) == (self.amount_off_cents is None):
            problems.append("exactly one of percent_off and amount_off_cents is required")
        if (self.duration == "repeating") != (self.duration_in_months is not None):
            problems.append("duration_in_months is required for repeating and only for it")
        if self.valid_from and self.valid_until and self.valid_until <= self.valid_from:
            problems.append("valid_until must be after valid_from")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class AppliedCoupon(BaseModel):
    """A coupon redeemed on a subscription, seen from the period being rated."""

    model_config = _Frozen

    coupon: Coupon
    redeemed_at: AwareDatetime
    # 0 for the period in which the coupon was redeemed, 1 for the next, ...
    period_index: Annotated[int, Field(ge=0)]


class PlanChange(BaseModel):
    """A mid-period switch: `previous_plan` applied until `at`, the rated plan after."""

    model_config = _Frozen

    at: AwareDatetime
    previous_plan: Plan


class RatingContext(BaseModel):
    """The period and what, besides plan and usage, changes its price."""

    model_config = _Frozen

    period_start: AwareDatetime
    period_end: AwareDatetime  # exclusive
    trial_end: AwareDatetime | None = None
    plan_change: PlanChange | None = None
    minimum_cents: _NonNegative | None = None
    coupon: AppliedCoupon | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RatingContext:
        problems = []
        if self.period_end <= self.period_start:
            problems.append("period_end must be after period_start")
        change = self.plan_change
        if change and not self.period_start < change.at < self.period_end:
            problems.append("plan_change.at must be strictly inside the period")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class InvoiceLine(BaseModel):
    """One invoice line; `meter` is the meter name, or the kind for non-usage lines."""

    model_config = _Frozen

    kind: LineKind
    meter: str
    description: str
    quantity: Decimal
    unit_amount_cents: Decimal
    amount_cents: int


class InvoiceDraft(BaseModel):
    """A rated period. `total_cents == subtotal_cents - discount_cents == sum of lines`."""

    model_config = _Frozen

    currency: Literal["usd", "eur", "gbp"]
    lines: tuple[InvoiceLine, ...]
    subtotal_cents: int
    discount_cents: int
    total_cents: int


def _in_fixed_context(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run `function` in `_DECIMAL`, never the caller's decimal context: same inputs, same cents."""

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with localcontext(_DECIMAL):
            return function(*args, **kwargs)

    return wrapper


@_in_fixed_context
def to_cents(amount: Decimal, rounding: str = ROUND_HALF_EVEN) -> int:
    """Round an exact amount of cents to whole cents: the one rounding per line, half to
    even (docs/billing.md, rule 7)."""
    return int(amount.quantize(_ONE_CENT, rounding=rounding))


# --- pricing models: exact Decimal cents for a quantity of overage units ----------------------


@_in_fixed_context
def per_unit_amount(pricing: PerUnit, quantity: Decimal) -> Decimal:
    """Every unit at the same price."""
    return quantity * pricing.unit_amount_cents


@_in_fixed_context
def package_count(pricing: Package, quantity: Decimal) -> Decimal:
    """Whole packages needed for `quantity`: a started package is a full one."""
    return (quantity / pricing.package_size).to_integral_value(rounding=ROUND_CEILING)


@_in_fixed_context
def package_amount(pricing: Package, quantity: Decimal) -> Decimal:
    """Packages of `package_size` units, rounded up, at `package_amount_cents` each."""
    return package_count(pricing, quantity) * pricing.package_amount_cents


@_in_fixed_context
def graduated_amount(tiers: list[Tier], quantity: Decimal) -> Decimal:
    """Each unit at the price of the tier it falls in (plus each reached tier's flat amount)."""
    _check_tiers(tiers, quantity)
    total = Decimal(0)
    lower = Decimal(0)
    for tier in tiers:
        if quantity <= lower:
            break
        upper = quantity if tier.up_to is None else min(quantity, tier.up_to)
        total += (upper - lower) * tier.unit_amount_cents + tier.flat_amount_cents
        if tier.up_to is None:
            break
        lower = tier.up_to
    return total


@_in_fixed_context
def volume_amount(tiers: list[Tier], quantity: Decimal) -> Decimal:
    """All units at the price of the tier the whole quantity falls in (plus its flat amount)."""
    _check_tiers(tiers, quantity)
    if quantity == 0:
        return Decimal(0)
    tier = next(t for t in tiers if t.up_to is None or quantity <= t.up_to)
    return quantity * tier.unit_amount_cents + tier.flat_amount_cents


def _check_tiers(tiers: list[Tier], quantity: Decimal) -> None:
    # The catalog model does not order-check tiers, so a bad table is caught here, not mispriced.
    bounds = [t.up_to for t in tiers]
    if any(b is None for b in bounds[:-1]):
        raise RatingError("only the last tier may be open-ended (up_to omitted)")
    finite = [b for b in bounds if b is not None]
    if any(a >= b for a, b in pairwise(finite)):
        raise RatingError("tier up_to values must increase strictly")
    last = bounds[-1]
    if last is not None and quantity > last:
        raise RatingError(f"quantity {quantity} is beyond the last tier (up_to {last})")


# --- the entry point --------------------------------------------------------------------------


@_in_fixed_context
def rate_period(
    plan: Plan,
    interval: Interval,
    usage: Mapping[str, Decimal],
    context: RatingContext | None = None,
) -> InvoiceDraft:
    """Rate one billing period of `plan` into an invoice draft (see the module docstring).

    `plan` is the plan in effect at the end of the period; `usage` maps meter names to the
    period's aggregated quantities. Without a context the period is a plain full period.
    Raises RatingError when the inputs cannot be priced.
    """
    _check_usage(plan, usage)
    if context is None:
        billable = period = Decimal(1)  # the whole period is billed
        lines = [_fee_line("base_fee", plan, interval, billable, period)]
    else:
        lines, billable, period = _fee_lines(plan, interval, context)
    if billable > 0:  # a period entirely inside the trial charges no usage
        lines += [
            _usage_line(meter, terms, usage.get(meter, Decimal(0)))
            for meter, terms in sorted(plan.meters.items())
            if terms.overage is not None and terms.included is not None
        ]

    if context is not None and context.minimum_cents is not None:
        # Prorated like the base fee, so a trial period owes no minimum.
        minimum = to_cents(context.minimum_cents * billable / period)
        top_up = minimum - sum(line.amount_cents for line in lines)
        if top_up > 0:
            description = f"Top-up to minimum spend of {minimum}c"
            lines.append(_line("minimum", "minimum", description, Decimal(1), Decimal(top_up),
                               Decimal(top_up)))
    subtotal = sum(line.amount_cents for line in lines)

    discount = 0
    if context is not None and context.coupon is not None:
        applied = context.coupon
        if _coupon_applies(applied, interval, plan.currency):
            discount = _discount_cents(applied.coupon, subtotal)
            lines.append(_line("discount", "discount", _coupon_description(applied.coupon),
                               Decimal(1), Decimal(-discount), Decimal(-discount)))
    return InvoiceDraft(
        currency=plan.currency,
        lines=tuple(lines),
        subtotal_cents=subtotal,
        discount_cents=discount,
        total_cents=subtotal - discount,
    )


def _check_usage(plan: Plan, usage: Mapping[str, Decimal]) -> None:
    problems = [f"meter {m!r} is not on plan {plan.name!r}" for m in usage if m not in plan.meters]
    problems += [
        f"usage of {m!r} must be a finite, non-negative number, not {q}"
        for m, q in usage.items()
        if not q.is_finite() or q < 0
    ]
    if problems:
        raise RatingError("; ".join(sorted(problems)))


def interval_fee(plan: Plan, interval: Interval) -> Decimal:
    """The plan's fee for one month or one year; RatingError if it has no yearly price."""
    if interval == "month":
        return plan.monthly_fee_cents
    if plan.yearly_fee_cents is None:
        raise RatingError(f"plan {plan.name!r} has no yearly price")
    return plan.yearly_fee_cents


def _fee_line(
    kind: LineKind, plan: Plan, interval: Interval, billed: Decimal, period: Decimal
) -> InvoiceLine:
    """The fee of `plan` for `billed` of the period's `period` microseconds."""
    fee = interval_fee(plan, interval)
    # Display only. The amount divides once, at 60 digits, so an exact half cent stays a tie.
    fraction = (billed / period).quantize(_UNIT_PRICE_PLACES).normalize()
    description = f"{plan.name} {interval}ly fee"
    if billed != period:
        description += f" ({fraction:.2%} of period)"
    return _line(kind, kind, description, fraction, fee, fee * billed / period)


def _fee_lines(
    plan: Plan, interval: Interval, context: RatingContext
) -> tuple[list[InvoiceLine], Decimal, Decimal]:
    """The base fee (or proration) lines, the time outside the trial and the period's length."""
    start, end = context.period_start, context.period_end
    # Time before trial_end is free; clamp so a trial that ended earlier changes nothing.
    billed_from = min(max(start, context.trial_end or start), end)
    period = _span(start, end)
    billable = _span(billed_from, end)
    change = context.plan_change
    if change is None:
        return [_fee_line("base_fee", plan, interval, billable, period)], billable, period
    if change.previous_plan.currency != plan.currency:
        raise RatingError("a plan change cannot switch currency mid-period")
    switch = max(billed_from, change.at)
    return [
        _fee_line("proration", change.previous_plan, interval, _span(billed_from, switch), period),
        _fee_line("proration", plan, interval, _span(switch, end), period),
    ], billable, period


def _span(start: datetime, end: datetime) -> Decimal:
    """Microseconds from start to end: integer, so exact (float total_seconds() is not)."""
    return Decimal((end - start) // timedelta(microseconds=1))


@dataclass(frozen=True)
class OverageCharge:
    """What an overage of one meter costs, before the line's rounding.

    `quantity x unit_amount_cents` is the charge for per-unit and package pricing; for tiers
    `unit_amount_cents` is the average price per unit, for display, and `exact_cents` is exact.
    """

    quantity: Decimal  # overage units, or whole packages for package pricing
    unit_amount_cents: Decimal
    exact_cents: Decimal
    detail: str  # how the quantity was priced, for the line's description ("" for per unit)


@_in_fixed_context
def overage_charge(pricing: Pricing, over: Decimal) -> OverageCharge:
    """The charge for `over` units above the allowance, under any pricing model."""
    if isinstance(pricing, PerUnit):
        exact = per_unit_amount(pricing, over)
        return OverageCharge(over, pricing.unit_amount_cents, exact, "")
    if isinstance(pricing, Package):
        # The line counts packages, so quantity x unit price is the amount.
        packages = package_count(pricing, over)
        detail = f", {packages} packages of {pricing.package_size}"
        return OverageCharge(packages, pricing.package_amount_cents,
                             package_amount(pricing, over), detail)
    tiered = graduated_amount if isinstance(pricing, Graduated) else volume_amount
    exact = tiered(pricing.tiers, over)
    average = (exact / over).quantize(_UNIT_PRICE_PLACES) if over else Decimal(0)
    detail = f" ({pricing.model} tiers; unit price is the average)"
    return OverageCharge(over, average, exact, detail)


def _usage_line(meter: str, terms: PlanMeter, used: Decimal) -> InvoiceLine:
    """The overage charge of one meter: usage above `included`, at the meter's pricing."""
    assert terms.overage is not None and terms.included is not None  # filtered by the caller
    over = max(Decimal(0), used - terms.included)
    charge = overage_charge(terms.overage, over)
    description = f"{meter}: {used} used, {terms.included} included, {over} over{charge.detail}"
    return _line("usage", meter, description, charge.quantity, charge.unit_amount_cents,
                 charge.exact_cents)


def _line(
    kind: LineKind, meter: str, description: str, quantity: Decimal, unit: Decimal, exact: Decimal
) -> InvoiceLine:
    return InvoiceLine(
        kind=kind, meter=meter, description=description, quantity=quantity,
        unit_amount_cents=unit, amount_cents=to_cents(exact),
    )


def _coupon_applies(applied: AppliedCoupon, interval: Interval, currency: str) -> bool:
    coupon = applied.coupon
    if (coupon.valid_from and applied.redeemed_at < coupon.valid_from) or (
        coupon.valid_until and applied.redeemed_at >= coupon.valid_until
    ):
        raise RatingError(f"coupon {coupon.code!r} was redeemed outside its validity window")
    if coupon.amount_off_cents is not None and coupon.currency != currency:
        raise RatingError(f"coupon {coupon.code!r} is in {coupon.currency}, the plan in {currency}")
    if coupon.duration == "once":
        return applied.period_index == 0
    if coupon.duration == "repeating":
        assert coupon.duration_in_months is not None  # the model enforces it
        return applied.period_index * _MONTHS_PER_PERIOD[interval] < coupon.duration_in_months
    return True


def _discount_cents(coupon: Coupon, subtotal: int) -> int:
    if coupon.percent_off is not None:
        # Its own line, so rounded once; percent_off <= 100 keeps it within the subtotal.
        return to_cents(Decimal(subtotal) * coupon.percent_off / 100)
    assert coupon.amount_off_cents is not None
    return min(coupon.amount_off_cents, subtotal)


def _coupon_description(coupon: Coupon) -> str:
    off = f"{coupon.percent_off}%" if coupon.percent_off else f"{coupon.amount_off_cents}c"
    return f"Coupon {coupon.code}: {off} off"
