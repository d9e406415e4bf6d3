"""Invoices from subscriptions (pure): every invoice a tenant is due at an instant.

The rules are docs/billing.md. For each subscription Tally invoices (no Stripe subscription
id) with paid time (not ended inside its trial):

- an *opening* invoice at the anchor: the first fee interval's fee, in advance;
- at the end of every monthly cycle, a *cycle* invoice (the last one, at the subscription's
  end, is the *final* invoice): the fee of the interval starting then (none after the end),
  the ended cycle's usage per plan slice, its minimum top-up, the credit and charge of each
  plan change inside it, the unused-fee credit at an end inside a fee interval, and usage
  adjustments for earlier cycles of the subscription;
- after the end, *adjustment* invoices for usage that arrives late, one per month at most,
  on the cycle dates the subscription would have had.

Lines are grouped by currency: one invoice per currency (rule 10). Coupons then discount the
tenant's opening, cycle and final invoices.

Idempotence: invoices are a function of (subscriptions, catalog, usage, coupons) and of
`now` only through *which* are due (`due_at <= now`): an invoice's content depends on the
usage ingested up to its own `due_at`, never on when the job runs. Ids are derived from the
subscription, the invoice's date, its kind and currency. So `invoices_due` run again with the
ids it returned yields nothing new, and a replay of the log yields the same invoices.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cached_property
from typing import Literal

from domain.cycles import (
    Cycle,
    cycle,
    cycle_start,
    fee_interval_containing,
    is_fee_boundary,
    seconds_between,
)
from domain.rating import Coupon, RatingError, interval_fee
from domain.subscriptions import Subscription
from domain.usage_charges import (
    Line,
    LineKind,
    UsageRecord,
    lateness_seconds,
    plan_slices,
    prorate,
    rate_cycle_usage,
    round_line,
    usage_adjustments,
    when,
)
from schemas.plans import Catalog, Plan

__all__ = [
    "CouponRedemption", "Invoice", "InvoiceKind", "Line", "LineKind", "UsageRecord",
    "invoice_id", "invoice_schedule", "invoices_due",
]

InvoiceKind = Literal["opening", "cycle", "final", "adjustment"]
_REGULAR: tuple[InvoiceKind, ...] = ("opening", "cycle", "final")  # coupons discount these


@dataclass(frozen=True)
class CouponRedemption:
    """A coupon applied to a tenant at `redeemed_at` (`tally coupons apply --tenant`)."""

    coupon: Coupon
    redeemed_at: datetime


@dataclass(frozen=True)
class Invoice:
    """One invoice: `total_cents` is the sum of its lines' amounts, always."""

    invoice_id: str
    tenant_id: str
    subscription_id: str
    kind: InvoiceKind
    issued_at: datetime  # the invoice's date: the anchor, a cycle's end, the subscription's end
    due_at: datetime  # when it may be issued: issued_at + the lateness window for usage
    period_start: datetime  # the fee interval (opening), the cycle (cycle, final), the
    period_end: datetime  # adjusted cycles' span (adjustment)
    currency: str
    lines: tuple[Line, ...]
    total_cents: int

    def __post_init__(self) -> None:
        if self.total_cents != sum(line.amount_cents for line in self.lines):
            raise ValueError("total_cents must be the sum of the lines")
        if any(line.currency != self.currency for line in self.lines):
            raise ValueError("every line must be in the invoice's currency")


def invoice_id(subscription_id: str, issued_at: datetime, kind: InvoiceKind,
               currency: str) -> str:
    """`<tenant>/<subscription start>/<invoice date>/<kind>/<currency>`: deterministic, and
    unique since a subscription has at most one invoice per date and currency."""
    return f"{subscription_id}/{issued_at:%Y%m%dT%H%M%SZ}/{kind}/{currency}"


def invoices_due(
    tenant_id: str,
    subscriptions: Sequence[Subscription],
    catalog: Catalog,
    usage: Iterable[UsageRecord],
    coupons: Iterable[CouponRedemption],
    issued: Collection[str],
    now: datetime,
) -> tuple[Invoice, ...]:
    """The invoices due at `now` that are not in `issued` (ids): what the invoice job issues.

    `subscriptions` are the tenant's (from `derive_subscriptions`); `usage` its counted usage
    events as known at `now` (ingested at or before it); `coupons` its redemptions.
    Raises a DomainError (RatingError) when the tenant cannot be priced.
    """
    schedule = invoice_schedule(tenant_id, subscriptions, catalog, usage, coupons, now)
    return tuple(invoice for invoice in schedule if invoice.invoice_id not in issued)


def invoice_schedule(
    tenant_id: str,
    subscriptions: Sequence[Subscription],
    catalog: Catalog,
    usage: Iterable[UsageRecord],
    coupons: Iterable[CouponRedemption],
    now: datetime,
) -> tuple[Invoice, ...]:
    """Every invoice of the tenant due at or before `now`, by date, subscription and kind."""
    records = sorted(usage, key=lambda r: (r.time, r.ingested_at))
    drafts: list[_Draft] = []
    for subscription in subscriptions:
        if subscription.tenant_id != tenant_id:
            raise RatingError(f"{subscription.subscription_id} is not tenant {tenant_id!r}'s")
        if subscription.invoiced_by_tally and subscription.paid:
            drafts += _Schedule(subscription, catalog, records, now).drafts()
    _apply_coupons(drafts, sorted(coupons, key=lambda c: c.redeemed_at))
    drafts.sort(key=lambda d: (d.issued_at, d.subscription.start, _ORDER[d.kind],
                               d.currency))
    return tuple(draft.freeze() for draft in drafts)


_ORDER: dict[InvoiceKind, int] = {"final": 0, "cycle": 1, "adjustment": 2, "opening": 3}


@dataclass
class _Draft:
    """An invoice being built: one subscription, date, kind and currency."""

    subscription: Subscription
    kind: InvoiceKind
    issued_at: datetime
    due_at: datetime
    period: Cycle
    currency: str
    lines: list[Line]

    def freeze(self) -> Invoice:
        sub = self.subscription
        return Invoice(
            invoice_id=invoice_id(sub.subscription_id, self.issued_at, self.kind, self.currency),
            tenant_id=sub.tenant_id, subscription_id=sub.subscription_id, kind=self.kind,
            issued_at=self.issued_at, due_at=self.due_at, period_start=self.period.start,
            period_end=self.period.end, currency=self.currency, lines=tuple(self.lines),
            total_cents=sum(line.amount_cents for line in self.lines),
        )


class _Schedule:
    """The invoices of one subscription due at or before `now`."""

    def __init__(self, subscription: Subscription, catalog: Catalog,
                 records: Sequence[UsageRecord], now: datetime) -> None:
        self.sub = subscription
        self.catalog = catalog
        self.now = now
        self.anchor = subscription.anchor
        end = subscription.end
        self.records = [r for r in records  # sorted by time
                        if r.time >= self.anchor and (end is None or r.time < end)]
        self.times = [r.time for r in self.records]

    def drafts(self) -> list[_Draft]:
        sub, anchor = self.sub, self.anchor
        if anchor > self.now:
            return []
        opening = self._fee_line(anchor)
        result = _by_currency(sub, "opening", anchor, anchor,
                              fee_interval_containing(anchor, sub.interval, anchor),
                              [opening], {opening.currency})
        billed: list[_Billed] = []
        cutoff = anchor
        index = 0
        while sub.end is None or cycle_start(anchor, index) < sub.end:
            current = cycle(anchor, index)
            ends_here = sub.end is not None and sub.end <= current.end
            date = current.end if sub.end is None or not ends_here else sub.end
            slices = plan_slices(sub, current)
            due = max(cutoff, date + timedelta(
                seconds=lateness_seconds(self.catalog, [s.plan_id for s in slices])))
            if due > self.now:
                return result
            records = self.records[bisect_left(self.times, current.start):
                                   bisect_left(self.times, current.end)]
            rated = rate_cycle_usage(sub, current, self.catalog, records, due)
            fee = ([self._fee_line(date)]
                   if not ends_here and is_fee_boundary(anchor, sub.interval, date) else [])
            lines = [*fee, *rated.lines, *self._credits(current, date, ends_here),
                     *self._adjustments(billed, cutoff, due)]
            currencies: set[str] = {self.catalog.plans[s.plan_id].currency for s in slices}
            currencies |= {line.currency for line in fee}
            billed_period = Cycle(current.index, current.start, date)
            result += _by_currency(sub, "final" if ends_here else "cycle", date, due,
                                   billed_period, lines, currencies)
            billed.append(_Billed(current, records))
            cutoff = due
            index += 1
        return result + self._late_adjustments(billed, cutoff, index)

    def _credits(self, current: Cycle, date: datetime, ends_here: bool) -> list[Line]:
        """The credit and charge of each plan change inside the cycle (not at a fee interval's
        start, whose fee already is the new plan's), then the unused fee at an end."""
        sub, lines = self.sub, []
        for moment in sub.plan_changes():
            if current.start <= moment < date and not is_fee_boundary(
                    self.anchor, sub.interval, moment):
                lines += [
                    self._share_line("proration_credit", sub.plan_before(moment), moment, -1,
                                     "Unused time"),
                    self._share_line("proration_charge", sub.plan_at(moment), moment, 1,
                                     "Remaining time"),
                ]
        if ends_here and not is_fee_boundary(self.anchor, sub.interval, date):
            lines.append(self._share_line("unused_fee_credit", sub.plan_before(date), date, -1,
                                          "Unused time"))
        return lines

    def _fee(self, plan: Plan) -> Decimal:
        return interval_fee(plan, self.sub.interval)

    def _fee_line(self, moment: datetime) -> Line:
        plan = self.catalog.plans[self.sub.plan_at(moment)]
        fee = self._fee(plan)
        period = fee_interval_containing(self.anchor, self.sub.interval, moment)
        return Line(
            kind="fee", meter=None, quantity=Decimal(1), unit_amount_cents=fee,
            amount_cents=round_line(fee), currency=plan.currency,
            description=(f"{plan.name} {self.sub.interval}ly fee, {when(period.start)} to "
                         f"{when(period.end)}"),
        )

    def _share_line(self, kind: LineKind, plan_id: str, moment: datetime, sign: int,
                    label: str) -> Line:
        """`sign` x the fee of `plan_id` for the rest of the fee interval after `moment`."""
        plan = self.catalog.plans[plan_id]
        fee = self._fee(plan)
        period = fee_interval_containing(self.anchor, self.sub.interval, moment)
        rest, whole = seconds_between(moment, period.end), period.seconds
        fraction = (Decimal(rest) / Decimal(whole)).quantize(Decimal("1e-12"))
        return Line(
            kind=kind, meter=None, quantity=fraction * sign, unit_amount_cents=fee,
            amount_cents=sign * round_line(prorate(fee, rest, whole)), currency=plan.currency,
            description=(f"{label} on {plan.name} after {when(moment)} "
                         f"({rest} of {whole} seconds of {when(period.start)} to "
                         f"{when(period.end)})"),
        )

    def _adjustments(self, billed: Sequence[_Billed], old_cutoff: datetime,
                     new_cutoff: datetime) -> list[Line]:
        """Usage adjustments for the billed cycles whose usage grew between the cutoffs."""
        lines: list[Line] = []
        for earlier in billed:
            if earlier.grew(old_cutoff, new_cutoff):
                before = rate_cycle_usage(self.sub, earlier.cycle, self.catalog,
                                          earlier.records, old_cutoff)
                after = rate_cycle_usage(self.sub, earlier.cycle, self.catalog,
                                         earlier.records, new_cutoff)
                lines += usage_adjustments(before, after, earlier.cycle)
        return lines

    def _late_adjustments(self, billed: Sequence[_Billed], cutoff: datetime,
                          index: int) -> list[_Draft]:
        """After the end: an adjustment invoice on each later cycle date with late usage."""
        sub = self.sub
        if not billed or sub.end is None:
            return []
        lateness = timedelta(seconds=lateness_seconds(
            self.catalog, [s.plan_id for s in plan_slices(sub, billed[-1].cycle)]))
        pending = sorted(r.ingested_at for b in billed for r in b.records
                         if r.ingested_at > cutoff)
        result: list[_Draft] = []
        while pending:
            date = cycle_start(self.anchor, index)
            index += 1
            due = max(cutoff, date + lateness)
            if date <= sub.end or pending[0] > due:
                continue
            if due > self.now:
                break
            grown = [b.cycle for b in billed if b.grew(cutoff, due)]
            period = Cycle(grown[0].index, grown[0].start, grown[-1].end)
            lines = self._adjustments(billed, cutoff, due)
            if lines:
                result += _by_currency(sub, "adjustment", date, due, period, lines, set())
            pending = [p for p in pending if p > due]
            cutoff = due
        return result


@dataclass(frozen=True)
class _Billed:
    """A cycle that has had its invoice, with its usage records (every ingestion time)."""

    cycle: Cycle
    records: Sequence[UsageRecord]

    def grew(self, old_cutoff: datetime, new_cutoff: datetime) -> bool:
        """Whether usage of the cycle was ingested between the two cutoffs."""
        if not self.records or self._last_ingested <= old_cutoff:
            return False
        return any(old_cutoff < r.ingested_at <= new_cutoff for r in self.records)

    @cached_property
    def _last_ingested(self) -> datetime:
        return max(r.ingested_at for r in self.records)


def _by_currency(sub: Subscription, kind: InvoiceKind, date: datetime, due: datetime,
                 period: Cycle, lines: Sequence[Line], currencies: set[str]) -> list[_Draft]:
    """One draft per currency (rule 10). `currencies` are those the invoice is due in even
    without lines (the cycle's plans and fee); lines of another currency (late usage of an
    earlier plan) make an adjustment invoice of their own on the same date."""
    grouped: dict[str, list[Line]] = defaultdict(list)
    for line in lines:
        grouped[line.currency].append(line)
    return [
        _Draft(sub, kind if currency in currencies else "adjustment", date, due, period,
               currency, grouped[currency])
        for currency in sorted(currencies | grouped.keys())
    ]


def _apply_coupons(drafts: Sequence[_Draft], redemptions: Sequence[CouponRedemption]) -> None:
    """Discount the regular invoices (opening, cycle, final) by the tenant's coupon (rule 9).

    The coupon in force on an invoice date is the one redeemed last at or before it. It
    applies to the invoices of the first date on or after its redemption (`once`), of the
    first N such dates (`repeating`, N = duration_in_months) or of every one (`forever`);
    invoices of one date (several currencies, an interval change) count as one. It discounts
    the invoice's subtotal, credits included, and only a positive one: percent off rounded
    half to even, an amount off capped at the subtotal and only in its own currency.
    """
    for redemption in redemptions:
        coupon = redemption.coupon
        if (coupon.valid_from and redemption.redeemed_at < coupon.valid_from) or (
                coupon.valid_until and redemption.redeemed_at >= coupon.valid_until):
            raise RatingError(f"coupon {coupon.code!r} was redeemed outside its validity window")
    dates = sorted({d.issued_at for d in drafts if d.kind in _REGULAR})
    for draft in drafts:
        if draft.kind not in _REGULAR:
            continue
        in_force = [r for r in redemptions if r.redeemed_at <= draft.issued_at]
        if not in_force:
            continue
        redemption = in_force[-1]
        coupon = redemption.coupon
        uses = sum(1 for d in dates if redemption.redeemed_at <= d < draft.issued_at)
        if coupon.duration == "once" and uses > 0:
            continue
        if coupon.duration == "repeating" and uses >= (coupon.duration_in_months or 0):
            continue
        subtotal = sum(line.amount_cents for line in draft.lines)
        if subtotal <= 0:
            continue
        if coupon.percent_off is not None:
            discount = round_line(prorate(Decimal(subtotal), coupon.percent_off, 100))
        elif coupon.currency == draft.currency and coupon.amount_off_cents is not None:
            discount = min(coupon.amount_off_cents, subtotal)
        else:
            continue
        if discount:
            off = (f"{coupon.percent_off}%" if coupon.percent_off is not None
                   else f"{coupon.amount_off_cents}c")
            draft.lines.append(Line(
                kind="discount", meter=None, quantity=Decimal(1),
                unit_amount_cents=Decimal(-discount), amount_cents=-discount,
                currency=draft.currency, description=f"Coupon {coupon.code}: {off} off",
            ))
