"""A tenant's usage per cycle with what it costs, rated by the billing model of `domain/`.

Each meter's quantity, allowance, hard limit and quota state come from the read models;
the amount of a billed meter (finite `included`, an `overage` price) is the pricing of
`domain.rating.overage_charge` on the part above the allowance, rounded once per line as
on invoices (`domain.usage_charges.round_line`).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import Decimal

from api import models, queries
from api.tenant_plan import tenant_plan
from domain import quota
from domain.aggregation import Counter
from domain.cycles import cycle_containing
from domain.errors import DomainError
from domain.periods import Period
from domain.rating import overage_charge
from domain.subscriptions import derive_subscriptions
from domain.usage_charges import UsageRecord, rate_cycle_usage, round_line
from runtime.postgres import AsyncConnection
from schemas.plans import Catalog

BASIS = "the worker's period and the plan in force, overage priced by domain.rating"
BILLING_BASIS = ("the billing model's cycle (domain.usage_charges.rate_cycle_usage): the "
                 "usage lines the cycle's invoice would carry, rated on what is counted now")


def _cycle(catalog: Catalog, tenant: str, plan_id: str, period: Period,
           used: dict[str, Decimal]) -> models.UsageCycle:
    plan = catalog.plans[plan_id]
    meters = []
    total: int | None = None
    for meter in sorted(set(plan.meters) | set(used)):
        spec = catalog.meters.get(meter)
        terms = plan.meters.get(meter)
        quantity = used.get(meter, Decimal(0))
        amount: int | None = None
        if terms is not None and terms.overage is not None and terms.included is not None:
            over = max(Decimal(0), quantity - terms.included)
            amount = round_line(overage_charge(terms.overage, over).exact_cents)
            total = (total or 0) + amount
        meters.append(models.MeterUsage(
            meter=meter, unit=spec.unit if spec else "unit",
            aggregation=spec.aggregation if spec else "sum", used=quantity,
            included=terms.included if terms else None,
            hard_limit=terms.hard_limit if terms else None,
            remaining=quota.remaining(quantity, terms), state=quota.status(quantity, terms),
            amount_cents=amount))
    return models.UsageCycle(tenant=tenant, plan_id=plan_id, currency=plan.currency,
                             period_start=period.start, period_end=period.end, meters=meters,
                             charges_cents=total, charges_basis=BASIS)


async def billing_cycle(conn: AsyncConnection, catalog: Catalog, tenant: str, now: datetime
                        ) -> models.UsageCycle | None:
    """The cycle containing `now` as invoicing sees it (docs/billing.md): the live
    subscription Tally invoices, derived from the tenant's whole subscription history, its
    monthly cycle from the anchor, and the cycle's usage lines and minimum top-up rated by
    `rate_cycle_usage` with `now` as the cutoff: what the cycle's invoice would carry were
    nothing more counted. None without such a subscription (none, Stripe bills it, or in
    its trial) or when the history cannot be billed (the invoice job reports that)."""
    try:
        subscriptions = derive_subscriptions(
            tenant, await queries.subscription_history(conn, tenant, now), catalog)
    except DomainError:
        return None
    live = next((s for s in subscriptions if s.invoiced_by_tally and s.anchor <= now
                 and (s.end is None or now < s.end)), None)
    if live is None:
        return None
    cycle = cycle_containing(live.anchor, now)
    usage = await queries.usage_records(conn, tenant, now, cycle.start)
    try:
        rated = rate_cycle_usage(live, cycle, catalog, usage, cutoff=now)
    except DomainError:
        return None
    plan_id = live.plan_at(now)
    plan = catalog.plans[plan_id]
    used = _fold(catalog, [r for r in usage if cycle.start <= r.time < cycle.end])
    amounts: dict[str, int] = defaultdict(int)
    for (_, meter), (_, amount) in rated.amounts.items():
        amounts[meter] += amount
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
    return models.UsageCycle(
        tenant=tenant, plan_id=plan_id, currency=plan.currency, period_start=cycle.start,
        period_end=cycle.end, meters=meters,
        charges_cents=sum(line.amount_cents for line in rated.lines),
        charges_basis=BILLING_BASIS)


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
                        ) -> models.UsageCycle:
    """The cycle containing `now`, rated so far: the billing model's cycle when the tenant
    has a subscription Tally invoices, else the worker's period."""
    billed = await billing_cycle(conn, catalog, tenant, now)
    if billed is not None:
        return billed
    standing = await tenant_plan(conn, catalog, tenant, now)
    used = {row.meter: row.quantity for row in await queries.usage_at(conn, tenant, now)
            if row.period_start == standing.period.start}
    return _cycle(catalog, tenant, standing.plan_id, standing.period, used)


async def past_cycles(conn: AsyncConnection, catalog: Catalog, tenant: str, now: datetime,
                      count: int) -> list[models.UsageCycle]:
    """The `count` cycles before the current one, newest first."""
    current = await tenant_plan(conn, catalog, tenant, now)
    by_period: dict[tuple[datetime, datetime], dict[str, Decimal]] = defaultdict(dict)
    plans: dict[tuple[datetime, datetime], str] = {}
    for row in await queries.usage_periods(conn, tenant, current.period.start, count):
        key = (row.period_start, row.period_end)
        by_period[key][row.meter] = row.quantity
        plans[key] = catalog.plan(row.plan_id)[0]
    return [_cycle(catalog, tenant, plans[key], Period(*key), used)
            for key, used in sorted(by_period.items(), reverse=True)]
