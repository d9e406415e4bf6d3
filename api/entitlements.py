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

What "used" is, under the lock, in ONE statement (one snapshot): the meter's value in the
current period with the uses reserved but not in the ledger yet, as the meter's kind folds
them (`MeterKind.pending_sql`): for a sum, the ledger's total (`usage_by_period`) plus the
reserved quantities; for a max, the greater of the ledger's peak and the reserved ones.
A use passes the hard limit when the value it would leave (`MeterKind.after_use`) exceeds
it. Per kind (written once, on the kind, in domain/meters.py):
- sum: used + quantity;  count: used + 1 (one event, whatever its quantity);
- max: the greater of the peak and the quantity (a lower reading never passes);
- latest: the quantity (a use timed now is the newest reading; a lower one is allowed
  even above a limit passed before);
- unique_count: used + 1 when the value of the meter's unique dimension is new in the
  period (not in the ledger's uniques nor reserved), else used: a value seen before is
  free. A use without that dimension is refused (422): it would count nothing.
No kind is refused outright.

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
2. read `used` as above, decide with `domain.quota.check_after` against the plan's limit;
3. allowed: insert the reservation and commit (the decision is durable before the event
   exists); refused: commit nothing, answer 402 with the limit and the usage;
4. publish the usage event through the producer SDK, with the reservation's id and time,
   and wait for the broker's acknowledgement. A duplicate is published again (the worker
   deduplicates by id), so a retry after a failed publish completes it.

Limits, honestly:
- A reservation whose publish failed (the request answered 503) keeps its units reserved
  until the same id is consumed again or the reservation sweeper (api/sweeper.py) settles
  it: the limit errs on the side of refusing, never of passing, meanwhile.
- Usage published by other paths (the SDK, the gateway) is counted once the projector has
  it: a service that records usage around the API can pass the limit by what is in flight
  there, as with any eventually consistent counter. The guarantee is for `consume`.
- latest: two reservations with the same time are ordered by id, while the log orders
  their events by publish order; times are taken to the microsecond, so ties are rare.
- The decision reads Postgres: it is as available as Postgres, and costs one round trip
  under the lock. Throughput per (tenant, meter) key is one decision at a time.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, LiteralString

from prometheus_client import Histogram
from psycopg import sql

from api.errors import NotFound, Unavailable, Unprocessable
from api.tenant_plan import TenantPlan, tenant_plan
from domain import quota
from domain.meters import KINDS
from domain.periods import Period
from runtime.postgres import AsyncConnection
from schemas.plans import Catalog

LOCK_SPACE = 0x7A11_0090  # the advisory-lock key space of entitlement decisions
# Where a consume's time goes: waiting for its key's lock in this process and for a pooled
# connection (queue), the deciding transaction (advisory lock, reads, reservation, commit),
# the publish until acknowledged.
CONSUME_SECONDS = Histogram(
    "tally_api_consume_phase_seconds", "Time of each phase of an entitlement consume",
    ["phase"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 5))


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

    def _spec(self, meter: str, dimensions: dict[str, str]) -> tuple[Catalog, str | None]:
        """The catalog, and the use's unique value (its meter's unique dimension)."""
        catalog = self._catalog()
        spec = catalog.meters.get(meter)
        if spec is None:
            raise NotFound(f"unknown meter {meter!r}: the plan catalog defines "
                           f"{', '.join(sorted(catalog.meters))}")
        unique = dimensions.get(spec.unique_dimension) if spec.unique_dimension else None
        if KINDS[spec.aggregation].needs_unique_value and unique is None:
            raise Unprocessable(
                f"meter {meter!r} counts distinct values of the dimension "
                f"{spec.unique_dimension!r}: a use without it would count nothing; give it "
                "in `dimensions`")
        return catalog, unique

    async def check(self, tenant: str, meter: str, quantity: Decimal,
                    dimensions: dict[str, str]) -> Decision:
        """Would this use be allowed now? Records nothing."""
        catalog, unique = self._spec(meter, dimensions)
        async with self._connect() as conn, conn.pipeline():
            standing = await tenant_plan(conn, catalog, tenant, self._clock(), meter)
            return await self._decide(conn, catalog, standing, meter, quantity, unique)

    async def consume(self, tenant: str, meter: str, quantity: Decimal, event_id: str,
                      dimensions: dict[str, str]) -> Decision:
        """Check and record as one step (module docstring, steps 1 to 4)."""
        catalog, unique = self._spec(meter, dimensions)
        started = time.perf_counter()
        # In pipeline mode, statements go out without waiting for the answers before them,
        # and the server runs them in order: BEGIN, the lock, the reservation lookup and
        # the plan reads take one round trip, the usage read one, the reservation and
        # COMMIT one (a consume was eight round trips, most of its decision time).
        async with self._lock(tenant, meter), self._connect() as conn, conn.pipeline(), \
                conn.transaction():
            locked = time.perf_counter()
            await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                               (LOCK_SPACE, f"{tenant}/{meter}"))
            now = self._clock()
            reserved = await conn.execute(_TOUCH_RESERVATION, (tenant, event_id))
            standing = await tenant_plan(conn, catalog, tenant, now, meter)
            earlier = _reserved_at(await reserved.fetchone())
            if earlier is not None:
                decision = await self._decide(conn, catalog, standing, meter, quantity,
                                              unique)
                decision = _duplicate(decision, quantity, event_id)
                event_time = earlier
            else:
                decision = await self._decide(conn, catalog, standing, meter, quantity,
                                              unique, event_id)
                event_time = now
                if decision.allowed and not decision.duplicate:
                    await conn.execute(
                        "INSERT INTO tally.entitlement_reservations"
                        " (tenant_id, event_id, meter, event_time, quantity, unique_value)"
                        " VALUES (%s, %s, %s, %s, %s, %s)",
                        (tenant, event_id, meter, now, quantity, unique))
        decided = time.perf_counter()
        CONSUME_SECONDS.labels("queue").observe(locked - started)
        CONSUME_SECONDS.labels("decide").observe(decided - locked)
        if decision.allowed:
            try:
                await self._publish(tenant, meter, quantity, event_id, event_time, dimensions)
            except Exception as e:
                raise Unavailable(
                    f"the use was allowed and reserved, but publishing its event failed "
                    f"({e}): consume again with the same id to complete it") from e
            CONSUME_SECONDS.labels("publish").observe(time.perf_counter() - decided)
        return decision

    async def _decide(self, conn: AsyncConnection, catalog: Catalog, standing: TenantPlan,
                      meter: str, quantity: Decimal, unique: str | None,
                      event_id: str | None = None) -> Decision:
        tenant = standing.tenant_id
        terms = standing.plan.meters.get(meter)
        limit = terms.hard_limit if terms is not None else None
        kind = KINDS[catalog.meters[meter].aggregation]
        used, counted, new_unique = await _used(conn, kind.pending_sql, tenant, meter,
                                                standing.period, event_id, unique)
        if counted:  # the id is in the ledger already: counted, nothing more to do
            return Decision(tenant, meter, quantity, True, "already recorded", used, limit,
                            quota.remaining(used, terms), standing.plan_id, standing.period,
                            event_id, duplicate=True)
        verdict = quota.check_after(used, kind.after_use(used, quantity, new_unique), limit)
        return Decision(tenant, meter, quantity, verdict.allowed, verdict.reason, used, limit,
                        verdict.remaining, standing.plan_id, standing.period, event_id)


def _duplicate(decision: Decision, quantity: Decimal, event_id: str) -> Decision:
    return replace(decision, quantity=quantity, allowed=True, reason="already recorded",
                   event_id=event_id, duplicate=True)


# The time of an event id's reservation, if there is one; a retry touches it, so that the
# sweeper leaves it alone while the retry publishes (api/sweeper.py).
_TOUCH_RESERVATION: LiteralString = (
    "UPDATE tally.entitlement_reservations SET touched_at = now()"
    " WHERE tenant_id = %s AND event_id = %s RETURNING event_time")


def _reserved_at(row: tuple[Any, ...] | None) -> datetime | None:
    return row[0] if row is not None and isinstance(row[0], datetime) else None


async def _used(conn: AsyncConnection, pending_sql: str, tenant: str, meter: str,
                period: Period, event_id: str | None, unique: str | None
                ) -> tuple[Decimal, bool, bool]:
    """In one snapshot: the meter's value in `period` with the uses reserved but not yet in
    the ledger, as its kind folds them (`pending_sql`); whether `event_id` is in the
    ledger already; whether `unique` is a value the period has not counted nor reserved."""
    query = sql.SQL(
        "WITH ledger AS (SELECT quantity, value_time FROM tally.usage_by_period"
        "   WHERE tenant_id = %(t)s AND meter = %(m)s AND period_start = %(s)s),"
        " pending AS (SELECT r.* FROM tally.entitlement_reservations r"
        "   WHERE r.tenant_id = %(t)s AND r.meter = %(m)s"
        "   AND r.event_time >= %(s)s AND r.event_time < %(e)s"
        "   AND NOT EXISTS (SELECT 1 FROM tally.usage_event_keys k"
        "     WHERE k.tenant_id = r.tenant_id AND k.event_id = r.event_id))"
        " SELECT {value},"
        " %(id)s::text IS NOT NULL AND EXISTS (SELECT 1 FROM tally.usage_event_keys"
        "   WHERE tenant_id = %(t)s AND event_id = %(id)s),"
        " %(u)s::text IS NOT NULL"
        "   AND NOT EXISTS (SELECT 1 FROM tally.usage_period_uniques WHERE tenant_id = %(t)s"
        "     AND meter = %(m)s AND period_start = %(s)s AND unique_value = %(u)s)"
        "   AND NOT EXISTS (SELECT 1 FROM pending WHERE unique_value = %(u)s)"
    ).format(value=sql.SQL(pending_sql))
    cur = await conn.execute(query, {"t": tenant, "m": meter, "s": period.start,
                                     "e": period.end, "id": event_id, "u": unique})
    row = await cur.fetchone()
    assert row is not None
    return Decimal(row[0]), bool(row[1]), bool(row[2])
