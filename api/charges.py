"""A tenant's usage per cycle with what it costs, rated by the billing model of `domain/`.

A tenant with a subscription Tally invoices is rated as its invoices are (docs/billing.md:
plan slices, upgrades inside a cycle, trials, minimums): the current cycle by
`rate_cycle_usage` with `now` as the cutoff, each past cycle by its invoice's usage and
minimum lines (`invoice_schedule`, the invoice job's own computation, on the same
subscription history and ledger), or, for an ended cycle whose invoice is not due yet, by
`rate_cycle_usage` on what is counted now. A cycle's amounts are per currency, as it is one
invoice per currency (rule 10): a past cycle is one entry per currency, the current one has
the amounts of the currency in force now and one entry per other currency of the cycle;
amounts of two currencies are never added together.

Any other tenant (the default plan, a subscription Stripe bills) has no invoice from Tally:
each meter's quantity, allowance, hard limit and quota state come from the worker's
periods, and the amount of a billed meter (finite `included`, an `overage` price) is the
pricing of `domain.rating.overage_charge` on the part above the allowance, rounded once per
line as on invoices (`domain.usage_charges.round_line`).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from api import models, queries
from api.tenant_plan import tenant_plan
from domain import quota
from domain.aggregation import Counter
from domain.cycles import Cycle, cycle, cycle_containing
from domain.errors import DomainError
from domain.invoices import invoice_schedule
from domain.periods import Period
from domain.rating import overage_charge
from domain.subscriptions import Subscription, derive_subscriptions
from domain.usage_charges import (
    Line,
    PlanSlice,
    UsageRecord,
    plan_slices,
    rate_cycle_usage,
    round_line,
)
from runtime import read_models
from runtime.postgres import AsyncConnection
from runtime.read_models import fetch_async
from schemas.plans import Catalog

BASIS = "the worker's period and the plan in force, overage priced by domain.rating"
BILLING_BASIS = ("the billing model's cycle (domain.usage_charges.rate_cycle_usage): the "
                 "usage lines the cycle's invoice would carry, rated on what is counted now")
INVOICED_BASIS = ("the cycle's invoice (domain.invoices.invoice_schedule): its usage and "
                  "minimum lines")
USAGE_LINES = ("usage", "minimum")


def _cycle(catalog: Catalog, tenant: str, plan_id: str, period: Period,
           used: dict[str, Decimal]) -> models.UsageCycle:
    plan = catalog.plans[plan_id]
    amounts: dict[str, int] = {}
    for meter, terms in plan.meters.items():
        if terms.overage is not None and terms.included is not None:
            over = max(Decimal(0), used.get(meter, Decimal(0)) - terms.included)
            amounts[meter] = round_line(overage_charge(terms.overage, over).exact_cents)
    meters = _meters(catalog, plan_id, used, amounts)
    total = sum(amounts.values()) if amounts else None
    return models.UsageCycle(tenant=tenant, plan_id=plan_id, currency=plan.currency,
                             period_start=period.start, period_end=period.end, meters=meters,
                             charges_cents=total, charges_basis=BASIS)


def _meters(catalog: Catalog, plan_id: str, used: dict[str, Decimal],
            amounts: dict[str, int]) -> list[models.MeterUsage]:
    """Each meter of the plan or with usage: its usage against the plan's terms, and its
    charge (`amounts`; None: not billed)."""
    plan = catalog.plans[plan_id]
    meters = []
    for meter in sorted(set(plan.meters) | set(used)):
        spec = catalog.meters.get(meter)
        terms = plan.meters.get(meter)
        quantity = used.get(meter, Decimal(0))
        meters.append(models.MeterUsage(
            meter=meter, unit=spec.unit if spec else "unit",
            aggregation=spec.aggregation if spec else "sum", used=quantity,
            included=terms.included if terms else None,
            hard_limit=terms.hard_limit if terms else None,
            remaining=quota.remaining(quantity, terms), state=quota.status(quantity, terms),
            amount_cents=amounts.get(meter)))
    return meters


async def billing_cycle(conn: AsyncConnection, catalog: Catalog, tenant: str, now: datetime
                        ) -> models.CurrentUsage | None:
    """The cycle containing `now` as invoicing sees it (docs/billing.md): the live
    subscription Tally invoices, derived from the tenant's whole subscription history, its
    monthly cycle from the anchor, and the cycle's usage lines and minimum top-up rated by
    `rate_cycle_usage` with `now` as the cutoff: what the cycle's invoices would carry were
    nothing more counted. Amounts are those of the currency of the plan in force now; those
    of the cycle's other currencies (a plan change across currencies) are the entries of
    `other_currencies`, one per currency as their invoices (rule 10), never added in. None
    without such a subscription (none, Stripe bills it, or in its trial) or when the
    history cannot be billed (the invoice job reports that)."""
    subscriptions = await _subscriptions(conn, catalog, tenant, now)
    if subscriptions is None:
        return None
    live = next((s for s in subscriptions if s.invoiced_by_tally and s.anchor <= now
                 and (s.end is None or now < s.end)), None)
    if live is None:
        return None
    cycle = cycle_containing(live.anchor, now)
    usage = await fetch_async(conn, read_models.usage_records(
        tenant, now, UsageRecord, since=cycle.start))
    try:
        rated = rate_cycle_usage(live, cycle, catalog, usage, cutoff=now)
    except DomainError:
        return None
    plan_id = live.plan_at(now)
    plan = catalog.plans[plan_id]
    # Usage against allowance and hard limit is the whole cycle's, under the plan in force:
    # the worker counts a subscription period, not a plan slice (api.tenant_plan), so that
    # is what its quota sees; only the amounts are split by currency.
    in_cycle = [r for r in usage if cycle.start <= r.time < cycle.end]
    amounts: dict[str, int] = defaultdict(int)
    for (currency, meter), (_, amount) in rated.amounts.items():
        if currency == plan.currency:
            amounts[meter] += amount
    others = [entry for entry in _cycle_per_currency(
        catalog, tenant, plan_slices(live, cycle), cycle,
        [r for r in in_cycle if r.ingested_at <= now], list(rated.lines), BILLING_BASIS)
        if entry.currency != plan.currency]
    return models.CurrentUsage(
        tenant=tenant, plan_id=plan_id, currency=plan.currency, period_start=cycle.start,
        period_end=cycle.end, meters=_meters(catalog, plan_id, _fold(catalog, in_cycle),
                                             amounts),
        charges_cents=sum(line.amount_cents for line in rated.lines
                          if line.currency == plan.currency),
        charges_basis=BILLING_BASIS, other_currencies=others)


async def _subscriptions(conn: AsyncConnection, catalog: Catalog, tenant: str, now: datetime
                         ) -> tuple[Subscription, ...] | None:
    """The tenant's subscriptions as invoicing derives them; None when its history cannot
    be billed (the invoice job reports that)."""
    try:
        return derive_subscriptions(tenant, [e.event for e in await fetch_async(
            conn, read_models.subscription_history(tenant, known_at=now))], catalog)
    except DomainError:
        return None


def _ended_cycles(subscription: Subscription, now: datetime) -> list[tuple[Cycle, Cycle]]:
    """The subscription's cycles that ended by `now`: (the full cycle, as rated; the billed
    period, which a final cycle ends at the subscription's end)."""
    ended = []
    for index in itertools.count():
        full = cycle(subscription.anchor, index)
        end = subscription.end
        if end is not None and full.start >= end:
            break
        billed = full if end is None or end >= full.end else Cycle(full.index, full.start, end)
        if billed.end > now:
            break
        ended.append((full, billed))
    return ended


async def invoiced_past_cycles(conn: AsyncConnection, catalog: Catalog, tenant: str,
                               now: datetime, limit: int) -> list[models.UsageCycle] | None:
    """The `limit` cycles ended before `now`, newest first, rated exactly as their invoices
    are (module docstring), one entry per currency of a cycle (`_cycle_per_currency`); None
    without a subscription Tally invoices."""
    subscriptions = await _subscriptions(conn, catalog, tenant, now)
    billed = [s for s in subscriptions or () if s.invoiced_by_tally and s.paid]
    if subscriptions is None or not billed:
        return None
    usage = await fetch_async(conn, read_models.usage_records(tenant, now, UsageRecord))
    try:
        invoices = invoice_schedule(tenant, subscriptions, catalog, usage, [], now)
    except DomainError:
        return None
    ended = sorted(((s, full, period) for s in billed for full, period in _ended_cycles(s, now)),
                   key=lambda e: e[2].start, reverse=True)[:limit]
    result = []
    for sub, full, period in ended:
        records = [r for r in usage if period.start <= r.time < period.end]
        invoiced = [i for i in invoices if i.subscription_id == sub.subscription_id
                    and i.kind in ("cycle", "final") and i.period_start == full.start]
        if invoiced:
            lines = [line for i in invoiced for line in i.lines if line.kind in USAGE_LINES]
            cutoff, basis = invoiced[0].due_at, INVOICED_BASIS
        else:  # ended, its invoice not due yet: what it would carry were nothing more counted
            try:
                lines = list(rate_cycle_usage(sub, full, catalog, records, now).lines)
            except DomainError:
                return None
            cutoff, basis = now, BILLING_BASIS
        seen = [r for r in records if r.ingested_at <= cutoff]
        result += _cycle_per_currency(catalog, tenant, plan_slices(sub, full), period, seen,
                                      lines, basis)
    return result


def _cycle_per_currency(catalog: Catalog, tenant: str, slices: Sequence[PlanSlice],
                        period: Cycle, records: list[UsageRecord], lines: list[Line],
                        basis: str) -> list[models.UsageCycle]:
    """A rated cycle as one entry per currency of its plan slices, as it has one invoice per
    currency (docs/billing.md rule 10): each entry's plan is the last one in that currency,
    its usage that of the slices in that currency, its amounts those of its lines; never
    amounts of two currencies added together."""
    by_currency: dict[str, list[PlanSlice]] = defaultdict(list)
    for part in slices:
        by_currency[catalog.plans[part.plan_id].currency].append(part)
    entries = []
    for currency, parts in sorted(by_currency.items()):
        mine = [line for line in lines if line.currency == currency]
        amounts: dict[str, int] = defaultdict(int)
        for line in mine:
            if line.meter is not None:
                amounts[line.meter] += line.amount_cents
        plan_id = parts[-1].plan_id
        used = _fold(catalog, [r for r in records
                               if any(p.start <= r.time < p.end for p in parts)])
        entries.append(models.UsageCycle(
            tenant=tenant, plan_id=plan_id, currency=currency, period_start=period.start,
            period_end=period.end, meters=_meters(catalog, plan_id, used, amounts),
            charges_cents=sum(line.amount_cents for line in mine), charges_basis=basis))
    return entries


def _fold(catalog: Catalog, records: list[UsageRecord]) -> dict[str, Decimal]:
    counters: dict[str, Counter] = {}
    for r in records:
        spec = catalog.meters.get(r.meter)
        if spec is None:
            continue
        counter = counters.get(r.meter)
        if counter is None:
            counter = counters[r.meter] = Counter(tenant_id="", meter=r.meter,
                                                  period_start=r.time, period_end=r.time,
                                                  aggregation=spec.aggregation)
        counter.fold(r.quantity, r.unique_value, r.time)
    return {meter: c.value for meter, c in counters.items()}


async def current_cycle(conn: AsyncConnection, catalog: Catalog, tenant: str, now: datetime
                        ) -> models.CurrentUsage:
    """The cycle containing `now`, rated so far: the billing model's cycle when the tenant
    has a subscription Tally invoices, else the worker's period."""
    billed = await billing_cycle(conn, catalog, tenant, now)
    if billed is not None:
        return billed
    standing = await tenant_plan(conn, catalog, tenant, now)
    used = {row.meter: row.quantity for row in standing.usage
            if row.period_start == standing.period.start}
    return models.CurrentUsage(**dict(_cycle(catalog, tenant, standing.plan_id,
                                             standing.period, used)))


async def past_cycles(conn: AsyncConnection, catalog: Catalog, tenant: str, now: datetime,
                      count: int) -> list[models.UsageCycle]:
    """The `count` cycles before the current one, newest first: rated as their invoices
    when Tally invoices the tenant, else per the worker's stored periods."""
    invoiced = await invoiced_past_cycles(conn, catalog, tenant, now, count)
    if invoiced is not None:
        return invoiced
    current = await tenant_plan(conn, catalog, tenant, now)
    by_period: dict[tuple[datetime, datetime], dict[str, Decimal]] = defaultdict(dict)
    plans: dict[tuple[datetime, datetime], str] = {}
    for row in await queries.usage_periods(conn, tenant, current.period.start, count):
        key = (row.period_start, row.period_end)
        by_period[key][row.meter] = row.quantity
        plans[key] = catalog.plan(row.plan_id)[0]
    return [_cycle(catalog, tenant, plans[key], Period(*key), used)
            for key, used in sorted(by_period.items(), reverse=True)]
