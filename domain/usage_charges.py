"""What one monthly cycle's usage costs (pure): plan slices, prorated allowances, usage lines.

The rules are docs/billing.md, rules 5, 7, 8 and 9 (minimums). A cycle is cut into slices
at every plan change; each usage event counts in the slice in force at its `time`; a slice's
allowance of a meter is the plan's monthly `included` x slice seconds / cycle seconds,
rounded down to whole units (the cycle's seconds are the full cycle's, also when the
subscription ended inside it). The slice's overage is priced by rating's pricing models
(`domain.rating.overage_charge`) and rounded once per line, half to even.

What the cycle saw is decided by a cutoff: only usage ingested at or before it counts. The
cycle's invoice uses its own due time as cutoff; a later invoice re-rates the cycle with its
later cutoff, and the difference per meter is that invoice's "usage adjustment" (rule 8).
So the amounts are a function of the log alone, whenever the invoice job runs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Context, Decimal, localcontext
from typing import Literal

from domain.aggregation import Counter
from domain.cycles import Cycle, seconds_between
from domain.rating import RatingError, overage_charge, to_cents
from domain.subscriptions import Subscription
from schemas.plans import Catalog

LineKind = Literal[
    "fee", "usage", "minimum", "proration_credit", "proration_charge", "unused_fee_credit",
    "usage_adjustment", "minimum_adjustment", "discount",
]
# Rule 7: each line is rounded once, half to even, to a whole cent.
LINE_ROUNDING = ROUND_HALF_EVEN
_DECIMAL = Context(prec=60, rounding=ROUND_HALF_EVEN)


def round_line(exact_cents: Decimal) -> int:
    """An exact amount of cents as a line amount: whole cents, half to even."""
    return to_cents(exact_cents, LINE_ROUNDING)


def prorate(amount: Decimal, part: Decimal | int, whole: Decimal | int) -> Decimal:
    """`amount` x part / whole, exact to 60 digits (so an exact half cent stays a tie)."""
    with localcontext(_DECIMAL):
        return amount * part / whole


def when(moment: datetime) -> str:
    """A billing instant for descriptions: the date, with the time when it is not midnight."""
    if (moment.hour, moment.minute, moment.second) == (0, 0, 0):
        return f"{moment:%Y-%m-%d}"
    return f"{moment:%Y-%m-%d %H:%M:%S}"


@dataclass(frozen=True)
class UsageRecord:
    """One counted usage event, as the ledger holds it."""

    time: datetime  # event time: decides the cycle and the plan it is rated under
    meter: str
    quantity: Decimal
    ingested_at: datetime  # arrival: decides which invoice first sees it
    unique_value: str | None = None  # the counted dimension of a unique_count meter


@dataclass(frozen=True)
class Line:
    """One invoice line. `meter` is None for lines not about one meter (fees, credits)."""

    kind: LineKind
    description: str
    meter: str | None
    quantity: Decimal
    unit_amount_cents: Decimal | None
    amount_cents: int
    currency: str


@dataclass(frozen=True)
class PlanSlice:
    """The part [start, end) of a cycle during which one plan was in force."""

    plan_id: str
    start: datetime
    end: datetime


@dataclass(frozen=True)
class CycleUsage:
    """A cycle's usage rated at one cutoff: its lines, and per (currency, meter) the summed
    quantity and amount of its usage lines, per currency its minimum top-up."""

    lines: tuple[Line, ...]
    amounts: dict[tuple[str, str], tuple[Decimal, int]]
    minimums: dict[str, int]


def plan_slices(subscription: Subscription, cycle: Cycle) -> tuple[PlanSlice, ...]:
    """The plans in force over the part of `cycle` inside the subscription, in order."""
    end = cycle.end if subscription.end is None else min(cycle.end, subscription.end)
    starts = sorted({cycle.start, *(t for t in subscription.plan_changes()
                                    if cycle.start < t < end)})
    bounds = [*starts, end]
    return tuple(PlanSlice(subscription.plan_at(a), a, b) for a, b in zip(starts, bounds[1:],
                                                                          strict=True))


def allowance(included: Decimal, slice_seconds: int, cycle_seconds: int) -> Decimal:
    """A slice's share of a monthly allowance, rounded down to whole units."""
    with localcontext(_DECIMAL):
        return (included * slice_seconds / cycle_seconds).to_integral_value(rounding=ROUND_FLOOR)


def lateness_seconds(catalog: Catalog, plan_ids: Sequence[str]) -> int:
    """The largest lateness window of the meters of these plans (0 without meters)."""
    return max((catalog.meters[m].lateness_seconds for p in plan_ids
                for m in catalog.plans[p].meters), default=0)


def rate_cycle_usage(
    subscription: Subscription, cycle: Cycle, catalog: Catalog,
    usage: Sequence[UsageRecord], cutoff: datetime,
) -> CycleUsage:
    """The usage lines (one per slice and billed meter) and minimum top-ups of `cycle`,
    counting the `usage` records of the cycle ingested at or before `cutoff`.

    A meter is billed on a plan when it has an overage price and a finite `included`; it gets
    a line even when nothing is over (the line shows usage against the allowance). Usage of
    a meter the slice's plan does not define raises RatingError, as in rating.
    """
    slices = plan_slices(subscription, cycle)
    lines: list[Line] = []
    amounts: dict[tuple[str, str], tuple[Decimal, int]] = {}
    minimum_exact: dict[str, Decimal] = defaultdict(Decimal)
    usage_total: dict[str, int] = defaultdict(int)
    has_minimum: set[str] = set()
    seen = sorted((r for r in usage if r.ingested_at <= cutoff),
                  key=lambda r: (r.time, r.ingested_at))
    for part in slices:
        plan = catalog.plans[part.plan_id]
        seconds = seconds_between(part.start, part.end)
        used = _aggregate(catalog, [r for r in seen if part.start <= r.time < part.end])
        unknown = sorted(set(used) - set(plan.meters))
        if unknown:
            raise RatingError(f"{subscription.subscription_id}: usage of {unknown} is not on "
                              f"plan {part.plan_id!r}")
        for meter, terms in sorted(plan.meters.items()):
            if terms.overage is None or terms.included is None:
                continue  # never billed, or unlimited
            quantity = used.get(meter, Decimal(0))
            allowed = allowance(terms.included, seconds, cycle.seconds)
            over = max(Decimal(0), quantity - allowed)
            charge = overage_charge(terms.overage, over)
            amount = round_line(charge.exact_cents)
            lines.append(Line(
                kind="usage", meter=meter, quantity=charge.quantity,
                unit_amount_cents=charge.unit_amount_cents, amount_cents=amount,
                currency=plan.currency,
                description=(f"{meter} on {plan.name}, {when(part.start)} to {when(part.end)}: "
                             f"{quantity} used, {allowed} included, {over} over{charge.detail}"),
            ))
            key = (plan.currency, meter)
            before = amounts.get(key, (Decimal(0), 0))
            amounts[key] = (before[0] + quantity, before[1] + amount)
            usage_total[plan.currency] += amount
        if plan.minimum_cents is not None:
            has_minimum.add(plan.currency)
            minimum_exact[plan.currency] += prorate(plan.minimum_cents, seconds, cycle.seconds)
    minimums: dict[str, int] = {}
    for currency in sorted(has_minimum):
        minimum = round_line(minimum_exact[currency])
        top_up = max(0, minimum - usage_total[currency])
        minimums[currency] = top_up
        if top_up:
            lines.append(Line(
                kind="minimum", meter=None, quantity=Decimal(1),
                unit_amount_cents=Decimal(top_up), amount_cents=top_up, currency=currency,
                description=f"Top-up to the cycle's minimum usage charge of {minimum}c",
            ))
    return CycleUsage(tuple(lines), amounts, minimums)


def usage_adjustments(before: CycleUsage, after: CycleUsage, cycle: Cycle) -> tuple[Line, ...]:
    """What late usage adds to `cycle`: per currency and meter, the amount rated now minus the
    amount billed before (lines only where it is not zero), then the minimums' difference."""
    label = f"{when(cycle.start)} to {when(cycle.end)}"
    lines = []
    for currency, meter in sorted(after.amounts.keys() | before.amounts.keys()):
        old_quantity, old_amount = before.amounts.get((currency, meter), (Decimal(0), 0))
        new_quantity, new_amount = after.amounts.get((currency, meter), (Decimal(0), 0))
        if new_amount != old_amount:
            late = new_quantity - old_quantity
            lines.append(Line(
                kind="usage_adjustment", meter=meter, quantity=late, unit_amount_cents=None,
                amount_cents=new_amount - old_amount, currency=currency,
                description=f"Usage adjustment for cycle {label}: {meter}, {late} late",
            ))
    for currency in sorted(after.minimums.keys() | before.minimums.keys()):
        change = after.minimums.get(currency, 0) - before.minimums.get(currency, 0)
        if change:
            lines.append(Line(
                kind="minimum_adjustment", meter=None, quantity=Decimal(1),
                unit_amount_cents=Decimal(change), amount_cents=change, currency=currency,
                description=f"Minimum top-up adjustment for cycle {label}",
            ))
    return tuple(lines)


def _aggregate(catalog: Catalog, records: Sequence[UsageRecord]) -> dict[str, Decimal]:
    """Each meter's records folded by its aggregation kind (domain.aggregation's rules)."""
    counters: dict[str, Counter] = {}
    for record in records:
        spec = catalog.meters.get(record.meter)
        if spec is None:
            raise RatingError(f"meter {record.meter!r} is not in the catalog")
        counter = counters.get(record.meter)
        if counter is None:
            counter = counters[record.meter] = Counter(
                tenant_id="", meter=record.meter, period_start=record.time,
                period_end=record.time, aggregation=spec.aggregation)
        counter.fold(record.quantity, record.unique_value, record.time)
    return {meter: counter.value for meter, counter in counters.items()}
