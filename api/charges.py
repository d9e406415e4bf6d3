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
from domain.periods import Period
from domain.rating import overage_charge
from domain.usage_charges import round_line
from runtime.postgres import AsyncConnection
from schemas.plans import Catalog

BASIS = "the worker's period and the plan in force, overage priced by domain.rating"


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


async def current_cycle(conn: AsyncConnection, catalog: Catalog, tenant: str, now: datetime
                        ) -> models.UsageCycle:
    """The cycle containing `now`, rated so far."""
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
