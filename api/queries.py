"""The API's reads of the Postgres read models (and `tally report`'s: the same figures).

Every statement that reads a table for the API is here, except the meter query, which
builds its statement from the aggregation kinds (`api.meter_query`), the entitlement
reservations, which `api.entitlements` owns, and the reads the invoice job makes too (a
tenant's subscription history, its ledger rows for billing, the invoices), which are
`runtime.read_models`, shared by both. The tables are written by the projector
(ledger, rollups, subscriptions, quota states) and the billing jobs (invoices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, LiteralString, TypeVar

from psycopg.abc import Params
from psycopg.rows import class_row

from runtime.postgres import AsyncConnection

R = TypeVar("R")


async def rows(conn: AsyncConnection, row_type: type[R], query: LiteralString,
               params: Params | None = None) -> list[R]:
    """Every row of `query` as a `row_type` built from its columns by name."""
    async with conn.cursor(row_factory=class_row(row_type)) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


async def value(conn: AsyncConnection, query: LiteralString, params: Params | None = None
                ) -> Any:
    """The first column of the first row; None without a row."""
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    return None if row is None else row[0]


# --- tenants and subscriptions ---------------------------------------------------------


async def tenant_known(conn: AsyncConnection, tenant: str) -> bool:
    """Whether the pipeline has heard of `tenant`: a subscription, counted usage, or a use
    the API allowed that is not counted yet."""
    return bool(await value(
        conn,
        "SELECT EXISTS (SELECT 1 FROM tally.subscriptions WHERE tenant_id = %(t)s)"
        " OR EXISTS (SELECT 1 FROM tally.subscription_events WHERE tenant_id = %(t)s)"
        " OR EXISTS (SELECT 1 FROM tally.usage_by_period WHERE tenant_id = %(t)s)"
        " OR EXISTS (SELECT 1 FROM tally.entitlement_reservations WHERE tenant_id = %(t)s)",
        {"t": tenant}))


@dataclass(frozen=True)
class SubscriptionRow:
    """The current view of a tenant's subscription (`tally.subscriptions`)."""

    tenant_id: str
    plan_id: str
    status: str
    current_period_start: datetime
    current_period_end: datetime
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    updated_at: datetime


# Named parameters (t: the tenant; at: the instant): the entitlement decision sends these
# in one text with its other statements (api.entitlements).
SUBSCRIPTION_SQL: LiteralString = (
    "SELECT tenant_id, plan_id, status, current_period_start, current_period_end,"
    " stripe_customer_id, stripe_subscription_id, updated_at"
    " FROM tally.subscriptions WHERE tenant_id = %(t)s")


async def subscription(conn: AsyncConnection, tenant: str) -> SubscriptionRow | None:
    found = await rows(conn, SubscriptionRow, SUBSCRIPTION_SQL, {"t": tenant})
    return found[0] if found else None


# --- usage by period, quota states -----------------------------------------------------


@dataclass(frozen=True)
class PeriodUsage:
    """A tenant's usage of one meter in one period (`usage_by_period`)."""

    tenant_id: str
    meter: str
    period_start: datetime
    period_end: datetime
    plan_id: str
    quantity: Decimal
    event_count: int


USAGE_AT_SQL: LiteralString = (
    "SELECT tenant_id, meter, period_start, period_end, plan_id, quantity, event_count"
    " FROM tally.usage_by_period WHERE tenant_id = %(t)s"
    " AND period_start <= %(at)s AND %(at)s < period_end ORDER BY meter")


async def usage_at(conn: AsyncConnection, tenant: str, at: datetime) -> list[PeriodUsage]:
    """Each meter's usage in the worker's period that contains `at`."""
    return await rows(conn, PeriodUsage, USAGE_AT_SQL, {"t": tenant, "at": at})


async def standing(conn: AsyncConnection, tenant: str, at: datetime
                   ) -> tuple[SubscriptionRow | None, list[PeriodUsage]]:
    """`subscription` and `usage_at` together: both statements are sent before either
    answer is read, so in pipeline mode (an entitlement check) they cost one round trip
    together."""
    async with conn.cursor(row_factory=class_row(SubscriptionRow)) as subs, \
            conn.cursor(row_factory=class_row(PeriodUsage)) as usage:
        await subs.execute(SUBSCRIPTION_SQL, {"t": tenant})
        await usage.execute(USAGE_AT_SQL, {"t": tenant, "at": at})
        found = await subs.fetchall()
        return (found[0] if found else None), await usage.fetchall()


async def usage_periods(conn: AsyncConnection, tenant: str, before: datetime, periods: int
                        ) -> list[PeriodUsage]:
    """The tenant's usage in its last `periods` periods that started before `before`."""
    return await rows(
        conn, PeriodUsage,
        "WITH starts AS (SELECT DISTINCT period_start FROM tally.usage_by_period"
        "  WHERE tenant_id = %(t)s AND period_start < %(b)s"
        "  ORDER BY period_start DESC LIMIT %(n)s)"
        " SELECT tenant_id, meter, period_start, period_end, plan_id, quantity, event_count"
        " FROM tally.usage_by_period WHERE tenant_id = %(t)s"
        " AND period_start IN (SELECT period_start FROM starts)"
        " ORDER BY period_start DESC, meter", {"t": tenant, "b": before, "n": periods})


@dataclass(frozen=True)
class QuotaRow:
    """The worker's latest quota state of a tenant and meter (`quota_state`)."""

    tenant_id: str
    meter: str
    period_start: datetime
    used: Decimal
    limit: Decimal | None
    state: str
    updated_at: datetime


async def quota_states(conn: AsyncConnection, tenants: Sequence[str] | None = None
                       ) -> list[QuotaRow]:
    """Quota states of these tenants (None: every tenant), by tenant and meter."""
    return await rows(
        conn, QuotaRow,
        'SELECT tenant_id, meter, period_start, used, "limit", state, updated_at'
        " FROM tally.quota_state WHERE %(all)s OR tenant_id = ANY(%(t)s)"
        " ORDER BY tenant_id, meter", {"all": tenants is None, "t": list(tenants or ())})


# --- admin -----------------------------------------------------------------------------

TenantSort = Literal["tenant", "usage_ratio", "events", "plan"]


@dataclass(frozen=True)
class TenantUsage:
    """One tenant's heaviest meter in the period containing `at`, for the admin list."""

    tenant_id: str
    plan_id: str | None
    status: str | None
    meters: int
    events: int
    worst_meter: str | None
    worst_used: Decimal | None
    worst_limit: Decimal | None
    usage_ratio: Decimal | None  # used / limit of the worst meter; None: no limit
    blocked: int
    total: int  # every tenant that matched, for paging


_TENANT_ORDER: dict[tuple[TenantSort, bool], LiteralString] = {
    ("tenant", False): "tenant_id",
    ("tenant", True): "tenant_id DESC",
    ("usage_ratio", False): "usage_ratio NULLS FIRST, tenant_id",
    ("usage_ratio", True): "usage_ratio DESC NULLS LAST, tenant_id",
    ("events", False): "events, tenant_id",
    ("events", True): "events DESC, tenant_id",
    ("plan", False): "plan_id NULLS FIRST, tenant_id",
    ("plan", True): "plan_id DESC NULLS LAST, tenant_id",
}


async def tenants_usage(conn: AsyncConnection, at: datetime, tenants: Sequence[str] | None,
                        sort: TenantSort, descending: bool, limit: int, offset: int
                        ) -> list[TenantUsage]:
    """Every tenant with usage or a subscription, with its meters in the period containing
    `at` against their limits (`quota_state`), sorted and paged."""
    order = _TENANT_ORDER[sort, descending]
    query: LiteralString = (
        "WITH known AS ("
        "  SELECT tenant_id FROM tally.subscriptions"
        "  UNION SELECT DISTINCT tenant_id FROM tally.usage_by_period"
        "), current AS ("
        "  SELECT u.tenant_id, u.meter, u.quantity, u.event_count, q.\"limit\", q.state,"
        "    CASE WHEN q.\"limit\" > 0 THEN u.quantity / q.\"limit\" END AS ratio"
        "  FROM tally.usage_by_period u LEFT JOIN tally.quota_state q"
        "    ON q.tenant_id = u.tenant_id AND q.meter = u.meter"
        "   AND q.period_start = u.period_start"
        "  WHERE u.period_start <= %(at)s AND %(at)s < u.period_end"
        "), worst AS ("
        "  SELECT DISTINCT ON (tenant_id) tenant_id, meter, quantity, \"limit\", ratio"
        "  FROM current ORDER BY tenant_id, ratio DESC NULLS LAST, meter"
        "), listed AS ("
        "  SELECT k.tenant_id, s.plan_id, s.status,"
        "    (SELECT count(*) FROM current c WHERE c.tenant_id = k.tenant_id)::int AS meters,"
        "    coalesce((SELECT sum(event_count) FROM current c"
        "      WHERE c.tenant_id = k.tenant_id), 0)::bigint AS events,"
        "    w.meter AS worst_meter, w.quantity AS worst_used, w.\"limit\" AS worst_limit,"
        "    w.ratio AS usage_ratio,"
        "    (SELECT count(*) FROM current c WHERE c.tenant_id = k.tenant_id"
        "      AND c.state = 'blocked')::int AS blocked"
        "  FROM known k LEFT JOIN tally.subscriptions s USING (tenant_id)"
        "  LEFT JOIN worst w USING (tenant_id)"
        "  WHERE %(all)s OR k.tenant_id = ANY(%(t)s)"
        ")"
        " SELECT *, (count(*) OVER ())::int AS total FROM listed ORDER BY ")
    return await rows(conn, TenantUsage, query + order + " LIMIT %(n)s OFFSET %(o)s",
                      {"at": at, "all": tenants is None, "t": list(tenants or ()),
                       "n": limit, "o": offset})


@dataclass(frozen=True)
class Lag:
    """How far a projection's consumer is behind, per topic partition."""

    projection: str
    topic: str
    partition: int
    next_offset: int


async def projection_offsets(conn: AsyncConnection) -> list[Lag]:
    return await rows(conn, Lag, "SELECT projection, topic, partition, next_offset"
                      " FROM tally.projection_offsets ORDER BY 1, 2, 3")
