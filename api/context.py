"""What the API's routes share while it serves: the Postgres pool, the plan catalog
(followed on the compacted plans topic, as the worker does), the producer SDK client that
publishes consumed entitlements, the entitlement owner, its reservation sweeper and the
clock; and the FastAPI dependencies that hand them to a route."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated

from fastapi import Depends, Request
from psycopg_pool import AsyncConnectionPool

from api.entitlements import Entitlements
from api.errors import Unavailable
from api.sweeper import run_sweeper
from producers import ProducerOptions, UsageProducer
from runtime.plans import CatalogFollower
from runtime.postgres import AsyncConnection
from runtime.settings import Settings
from schemas.plans import Catalog

log = logging.getLogger(__name__)
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Context:
    """What the routes use: the pool, the catalog, the entitlement owner, the clock."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        # Every connection opened at start: a pool that grows on demand makes the requests
        # of a burst wait for new Postgres sessions (and their prepared statements), 20-50
        # ms at the start of 500 consumes/s (bench/results/notes.md).
        self.pool = AsyncConnectionPool(
            settings.require_database(), min_size=settings.api_pool_size,
            max_size=settings.api_pool_size,
            open=False, kwargs={"autocommit": True}, timeout=10)
        self.follower = CatalogFollower(settings, lambda _: None)
        # A consume waits for its event's acknowledgement: the SDK's default linger (20 ms,
        # for throughput) and aiokafka's (5 ms, runtime.kafka.producer) would be most of its
        # latency. None in the SDK either: a batch holds one tenant's events, and consumes
        # of one tenant and meter are decided one at a time (api.entitlements), so waiting
        # gathers nothing; a batch is still sealed only once the loop turns, with every
        # event of that tenant recorded in the same turn. Batches of one event or a few
        # are not compressed: it costs CPU on every consume and saves nothing.
        self.producer = UsageProducer(settings, ProducerOptions(
            source="tally/api", linger_ms=0,
            kafka_options={"linger_ms": 0, "compression_type": None}))
        self.entitlements = Entitlements(self.pool.connection, self._publish, self.catalog,
                                         clock)
        self._tasks: list[asyncio.Task[None]] = []

    def catalog(self) -> Catalog:
        """The catalog in force; 503 until one was read."""
        if self.follower.catalog is None:
            raise Unavailable("no plan catalog yet: publish one with `tally plans publish`")
        return self.follower.catalog

    async def _publish(self, tenant: str, meter: str, quantity: Decimal, event_id: str,
                       time: datetime, dimensions: dict[str, str]) -> None:
        # The SDK's own path (its fast check, no model built) and wait for the broker.
        await self.producer.record(tenant, meter, quantity, dimensions=dimensions,
                                   event_id=event_id, time=time, wait=True)

    async def start(self) -> None:
        await self.pool.open()
        await self.producer.start()
        self._tasks.append(asyncio.create_task(self._follow()))
        self._tasks.append(asyncio.create_task(run_sweeper(self.settings,
                                                           self.pool.connection)))

    async def _follow(self) -> None:
        while True:  # the broker may be down at start or go away: keep trying
            try:
                await self.follower.run()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("following the plan catalog failed, retrying: %r", e)
                await asyncio.sleep(2)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.producer.close(timeout=10)
        await self.pool.close()


async def context_of(request: Request) -> Context:
    rt: Context = request.app.state.runtime
    return rt


RuntimeDep = Annotated[Context, Depends(context_of)]


async def connection(rt: RuntimeDep) -> AsyncIterator[AsyncConnection]:
    """A pooled connection for one request."""
    async with rt.pool.connection() as conn:
        yield conn


ConnDep = Annotated[AsyncConnection, Depends(connection)]


async def catalog(rt: RuntimeDep) -> Catalog:
    return rt.catalog()


CatalogDep = Annotated[Catalog, Depends(catalog)]
