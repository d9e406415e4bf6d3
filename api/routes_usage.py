"""`/v1/meters`, the meter query, a tenant's current and past usage, feature gates and
entitlements."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse

from api import charges, meter_query, models, queries
from api.auth import CallerDep
from api.context import CatalogDep, ConnDep, RuntimeDep
from api.entitlements import Decision
from api.errors import BadRequest, NotFound
from api.tenant_plan import tenant_plan
from producers import new_event_id
from schemas.events import NAME_PATTERN, TENANT_PATTERN
from schemas.plans import Catalog

router = APIRouter()
Tenant = Annotated[str, Path(pattern=f"^{TENANT_PATTERN.pattern}$", max_length=128)]
MeterPath = Annotated[str, Path(pattern=NAME_PATTERN)]
From = Annotated[datetime | None, Query(alias="from", description="start, inclusive "
                                        "(default: 30 days before `to`)")]
To = Annotated[datetime | None, Query(description="end, exclusive (default: now)")]
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": models.ErrorBody} for code in (400, 401, 403, 404, 503)}
ENTITLEMENT_ERRORS: dict[int | str, dict[str, object]] = {
    **ERRORS, 422: {"model": models.ErrorBody, "description": "a unique_count meter's use "
                    "without the meter's unique dimension"}}
KINDS_RULE = (" What passes a hard limit depends on the meter's aggregation: sum, the usage "
              "plus the quantity; count, the usage plus one; max, the greater of the peak "
              "and the quantity; latest, the quantity; unique_count, the usage plus one when "
              "the value of the meter's unique dimension (in `dimensions`, required: else "
              "422) is new in the period, else the usage.")
# Which tenants are "unknown", said once for the routes' descriptions.
NEW_TENANTS = ("A tenant id that breaks the tenant id rules is a 400. A valid id the "
               "pipeline has never heard of (no usage, no subscription) is not unknown "
               "here: it is on the catalog's default plan, as the worker counts its first "
               "event and billing bills it, so its features and limits are that plan's.")


async def known_tenant(conn: ConnDep, tenant: str) -> None:
    """404 for a tenant the pipeline never heard of."""
    if not await queries.tenant_known(conn, tenant):
        raise NotFound(f"unknown tenant {tenant!r}: no usage or subscription of it")


def known_meter(catalog: Catalog, meter: str) -> None:
    if meter not in catalog.meters:
        raise NotFound(f"unknown meter {meter!r}: the plan catalog defines "
                       f"{', '.join(sorted(catalog.meters))}")


@router.get("/meters", response_model=models.MeterList, responses=ERRORS, tags=["usage"])
async def list_meters(caller: CallerDep, catalog: CatalogDep) -> models.MeterList:
    """The meters of the plan catalog in force."""
    return models.MeterList(data=[
        models.Meter(meter=name, aggregation=spec.aggregation, unit=spec.unit,
                     unique_dimension=spec.unique_dimension,
                     lateness_seconds=spec.lateness_seconds)
        for name, spec in sorted(catalog.meters.items())])


@router.get("/meters/{meter}/query", response_model=models.QueryResult, responses=ERRORS,
            response_model_by_alias=True, tags=["usage"])
async def query_meter(
    caller: CallerDep, catalog: CatalogDep, conn: ConnDep, rt: RuntimeDep, meter: MeterPath,
    tenant: Annotated[str | None, Query(pattern=f"^{TENANT_PATTERN.pattern}$",
                                        description="the tenant; admin tokens may omit it "
                                        "(every tenant they act for)")] = None,
    from_: From = None,
    to: To = None,
    window: Annotated[meter_query.Window | None, Query()] = None,
    group_by: Annotated[list[str] | None, Query(description="dimension keys")] = None,
    filter: Annotated[list[str] | None, Query(description="key=value: rows whose dimension "
                                              "`key` is `value` (a key given twice: any of "
                                              "its values)")] = None,
    tz: Annotated[str, Query(max_length=64, description="IANA zone of the windows")] = "UTC",
) -> models.QueryResult:
    """The meter's exact value over the ledger, per window and dimension group."""
    known_meter(catalog, meter)
    tenants: tuple[str, ...] | None
    if tenant is not None:
        caller.require_read(tenant)
        tenants = (tenant,)
    else:
        caller.require_admin()
        tenants = None if caller.tenants is None else tuple(sorted(caller.tenants))
    q = meter_query.build(meter, catalog.meters[meter], tenants=tenants, start=from_, end=to,
                          window=window, group_by=group_by or [], filters=filter or [],
                          tz=tz, now=rt.clock())
    found = await meter_query.run(conn, q)
    return models.QueryResult(
        meter=meter, aggregation=q.spec.aggregation, tenant=tenant, window=q.window, tz=q.tz,
        from_=q.start, to=q.end, group_by=list(q.group_by),
        data=[models.QueryRow(window_start=r.window_start, window_end=r.window_end,
                              group=r.group, value=r.value, events=r.events) for r in found])


@router.get("/tenants/{tenant}/usage/current", response_model=models.CurrentUsage,
            responses=ERRORS, tags=["usage"])
async def current_usage(caller: CallerDep, catalog: CatalogDep, conn: ConnDep,
                        rt: RuntimeDep, tenant: Tenant) -> models.CurrentUsage:
    """Each meter's usage in the current cycle against its allowance and hard limit, its
    quota state, and the charges so far, rated by the billing model. Amounts are never
    added across currencies (one invoice per currency): the top-level ones are in the
    currency of the plan in force now, so a one-currency cycle reads as one figure per
    meter and one total; a cycle with a plan change across currencies lists each other
    currency's usage and charges in `other_currencies`. A valid tenant id with no usage
    and no subscription has no cycle to show: 404 (a bad id: 400)."""
    caller.require_read(tenant)
    await known_tenant(conn, tenant)
    return await charges.current_cycle(conn, catalog, tenant, rt.clock())


@router.get("/tenants/{tenant}/usage/history", response_model=models.UsageHistory,
            responses=ERRORS, tags=["usage"])
async def usage_history(caller: CallerDep, catalog: CatalogDep, conn: ConnDep,
                        rt: RuntimeDep, tenant: Tenant,
                        cycles: Annotated[int, Query(ge=1, le=36)] = 3) -> models.UsageHistory:
    """The last `cycles` cycles before the current one, with quantities and amounts. With a
    subscription Tally invoices, each cycle's amounts are its invoice's usage and minimum
    lines (plan slices, upgrades inside the cycle, trials, minimums); an ended cycle whose
    invoice is not due yet is rated on what is counted now. A cycle whose plans are in
    several currencies has one invoice per currency, so one entry per currency here: its
    usage under that currency's plans and that invoice's amounts, never a sum across
    currencies. Otherwise, per stored period under the plan the worker counted it in."""
    caller.require_read(tenant)
    await known_tenant(conn, tenant)
    return models.UsageHistory(tenant=tenant, cycles=await charges.past_cycles(
        conn, catalog, tenant, rt.clock(), cycles))


@router.get("/tenants/{tenant}/features/{feature}", response_model=models.Feature,
            responses=ERRORS, tags=["usage"], description=(
                "Whether the tenant's plan in force has `feature` (a feature no plan of "
                "the catalog has: 404). " + NEW_TENANTS))
async def feature(caller: CallerDep, catalog: CatalogDep, conn: ConnDep, rt: RuntimeDep,
                  tenant: Tenant,
                  feature: Annotated[str, Path(pattern=NAME_PATTERN)]) -> models.Feature:
    """Whether the tenant's plan in force has `feature` (a feature no plan has: 404)."""
    caller.require_read(tenant)
    if not any(feature in plan.features for plan in catalog.plans.values()):
        raise NotFound(f"unknown feature {feature!r}: no plan of the catalog has it")
    standing = await tenant_plan(conn, catalog, tenant, rt.clock())
    return models.Feature(tenant=tenant, feature=feature, plan_id=standing.plan_id,
                          enabled=feature in standing.plan.features)


def _decision(d: Decision) -> models.EntitlementDecision:
    return models.EntitlementDecision(
        tenant=d.tenant, meter=d.meter, quantity=d.quantity, allowed=d.allowed,
        reason=d.reason, used=d.used, limit=d.limit, remaining=d.remaining,
        plan_id=d.plan_id, period_start=d.period.start, period_end=d.period.end,
        id=d.event_id, duplicate=d.duplicate)


@router.post("/entitlements/check", response_model=models.EntitlementDecision,
             responses=ENTITLEMENT_ERRORS, tags=["entitlements"],
             description="Would this use be allowed now? Records nothing (scope `quota`). "
             + NEW_TENANTS + KINDS_RULE)
async def check(caller: CallerDep, rt: RuntimeDep,
                request: models.EntitlementRequest) -> models.EntitlementDecision:
    """Would this use be allowed now? Records nothing (scope `quota`)."""
    caller.require(request.tenant, "quota", "usage", "admin")
    if request.id is not None:
        raise BadRequest("a check records nothing: it takes no id")
    decision = await rt.entitlements.check(request.tenant, request.meter, request.quantity,
                                           dict(request.dimensions))
    return _decision(replace(decision, quantity=request.quantity))


@router.post("/entitlements/consume", response_model=models.EntitlementDecision,
             responses={**ENTITLEMENT_ERRORS, 402: {"model": models.EntitlementDecision,
                                        "description": "refused: over the hard limit"}},
             tags=["entitlements"], description=(
                 "Check and record as one step (scope `usage`): an allowed use is published "
                 "as a usage event, idempotent by `id`; a refused one records nothing and "
                 "answers 402 with the limit and the usage. Concurrent consumers never pass "
                 "a hard limit. " + NEW_TENANTS + KINDS_RULE))
async def consume(caller: CallerDep, rt: RuntimeDep, request: models.EntitlementRequest
                  ) -> models.EntitlementDecision | JSONResponse:
    """Check and record as one step (scope `usage`): an allowed use is published as a
    usage event, idempotent by `id`; a refused one records nothing and answers 402 with
    the limit and the usage. Concurrent consumers never pass a hard limit."""
    caller.require(request.tenant, "usage")
    decision = await rt.entitlements.consume(request.tenant, request.meter, request.quantity,
                                             request.id or new_event_id(),
                                             dict(request.dimensions))
    answer = _decision(decision)
    if not decision.allowed:
        return JSONResponse(answer.model_dump(mode="json"), status_code=402)
    return answer
