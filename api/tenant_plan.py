"""Which plan and which period a tenant is in now, as the worker decides them.

The worker places an event in its tenant's subscription period (the anniversary series of
the subscription's period) or, without a subscription, in the UTC calendar month
(`streams.processor.period_of`), and counts it under the plan in force. The API follows
the same rule over the projected `tally.subscriptions` row, and prefers what the worker
already wrote: when `usage_by_period` has a row of the meter containing `now`, its period
and plan are the worker's own decision. After a cancel takes effect the default plan
applies, as in the worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from api import queries
from domain.periods import Period, anniversary_period, calendar_month
from runtime.postgres import AsyncConnection
from schemas.plans import Catalog, Plan


@dataclass(frozen=True)
class TenantPlan:
    """A tenant's plan and period at one instant."""

    tenant_id: str
    plan_id: str
    plan: Plan
    period: Period
    subscription: queries.SubscriptionRow | None
    usage: tuple[queries.PeriodUsage, ...] = ()  # each meter's, in the period containing now


def period_of(subscription: queries.SubscriptionRow | None, now: datetime) -> Period:
    if subscription is None:
        return calendar_month(now)
    anchor = Period(subscription.current_period_start, subscription.current_period_end)
    return anniversary_period(anchor, now)


def plan_id_of(subscription: queries.SubscriptionRow | None, catalog: Catalog,
               now: datetime) -> str:
    if subscription is None or (subscription.status == "canceled"
                                and now >= subscription.current_period_end):
        return catalog.default_plan
    return catalog.plan(subscription.plan_id)[0]


async def tenant_plan(conn: AsyncConnection, catalog: Catalog, tenant: str, now: datetime,
                      meter: str | None = None) -> TenantPlan:
    """The plan and period of `tenant` at `now` (of `meter`'s row when the worker wrote
    one)."""
    subscription, usage = await queries.standing(conn, tenant, now)
    return plan_at(catalog, tenant, now, subscription, usage, meter)


def plan_at(catalog: Catalog, tenant: str, now: datetime,
            subscription: queries.SubscriptionRow | None,
            usage: Sequence[queries.PeriodUsage], meter: str | None = None) -> TenantPlan:
    """`tenant_plan` from the rows `queries.standing` read (the entitlement decision reads
    them in its own round trip)."""
    period = period_of(subscription, now)
    plan_id = plan_id_of(subscription, catalog, now)
    for row in usage:
        if meter is None or row.meter == meter:
            period = Period(row.period_start, row.period_end)
            plan_id = catalog.plan(row.plan_id)[0]
            break
    return TenantPlan(tenant, plan_id, catalog.plans[plan_id], period, subscription,
                      tuple(usage))
