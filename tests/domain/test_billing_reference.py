"""Random subscription histories, invoiced by `domain.invoices` and by a deliberately simple
reference written here from docs/billing.md, must agree to the cent.

The reference works hour by hour: every instant in these histories (creates, trials, plan
changes, cancels, usage, ingestion) is a whole hour, so the plan in force is constant within
an hour and brute force over hours is brute force over seconds with 3,600 of them at a time
(every ratio of seconds is the same ratio of hours). It derives the subscriptions from the
generated actions itself, walks every hour of every cycle to find the plan slices, and
prices with Fractions. Then:

- the invoices (date, kind, subscription, total and non-zero lines) are the same;
- every cycle of every subscription has exactly one cycle or final invoice;
- the invoice job stepped through time issues exactly those invoices, each once, and a
  second run at the last step issues nothing.
"""

from __future__ import annotations

import calendar
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.invoices import Invoice, UsageRecord, invoice_schedule, invoices_due
from domain.subscriptions import derive_subscriptions
from schemas.events import SubscriptionEvent
from schemas.plans import Graduated, Package, PerUnit, Plan, Pricing
from tests.domain.billing_helpers import CATALOG, TENANT, event, use

HOUR = timedelta(hours=1)
ORIGIN = datetime(2026, 1, 1, tzinfo=UTC)
PLANS = ["free", "starter", "pro", "enterprise"]
YEARLY_PLANS = ["starter", "pro", "enterprise"]
LATENESS = HOUR  # every meter of the seed catalog


# --- the reference ------------------------------------------------------------------------


def months_later(moment: datetime, months: int) -> datetime:
    """`moment` moved by calendar months, its day clamped to the month's length."""
    year, month0 = divmod(moment.month - 1 + months, 12)
    year += moment.year
    last = calendar.monthrange(year, month0 + 1)[1]
    return moment.replace(year=year, month=month0 + 1, day=min(moment.day, last))


def hours(start: datetime, end: datetime) -> list[datetime]:
    return [start + i * HOUR for i in range((end - start) // HOUR)]


def half_even(amount: Fraction) -> int:
    return round(amount)  # Fraction rounds half to even


def price(pricing: Pricing, over: int) -> Fraction:
    if isinstance(pricing, PerUnit):
        return over * Fraction(pricing.unit_amount_cents)
    if isinstance(pricing, Package):
        return math.ceil(Fraction(over) / Fraction(pricing.package_size)) * Fraction(
            pricing.package_amount_cents)
    assert isinstance(pricing, Graduated)
    total, lower = Fraction(0), 0
    for tier in pricing.tiers:
        upper = over if tier.up_to is None else min(over, int(tier.up_to))
        if upper > lower:
            total += (upper - lower) * Fraction(tier.unit_amount_cents)
        if tier.up_to is not None:
            lower = int(tier.up_to)
    return total


@dataclass
class RefSub:
    start: datetime
    anchor: datetime
    months: int  # 1 or 12
    plan: dict[datetime, str] = field(default_factory=dict)  # hour -> plan in force
    end: datetime | None = None

    def fee(self, plan_id: str) -> Fraction:
        plan = CATALOG.plans[plan_id]
        fee = plan.monthly_fee_cents if self.months == 1 else plan.yearly_fee_cents
        assert fee is not None
        return Fraction(fee)

    def fee_interval(self, moment: datetime) -> tuple[datetime, datetime]:
        j = 0
        while months_later(self.anchor, self.months * (j + 1)) <= moment:
            j += 1
        return months_later(self.anchor, self.months * j), months_later(self.anchor,
                                                                        self.months * (j + 1))

    def fee_boundary(self, moment: datetime) -> bool:
        return moment >= self.anchor and self.fee_interval(moment)[0] == moment


Line = tuple[str, str | None, int]


@dataclass
class RefInvoice:
    sub_start: datetime
    date: datetime
    kind: str
    lines: list[Line]


def rate(sub: RefSub, start: datetime, end: datetime, date: datetime,
         usage: list[UsageRecord], cutoff: datetime) -> list[Line]:
    """Usage lines of the cycle [start, end), billed up to `date`, seeing usage until cutoff."""
    cycle_hours = len(hours(start, end))
    slices: list[tuple[str, list[datetime]]] = []
    for hour in hours(start, date):
        if slices and slices[-1][0] == sub.plan[hour]:
            slices[-1][1].append(hour)
        else:
            slices.append((sub.plan[hour], [hour]))
    lines: list[Line] = []
    for plan_id, slice_hours in slices:
        plan: Plan = CATALOG.plans[plan_id]
        for meter, terms in sorted(plan.meters.items()):
            if terms.overage is None or terms.included is None:
                continue
            allowance = int(terms.included) * len(slice_hours) // cycle_hours
            used = sum(int(r.quantity) for r in usage if r.meter == meter
                       and r.ingested_at <= cutoff and slice_hours[0] <= r.time <= slice_hours[-1])
            over = max(0, used - allowance)
            lines.append(("usage", meter, half_even(price(terms.overage, over))))
    return lines


def per_meter(lines: list[Line]) -> Counter[str | None]:
    totals: Counter[str | None] = Counter()
    for _, meter, amount in lines:
        totals[meter] += amount
    return totals


def reference_invoices(subs: list[RefSub], usage: list[UsageRecord],
                       now: datetime) -> list[RefInvoice]:
    out: list[RefInvoice] = []
    for sub in subs:
        if (sub.end is not None and sub.end <= sub.anchor) or sub.anchor > now:
            continue
        out.append(RefInvoice(sub.start, sub.anchor, "opening",
                              [("fee", None, half_even(sub.fee(sub.plan[sub.anchor])))]))
        billed: list[tuple[datetime, datetime, datetime]] = []
        cutoff, k = sub.anchor, 0
        while sub.end is None or months_later(sub.anchor, k) < sub.end:
            start, end = months_later(sub.anchor, k), months_later(sub.anchor, k + 1)
            ends_here = sub.end is not None and sub.end <= end
            date = sub.end if ends_here and sub.end is not None else end
            due = max(cutoff, date + LATENESS)
            if due > now:
                break
            lines: list[Line] = []
            if not ends_here and sub.fee_boundary(end):
                lines.append(("fee", None, half_even(sub.fee(sub.plan[end]))))
            lines += rate(sub, start, end, date, usage, due)
            for hour in hours(start, date):
                if hour > sub.start and sub.plan[hour] != sub.plan[hour - HOUR] \
                        and not sub.fee_boundary(hour):
                    fs, fe = sub.fee_interval(hour)
                    share = Fraction((fe - hour) // HOUR, (fe - fs) // HOUR)
                    lines.append(("proration_credit", None,
                                  -half_even(sub.fee(sub.plan[hour - HOUR]) * share)))
                    lines.append(("proration_charge", None,
                                  half_even(sub.fee(sub.plan[hour]) * share)))
            if ends_here and not sub.fee_boundary(date):
                fs, fe = sub.fee_interval(date)
                share = Fraction((fe - date) // HOUR, (fe - fs) // HOUR)
                lines.append(("unused_fee_credit", None,
                              -half_even(sub.fee(sub.plan[date - HOUR]) * share)))
            lines += adjustments(sub, billed, usage, cutoff, due)
            out.append(RefInvoice(sub.start, date, "final" if ends_here else "cycle", lines))
            billed.append((start, end, date))
            cutoff, k = due, k + 1
        else:
            assert sub.end is not None  # ended: late usage gets invoices of its own
            while True:
                date = months_later(sub.anchor, k)
                k += 1
                due = max(cutoff, date + LATENESS)
                if date <= sub.end:
                    continue
                if due > now:
                    break
                lines = adjustments(sub, billed, usage, cutoff, due)
                if lines:
                    out.append(RefInvoice(sub.start, date, "adjustment", lines))
                cutoff = due
    return out


def adjustments(sub: RefSub, billed: list[tuple[datetime, datetime, datetime]],
                usage: list[UsageRecord], old: datetime, new: datetime) -> list[Line]:
    lines: list[Line] = []
    for start, end, date in billed:
        before = per_meter(rate(sub, start, end, date, usage, old))
        after = per_meter(rate(sub, start, end, date, usage, new))
        lines += [("usage_adjustment", m, after[m] - before[m])
                  for m in sorted(after, key=str) if after[m] != before[m]]
    return lines


# --- random histories ---------------------------------------------------------------------


@dataclass
class History:
    events: list[SubscriptionEvent]
    subs: list[RefSub]
    usage: list[UsageRecord]
    now: datetime


@st.composite
def histories(draw: st.DrawFn) -> History:
    start = ORIGIN + draw(st.integers(0, 30 * 24)) * HOUR
    horizon_days = draw(st.one_of(st.integers(20, 200), st.integers(360, 420)))
    now = start + horizon_days * 24 * HOUR + draw(st.integers(0, 3)) * HOUR
    offsets = sorted(draw(st.lists(st.integers(1, horizon_days * 24), max_size=5, unique=True)))
    events: list[SubscriptionEvent] = []
    subs: list[RefSub] = []
    changes: list[list[tuple[datetime, str]]] = []

    def live(at: datetime) -> RefSub | None:
        if subs and (subs[-1].end is None or at < subs[-1].end):
            return subs[-1]
        return None

    def create(at: datetime, plan: str, months: int, trial_days: int) -> None:
        trial_end = at + trial_days * 24 * HOUR if trial_days else None
        events.append(event("created", at, plan, months=months, trial_end=trial_end))
        subs.append(RefSub(at, at + trial_days * 24 * HOUR, months))
        changes.append([(at, plan)])

    months = draw(st.sampled_from([1, 1, 1, 12]))
    create(start, draw(st.sampled_from(YEARLY_PLANS if months == 12 else PLANS)), months,
           draw(st.sampled_from([0, 0, 0, 3, 14])))
    for offset in offsets:
        at = start + offset * HOUR
        sub = live(at)
        action = draw(st.sampled_from(["change", "change", "cancel", "cancel_at_end",
                                       "interval", "create"]))
        current = changes[-1][-1][1] if changes else "free"
        if sub is None:
            if action == "create":
                months = draw(st.sampled_from([1, 12]))
                create(at, draw(st.sampled_from(YEARLY_PLANS if months == 12 else PLANS)),
                       months, draw(st.sampled_from([0, 3])))
        elif action == "change":
            plan = draw(st.sampled_from([p for p in (YEARLY_PLANS if sub.months == 12 else PLANS)
                                         if p != current]))
            events.append(event("plan_changed", at, plan, months=sub.months))
            changes[-1].append((at, plan))
        elif action == "cancel":
            events.append(event("canceled", at, current))
            sub.end = at
        elif action == "cancel_at_end" and sub.end is None:
            end = sub.anchor if at < sub.anchor else sub.fee_interval(at)[1]
            events.append(event("canceled", at, current, at, end, cancel_at_period_end=True))
            sub.end = end
        elif action == "interval":
            months = 13 - sub.months
            plan = draw(st.sampled_from(YEARLY_PLANS if months == 12 else PLANS))
            events.append(event("plan_changed", at, plan, months=months))
            if at == sub.start:
                sub.months = months
                changes[-1] = [(at, plan)]
            else:
                sub.end = at
                subs.append(RefSub(at, max(at, sub.anchor), months))
                changes.append([(at, plan)])
    for sub, spans in zip(subs, changes, strict=True):
        stop = sub.end if sub.end is not None else now + 400 * 24 * HOUR
        for hour in hours(sub.start, stop):
            sub.plan[hour] = [plan for at, plan in spans if at <= hour][-1]

    usage = [
        use(start + h * HOUR, meter, quantity, start + (h + delay) * HOUR)
        for h, meter, quantity, delay in draw(st.lists(st.tuples(
            st.integers(0, horizon_days * 24), st.sampled_from(["api_calls", "executions"]),
            st.integers(0, 60).map(lambda q: q * 1000),
            st.one_of(st.just(0), st.just(0), st.integers(1, 1500)),
        ), max_size=12))
    ]
    return History(events, subs, usage, now)


# --- the properties -----------------------------------------------------------------------


def summary(invoice: Invoice | RefInvoice) -> tuple[object, ...]:
    if isinstance(invoice, Invoice):
        start = datetime.strptime(invoice.subscription_id.split("/")[1],
                                  "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        found = [(ln.kind, ln.meter, ln.amount_cents) for ln in invoice.lines if ln.amount_cents]
        return (start, invoice.issued_at, invoice.kind, sorted(found, key=str),
                invoice.total_cents)
    expected = [line for line in invoice.lines if line[2]]
    return (invoice.sub_start, invoice.date, invoice.kind, sorted(expected, key=str),
            sum(line[2] for line in invoice.lines))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories(), steps=st.lists(st.integers(0, 420 * 24), max_size=6))
def test_invoices_equal_the_hour_by_hour_reference(history: History, steps: list[int]) -> None:
    now = history.now
    usage = [r for r in history.usage if r.ingested_at <= now]
    subscriptions = derive_subscriptions(TENANT, history.events, CATALOG)
    invoices = invoice_schedule(TENANT, subscriptions, CATALOG, usage, [], now)
    expected = reference_invoices(history.subs, usage, now)

    assert sorted(map(summary, invoices), key=str) == sorted(map(summary, expected), key=str)

    # Every due cycle of every subscription has exactly one cycle or final invoice.
    billed_cycles = Counter((i.subscription_id, i.period_start) for i in invoices
                            if i.kind in ("cycle", "final"))
    assert set(billed_cycles.values()) <= {1}
    assert len(billed_cycles) == sum(1 for i in expected if i.kind in ("cycle", "final"))

    # The job, run at random instants and then at `now`, issues each invoice once.
    issued: dict[str, Invoice] = {}
    start = history.events[0].time
    for step in sorted({*(start + h * HOUR for h in steps if start + h * HOUR < now), now}):
        known_events = [e for e in history.events if e.time <= step]
        known_usage = [r for r in history.usage if r.ingested_at <= step]
        subs = derive_subscriptions(TENANT, known_events, CATALOG)
        for invoice in invoices_due(TENANT, subs, CATALOG, known_usage, [], issued.keys(), step):
            assert invoice.invoice_id not in issued
            issued[invoice.invoice_id] = invoice
    assert sorted(issued.values(), key=lambda i: i.invoice_id) == sorted(
        invoices, key=lambda i: i.invoice_id)
    assert invoices_due(TENANT, subscriptions, CATALOG, usage, [], issued.keys(), now) == ()
