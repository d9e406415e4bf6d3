"""A tenant's subscription and invoices, and the Stripe Checkout and portal links."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from api import models, queries, stripe_sessions
from api.auth import CallerDep
from api.context import CatalogDep, ConnDep, RuntimeDep
from api.errors import Conflict, NotFound
from api.routes_usage import ERRORS, Tenant, known_tenant
from api.tenant_plan import tenant_plan

router = APIRouter(tags=["billing"])


def _invoice(row: queries.InvoiceRow, lines: list[queries.InvoiceLineRow] | None = None
             ) -> models.Invoice:
    return models.Invoice(
        invoice_id=row.invoice_id, tenant=row.tenant_id, period_start=row.period_start,
        period_end=row.period_end, currency=row.currency, subtotal_cents=row.subtotal_cents,
        total_cents=row.total_cents, status=row.status, stripe_invoice_id=row.stripe_invoice_id,
        hosted_invoice_url=row.hosted_invoice_url, invoice_pdf=row.invoice_pdf,
        lines=None if lines is None else [models.InvoiceLine(
            line_no=line.line_no, meter=line.meter, description=line.description,
            quantity=line.quantity, unit_amount_cents=line.unit_amount_cents,
            amount_cents=line.amount_cents) for line in lines])


@router.get("/tenants/{tenant}/subscription", response_model=models.Subscription,
            responses=ERRORS)
async def subscription(caller: CallerDep, catalog: CatalogDep, conn: ConnDep, rt: RuntimeDep,
                       tenant: Tenant) -> models.Subscription:
    """The tenant's plan in force and its subscription (the default plan without one)."""
    caller.require_read(tenant)
    await known_tenant(conn, tenant)
    standing = await tenant_plan(conn, catalog, tenant, rt.clock())
    sub = standing.subscription
    return models.Subscription(
        tenant=tenant, plan_id=standing.plan_id, plan_name=standing.plan.name,
        status=sub.status if sub else "none",
        current_period_start=sub.current_period_start if sub else None,
        current_period_end=sub.current_period_end if sub else None,
        stripe_customer_id=sub.stripe_customer_id if sub else None,
        stripe_subscription_id=sub.stripe_subscription_id if sub else None,
        features=list(standing.plan.features))


@router.get("/tenants/{tenant}/invoices", response_model=models.InvoiceList, responses=ERRORS)
async def tenant_invoices(caller: CallerDep, conn: ConnDep, tenant: Tenant,
                          limit: Annotated[int, Query(ge=1, le=200)] = 50,
                          offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0
                          ) -> models.InvoiceList:
    """The tenant's invoices, newest period first."""
    caller.require_read(tenant)
    await known_tenant(conn, tenant)
    return models.InvoiceList(data=[_invoice(r) for r in await queries.invoices(
        conn, [tenant], limit, offset)])


@router.get("/invoices/{invoice_id}", response_model=models.Invoice, responses=ERRORS)
async def invoice(caller: CallerDep, conn: ConnDep,
                  invoice_id: Annotated[str, Path(max_length=512, pattern=r"^[^\x00]+$")]
                  ) -> models.Invoice:
    """One invoice with its lines and the customer's hosted copy."""
    row = await queries.invoice(conn, invoice_id)
    if row is None:
        raise NotFound(f"no invoice {invoice_id!r}")
    caller.require_read(row.tenant_id)
    return _invoice(row, await queries.invoice_lines(conn, invoice_id))


@router.post("/billing/checkout-session", response_model=models.Session,
             responses={**ERRORS, 409: {"model": models.ErrorBody}})
async def checkout_session(caller: CallerDep, catalog: CatalogDep, conn: ConnDep,
                           rt: RuntimeDep, request: models.CheckoutRequest) -> models.Session:
    """A Stripe Checkout link subscribing the tenant to a plan (scope `subscriptions`)."""
    caller.require(request.tenant, "subscriptions", "admin")
    plan = catalog.plans.get(request.plan_id)
    if plan is None:
        raise NotFound(f"unknown plan {request.plan_id!r}")
    if request.interval == "year" and plan.yearly_fee_cents is None:
        raise Conflict(f"plan {request.plan_id!r} has no yearly price")
    sub = await queries.subscription(conn, request.tenant)
    session_id, url = await stripe_sessions.checkout_session(
        rt.settings, request.tenant, request.plan_id, request.interval,
        sub.stripe_customer_id if sub else None, request.success_url, request.cancel_url)
    return models.Session(id=session_id, url=url)


@router.post("/billing/portal-session", response_model=models.Session,
             responses={**ERRORS, 409: {"model": models.ErrorBody}})
async def portal_session(caller: CallerDep, conn: ConnDep, rt: RuntimeDep,
                         request: models.PortalRequest) -> models.Session:
    """A Stripe customer portal link for the tenant (scope `subscriptions`)."""
    caller.require(request.tenant, "subscriptions", "admin")
    sub = await queries.subscription(conn, request.tenant)
    if sub is None or sub.stripe_customer_id is None:
        raise Conflict(f"tenant {request.tenant!r} has no Stripe customer yet: subscribe "
                       "through a checkout session first")
    session_id, url = await stripe_sessions.portal_session(
        rt.settings, request.tenant, sub.stripe_customer_id, request.return_url)
    return models.Session(id=session_id, url=url)
