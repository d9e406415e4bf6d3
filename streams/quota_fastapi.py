"""Guard FastAPI endpoints with a QuotaView (requires `fastapi`; kept apart so the rest of
`streams` imports without it).

    view = QuotaView(settings)          # started in the app's lifespan

    @app.post("/v1/{tenant}/run", dependencies=[Depends(require_quota(view, "executions"))])
    async def run(tenant: str) -> dict[str, str]: ...

A refused request gets 429 with the decision's reason as `detail`; when the tenant is
blocked until its period ends, `Retry-After` says for how many seconds.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal

from fastapi import HTTPException, Request

from streams.quota_view import QuotaDecision, QuotaView

TenantFrom = str | Callable[[Request], str | Awaitable[str]]


def require_quota(
    view: QuotaView, meter: str, tenant_from: TenantFrom = "tenant",
    quantity: Decimal | int = 1,
) -> Callable[[Request], Awaitable[QuotaDecision]]:
    """A FastAPI dependency that lets a request through only within quota.

    `tenant_from`: the name of a path parameter, or a callable (sync or async) that takes
    the request and returns the tenant id (e.g. from an auth header). The dependency's
    value is the QuotaDecision, for handlers that want `remaining`.
    """

    async def tenant_of(request: Request) -> str:
        if isinstance(tenant_from, str):
            try:
                return str(request.path_params[tenant_from])
            except KeyError:
                raise HTTPException(500, f"route has no path parameter {tenant_from!r}") from None
        tenant = tenant_from(request)
        return await tenant if inspect.isawaitable(tenant) else tenant

    async def quota_dependency(request: Request) -> QuotaDecision:
        tenant = await tenant_of(request)
        decision = view.check(tenant, meter, quantity)
        if not decision.allowed:
            raise HTTPException(429, detail=decision.reason, headers=_retry_after(decision))
        return decision

    return quota_dependency


def _retry_after(decision: QuotaDecision) -> dict[str, str] | None:
    """Until the period ends, a refused tenant stays refused: tell clients when to retry."""
    if decision.state is None:
        return None
    seconds = decision.state.period_end.timestamp() - time.time()
    return {"Retry-After": str(max(math.ceil(seconds), 1))}
