"""The FastAPI application of `tally api serve`: its routes, and how errors become
answers.

Everything is under `/v1`; the OpenAPI document is `/openapi.json`; `/healthz` answers 200
once the plan catalog is loaded; `/metrics` is for Prometheus. What the routes share is
`api.context.Context`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import PoolTimeout

from api import routes_admin, routes_billing, routes_usage
from api.context import Clock, Context, utc_now
from api.errors import ApiError
from runtime.credentials import load_tokens
from runtime.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, clock: Clock = utc_now) -> FastAPI:
    """The API over `settings` (Postgres, Kafka, the tokens file, Stripe)."""
    runtime = Context(settings, clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="Tally API", version="1", lifespan=lifespan,
                  description="Usage, quotas, entitlements and billing of Tally's tenants. "
                  "Bearer tokens come from the tokens file: `read` for a tenant's data, "
                  "`admin` for the admin views, `usage` to consume and `quota` to check "
                  "entitlements, `subscriptions` for checkout and portal sessions.")
    app.state.runtime = runtime
    app.state.tokens = load_tokens(settings.tokens_file)
    if not len(app.state.tokens):
        log.warning("no tokens (TALLY_TOKENS_FILE): the API refuses every request")
    for module in (routes_usage, routes_billing, routes_admin):
        app.include_router(module.router, prefix="/v1")

    @app.get("/healthz", include_in_schema=False)
    async def health() -> JSONResponse:
        ready = runtime.follower.catalog is not None
        return JSONResponse({"ok": ready}, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"error": error.message, **_jsonable(error.detail)},
                            status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()]
        return JSONResponse({"error": "; ".join(problems)[:2000]}, status_code=400)

    @app.exception_handler(PoolTimeout)
    @app.exception_handler(psycopg.OperationalError)
    async def database_down(request: Request, error: Exception) -> JSONResponse:
        log.error("Postgres unavailable: %s", error)
        return JSONResponse({"error": "the database is unavailable; try again"},
                            status_code=503)

    @app.exception_handler(psycopg.errors.UndefinedTable)
    async def not_migrated(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": "the database is not migrated: run `tally db migrate`"},
                            status_code=503)

    return app


def _jsonable(detail: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Decimal | datetime) else v for k, v in detail.items()}
