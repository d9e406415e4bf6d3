"""`/v1/admin`: every tenant's usage against its limits, top consumers, usage trends.
Admin tokens only; each answers about the tenants the token acts for (`"*"`: all)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from api import meter_query, models, queries
from api.auth import Caller, CallerDep
from api.context import CatalogDep, ConnDep, RuntimeDep
from api.routes_usage import ERRORS, MeterPath, known_meter, query_meter

router = APIRouter(prefix="/admin", tags=["admin"])


def _scope(caller: Caller) -> list[str] | None:
    caller.require_admin()
    return None if caller.tenants is None else sorted(caller.tenants)


@router.get("/tenants", response_model=models.AdminTenantPage, responses=ERRORS)
async def tenants(
    caller: CallerDep, conn: ConnDep, rt: RuntimeDep,
    sort: Annotated[queries.TenantSort, Query()] = "usage_ratio",
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> models.AdminTenantPage:
    """Tenants with their heaviest meter of the current period against its limit, sorted
    (`usage_ratio`: used / hard limit of the heaviest meter) and paged."""
    found = await queries.tenants_usage(conn, rt.clock(), _scope(caller), sort,
                                        order == "desc", limit, offset)
    return models.AdminTenantPage(
        total=found[0].total if found else 0, limit=limit, offset=offset,
        data=[models.AdminTenant(
            tenant=t.tenant_id, plan_id=t.plan_id, status=t.status, meters=t.meters,
            events=t.events, worst_meter=t.worst_meter, worst_used=t.worst_used,
            worst_limit=t.worst_limit, usage_ratio=t.usage_ratio, blocked_meters=t.blocked)
            for t in found])


@router.get("/meters/{meter}/top", response_model=models.TopConsumers, responses=ERRORS,
            response_model_by_alias=True)
async def top_consumers(
    caller: CallerDep, catalog: CatalogDep, conn: ConnDep, rt: RuntimeDep, meter: MeterPath,
    from_: Annotated[datetime | None, Query(alias="from")] = None,
    to: Annotated[datetime | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> models.TopConsumers:
    """The tenants that used the most of `meter` over the range (exact, from the ledger)."""
    tenants = _scope(caller)
    known_meter(catalog, meter)
    q = meter_query.build(meter, catalog.meters[meter],
                          tenants=None if tenants is None else tuple(tenants),
                          start=from_, end=to, window=None, group_by=[], filters=[],
                          tz="UTC", now=rt.clock())
    top = await meter_query.top_tenants(conn, q, limit)
    return models.TopConsumers(meter=meter, from_=q.start, to=q.end, data=[
        models.TopConsumer(tenant=t, value=v, events=n) for t, v, n in top])


@router.get("/meters/{meter}/trends", response_model=models.QueryResult, responses=ERRORS,
            response_model_by_alias=True)
async def trends(
    caller: CallerDep, catalog: CatalogDep, conn: ConnDep, rt: RuntimeDep, meter: MeterPath,
    from_: Annotated[datetime | None, Query(alias="from")] = None,
    to: Annotated[datetime | None, Query()] = None,
    window: Annotated[meter_query.Window, Query()] = "day",
    tz: Annotated[str, Query(max_length=64)] = "UTC",
) -> models.QueryResult:
    """The meter over every tenant the token acts for, per window: usage trends."""
    _scope(caller)
    return await query_meter(caller, catalog, conn, rt, meter, None, from_, to, window,
                             None, None, tz)
