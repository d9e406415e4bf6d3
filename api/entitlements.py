"""Entitlements: may a tenant use more of a meter (`check`), and check-and-record as one
step (`consume`).

The one owner of a (tenant, meter) decision
-------------------------------------------
`consume` must never let concurrent callers push recorded usage past a hard limit, so each
decision is taken by one owner at a time, in two rings:

1. inside one API process, a per-(tenant, meter) `asyncio.Lock`: concurrent requests for
   the same key queue here and hold no database connection while they wait;
2. across API processes, a Postgres advisory lock on the same key, taken in the
   transaction that decides (`pg_advisory_xact_lock`): every API process talking to the
   same database agrees on one owner at a time.

What "used" is, under the lock, in ONE statement (one snapshot):

    used = the ledger's value of the meter in the current period (`usage_by_period`)
         + the reservations of that period whose event the ledger does not hold yet

A reservation (`tally.entitlement_reservations`) is written, in the deciding transaction,
for every use `consume` allows, before its usage event is published. The projector writes
a counted event's ledger key (`usage_event_keys`) and its rollup in one transaction, so in
one snapshot every allowed use is counted exactly once: in the rollup, or as a
reservation, never both, never neither. That is why the ledger, not the worker's
quota-state topic, is the base: the quota state carries no event ids, so a use counted
by the worker but not yet projected could not be told apart from one still in flight.

Steps of `consume`, and what each guarantees:
1. take both locks; an event id already reserved or in the ledger is a duplicate: the
   answer is "allowed, already recorded" and nothing more is reserved (idempotent by id);
2. read `used` as above, decide with `domain.quota.check` against the plan's hard limit;
3. allowed: insert the reservation and commit (the decision is durable before the event
   exists); refused: commit nothing, answer 402 with the limit and the usage;
4. publish the usage event through the producer SDK, with the reservation's id and time,
   and wait for the broker's acknowledgement. A duplicate is published again (the worker
   deduplicates by id), so a retry after a failed publish completes it.

Limits, honestly:
- A reservation whose publish failed (the request answered 503) keeps its units reserved
  until the same id is consumed again or the period ends: the limit errs on the side of
  refusing, never of passing. No sweeper expires them.
- Usage published by other paths (the SDK, the gateway) is counted once the projector has
  it: a service that records usage around the API can pass the limit by what is in flight
  there, as with any eventually consistent counter. The guarantee is for `consume`.
- Only additive meters (`sum`, `count`) can be consumed; `max`, `latest` and
  `unique_count` are not a running total that a reservation can add to.
- The decision reads Postgres: it is as available as Postgres, and costs one round trip
  under the lock. Throughput per (tenant, meter) key is one decision at a time.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from api import queries
from api.errors import BadRequest, NotFound, Unavailable
from api.tenant_plan import tenant_plan
from domain import quota
from domain.periods import Period
from runtime.postgres import AsyncConnection
from schemas.plans import Catalog

ADDITIVE = ("sum", "count")
_LOCK_SPACE = 0x7A11_0090  # the advisory-lock key space of entitlement decisions


@dataclass(frozen=True)
class Decision:
    """The answer to one check or consume."""

    tenant: str
    meter: str
    quantity: Decimal
    allowed: bool
    reason: str
    used: Decimal  # before this use
    limit: Decimal | None  # the hard limit; None: never blocked
    remaining: Decimal | None  # after this use when allowed, before it when refused
    plan_id: str
    period: Period
    event_id: str | None = None
    duplicate: bool = False


Publish = Callable[[str, str, Decimal, str, datetime, dict[str, str]], Awaitable[None]]
Connect = Callable[[], Any]  # an async context manager giving an AsyncConnection


class Entitlements:
    """Decides checks and consumes; see the module docstring for the guarantee."""

    def __init__(self, connect: Connect, publish: Publish,
                 catalog: Callable[[], Catalog], clock: Callable[[], datetime]) -> None:
        self._connect = connect
        self._publish = publish
        self._catalog = catalog
        self._clock = clock
        # One lock per key while anyone waits on it or holds it; then it is collected.
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary())

    def _lock(self, tenant: str, meter: str) -> asyncio.Lock:
        lock = self._locks.get((tenant, meter))
        if lock is None:
            lock = self._locks[(tenant, meter)] = asyncio.Lock()
        return lock

    def _spec(self, meter: str, consuming: bool) -> Catalog:
        catalog = self._catalog()
        spec = catalog.meters.get(meter)
        if spec is None:
            raise NotFound(f"unknown meter {meter!r}: the plan catalog defines "
                           f"{', '.join(sorted(catalog.meters))}")
        if consuming and spec.aggregation not in ADDITIVE:
            raise BadRequest(f"meter {meter!r} aggregates by {spec.aggregation}: only sum "
                             "and count meters can be consumed")
        return catalog

    async def check(self, tenant: str, meter: str, quantity: Decimal) -> Decision:
        """Would `quantity` more be allowed now? Records nothing."""
        catalog = self._spec(meter, consuming=False)
        async with self._connect() as conn:
            return await self._decide(conn, catalog, tenant, meter, quantity, self._clock())

    async def consume(self, tenant: str, meter: str, quantity: Decimal, event_id: str,
                      dimensions: dict[str, str]) -> Decision:
        """Check and record as one step (module docstring, steps 1 to 4)."""
        catalog = self._spec(meter, consuming=True)
        increment = quantity if catalog.meters[meter].aggregation == "sum" else Decimal(1)
        async with self._lock(tenant, meter), self._connect() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                               (_LOCK_SPACE, f"{tenant}/{meter}"))
            now = self._clock()
            earlier = await _reserved_at(conn, tenant, event_id)
            if earlier is not None:
                decision = await self._decide(conn, catalog, tenant, meter, Decimal(0), now)
                decision = _duplicate(decision, quantity, event_id)
                event_time = earlier
            else:
                decision = await self._decide(conn, catalog, tenant, meter, increment, now,
                                              event_id)
                decision = replace(decision, quantity=quantity)
                event_time = now
                if decision.allowed and not decision.duplicate:
                    await conn.execute(
                        "INSERT INTO tally.entitlement_reservations"
                        " (tenant_id, event_id, meter, event_time, quantity)"
                        " VALUES (%s, %s, %s, %s, %s)",
                        (tenant, event_id, meter, now, increment))
        if decision.allowed:
            try:
                await self._publish(tenant, meter, quantity, event_id, event_time, dimensions)
            except Exception as e:
                raise Unavailable(
                    f"the use was allowed and reserved, but publishing its event failed "
                    f"({e}): consume again with the same id to complete it") from e
        return decision

    async def _decide(self, conn: AsyncConnection, catalog: Catalog, tenant: str, meter: str,
                      increment: Decimal, now: datetime, event_id: str | None = None
                      ) -> Decision:
        standing = await tenant_plan(conn, catalog, tenant, now, meter)
        terms = standing.plan.meters.get(meter)
        limit = terms.hard_limit if terms is not None else None
        used, counted = await _used(conn, tenant, meter, standing.period, event_id)
        if counted:  # the id is in the ledger already: counted, nothing more to do
            return Decision(tenant, meter, increment, True, "already recorded", used, limit,
                            quota.remaining(used, terms), standing.plan_id, standing.period,
                            event_id, duplicate=True)
        verdict = quota.check(used, limit, increment)
        return Decision(tenant, meter, increment, verdict.allowed, verdict.reason, used, limit,
                        verdict.remaining, standing.plan_id, standing.period, event_id)


def _duplicate(decision: Decision, quantity: Decimal, event_id: str) -> Decision:
    return replace(decision, quantity=quantity, allowed=True, reason="already recorded",
                   event_id=event_id, duplicate=True)


async def _reserved_at(conn: AsyncConnection, tenant: str, event_id: str) -> datetime | None:
    found = await queries.value(
        conn, "SELECT event_time FROM tally.entitlement_reservations"
        " WHERE tenant_id = %s AND event_id = %s", (tenant, event_id))
    return found if isinstance(found, datetime) else None


async def _used(conn: AsyncConnection, tenant: str, meter: str, period: Period,
                event_id: str | None) -> tuple[Decimal, bool]:
    """The meter's usage in `period`, counted and reserved, in one snapshot; and whether
    `event_id` is already in the ledger."""
    cur = await conn.execute(
        "SELECT coalesce((SELECT quantity FROM tally.usage_by_period"
        "   WHERE tenant_id = %(t)s AND meter = %(m)s AND period_start = %(s)s), 0)"
        " + coalesce((SELECT sum(r.quantity) FROM tally.entitlement_reservations r"
        "   WHERE r.tenant_id = %(t)s AND r.meter = %(m)s"
        "   AND r.event_time >= %(s)s AND r.event_time < %(e)s"
        "   AND NOT EXISTS (SELECT 1 FROM tally.usage_event_keys k"
        "     WHERE k.tenant_id = r.tenant_id AND k.event_id = r.event_id)), 0),"
        " %(id)s::text IS NOT NULL AND EXISTS (SELECT 1 FROM tally.usage_event_keys"
        "   WHERE tenant_id = %(t)s AND event_id = %(id)s)",
        {"t": tenant, "m": meter, "s": period.start, "e": period.end, "id": event_id})
    row = await cur.fetchone()
    assert row is not None
    return Decimal(row[0]), bool(row[1])
