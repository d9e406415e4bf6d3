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
- The decision reads Postgres: it is as available as Postgres, and costs two round trips
  under the lock (three when the key's period is not the one it had last: `consume`).
  Throughput per (tenant, meter) key is one decision at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from prometheus_client import Histogram
from psycopg import AsyncClientCursor
from psycopg.pq import TransactionStatus
from psycopg.rows import AsyncRowFactory, class_row, tuple_row

from api import queries
from api.errors import NotFound, Unavailable, Unprocessable
from api.tenant_plan import TenantPlan, plan_at, tenant_plan
from domain import quota
from domain.meters import KINDS, MeterKind
from domain.periods import Period, calendar_month
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
        # The pooled connections whose session has the decision's statements prepared.
        self._prepared: weakref.WeakSet[AsyncConnection] = weakref.WeakSet()
        # Each key's period at its last consume, when not the calendar month (`consume`).
        self._periods: dict[tuple[str, str], Period] = {}
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
        kind = KINDS[catalog.meters[meter].aggregation]
        async with self._connect() as conn, conn.pipeline():
            standing = await tenant_plan(conn, catalog, tenant, self._clock(), meter)
            used = await _used(conn, kind, _params(tenant, meter, standing.period, None,
                                                   unique))
        return _decide(kind, standing, meter, quantity, used)

    async def consume(self, tenant: str, meter: str, quantity: Decimal, event_id: str,
                      dimensions: dict[str, str]) -> Decision:
        """Check and record as one step (module docstring, steps 1 to 4).

        Two round trips, each ONE text of statements sent as one simple query (a client
        cursor binds the parameters): BEGIN, the advisory lock, the reservation lookup, the
        plan reads and the usage read; then the reservation and COMMIT. Each statement of
        a text reads its own snapshot, so the reads see every decision committed before
        the lock was granted. Every statement sent costs the API Python work (psycopg's
        pipeline mode spent most of a consume's CPU on it): so the usage is read for the
        period the key had last time (or the calendar month) before the plan reads say
        which period it is; when they say another, it is read again. The statements are
        server-side prepared once per connection (`_STATEMENTS`): a simple query is
        otherwise parsed and planned each time, which doubled Postgres's CPU per
        consume."""
        catalog, unique = self._spec(meter, dimensions)
        kind = KINDS[catalog.meters[meter].aggregation]
        started = time.perf_counter()
        async with self._lock(tenant, meter), self._connect() as conn:
            locked = time.perf_counter()
            now = self._clock()
            guess = self._period_guess(tenant, meter, now)
            params = _params(tenant, meter, guess, event_id, unique)
            params.update({"space": LOCK_SPACE, "key": f"{tenant}/{meter}", "at": now,
                           "q": quantity})
            cur = AsyncClientCursor(conn)
            try:
                if conn not in self._prepared:
                    try:
                        await cur.execute(_PREPARE_ALL)
                    except BaseException:
                        # Some may be prepared: closed, the pool replaces the connection.
                        await conn.close()
                        raise
                    self._prepared.add(conn)
                await cur.execute(_DECISION_TEXT[kind.name], params)
                earlier = _reserved_at(await _next_row(cur, 2))  # after BEGIN, the lock
                subscription = await _next_row(cur, 1, class_row(queries.SubscriptionRow))
                usage = await _next_rows(cur, class_row(queries.PeriodUsage))
                used = _used_of(await _next_row(cur, 1))
                standing = plan_at(catalog, tenant, now, subscription, usage, meter)
                if standing.period != guess:  # read again, for the period it is
                    self._remember_period(tenant, meter, standing.period)
                    params.update(s=standing.period.start, e=standing.period.end)
                    await cur.execute(_EXECUTE[f"used_{kind.name}"], params)
                    used = _used_of(await cur.fetchone())
                if earlier is not None:  # reserved before: allowed, at its first time
                    decision = _duplicate(_decide(kind, standing, meter, quantity,
                                                  replace(used, counted=False)),
                                          quantity, event_id)
                    event_time = earlier
                else:
                    decision = _decide(kind, standing, meter, quantity, used, event_id)
                    event_time = now
                reserve = decision.allowed and not decision.duplicate
                await cur.execute(_RESERVE_AND_COMMIT if reserve else "COMMIT", params)
            except BaseException:
                if conn.info.transaction_status in (TransactionStatus.INTRANS,
                                                    TransactionStatus.INERROR):
                    with contextlib.suppress(psycopg.Error):  # the pool then discards it
                        await conn.rollback()
                raise
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

    def _period_guess(self, tenant: str, meter: str, now: datetime) -> Period:
        last = self._periods.get((tenant, meter))
        return last if last is not None and now in last else calendar_month(now)

    def _remember_period(self, tenant: str, meter: str, period: Period) -> None:
        if len(self._periods) >= _PERIODS_KEPT:  # bounded: a cache, not a record
            self._periods.clear()
        self._periods[(tenant, meter)] = period


@dataclass(frozen=True)
class _Used:
    """What one snapshot says of a meter in a period (`_USED`)."""

    value: Decimal  # with the uses reserved but not in the ledger yet
    counted: bool  # the use's id is in the ledger already
    new_unique: bool  # the use's unique value is not counted nor reserved in the period


def _decide(kind: MeterKind, standing: TenantPlan, meter: str, quantity: Decimal,
            used: _Used, event_id: str | None = None) -> Decision:
    tenant = standing.tenant_id
    terms = standing.plan.meters.get(meter)
    limit = terms.hard_limit if terms is not None else None
    if used.counted:  # the id is in the ledger already: counted, nothing more to do
        return Decision(tenant, meter, quantity, True, "already recorded", used.value, limit,
                        quota.remaining(used.value, terms), standing.plan_id,
                        standing.period, event_id, duplicate=True)
    verdict = quota.check_after(used.value,
                                kind.after_use(used.value, quantity, used.new_unique), limit)
    return Decision(tenant, meter, quantity, verdict.allowed, verdict.reason, used.value,
                    limit, verdict.remaining, standing.plan_id, standing.period, event_id)


def _duplicate(decision: Decision, quantity: Decimal, event_id: str) -> Decision:
    return replace(decision, quantity=quantity, allowed=True, reason="already recorded",
                   event_id=event_id, duplicate=True)


def _params(tenant: str, meter: str, period: Period, event_id: str | None,
            unique: str | None) -> dict[str, Any]:
    return {"t": tenant, "m": meter, "s": period.start, "e": period.end, "id": event_id,
            "u": unique}


# In one snapshot: the meter's value in the period [s, e) with the uses reserved but not
# yet in the ledger, as its kind folds them (`pending_sql`, in place of {value}); whether
# the id is in the ledger already; whether the unique value is one the period has not
# counted nor reserved.
_USED = (
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
    "   AND NOT EXISTS (SELECT 1 FROM pending WHERE unique_value = %(u)s)")
_USED_SQL = {name: _USED.replace("{value}", kind.pending_sql) for name, kind in KINDS.items()}
# The statements of a consume, by name, prepared once in each pooled connection's session
# (`Entitlements._prepared`) and run by EXECUTE with the same named parameters
# (`_prepare_statement`).
_STATEMENTS = {
    "lock": "SELECT pg_advisory_xact_lock(%(space)s, hashtext(%(key)s))",
    # The time of the id's reservation, if there is one; a retry touches it, so that the
    # sweeper leaves it alone while the retry publishes (api/sweeper.py).
    "touch": "UPDATE tally.entitlement_reservations SET touched_at = now()"
             " WHERE tenant_id = %(t)s AND event_id = %(id)s RETURNING event_time",
    "subscription": queries.SUBSCRIPTION_SQL,
    "usage_at": queries.USAGE_AT_SQL,
    **{f"used_{name}": used for name, used in _USED_SQL.items()},
    "reserve": "INSERT INTO tally.entitlement_reservations"
               " (tenant_id, event_id, meter, event_time, quantity, unique_value)"
               " VALUES (%(t)s, %(id)s, %(m)s, %(at)s, %(q)s, %(u)s)",
}


def _prepare_statement(name: str, query: str) -> tuple[str, str]:
    """PREPARE of `query` as `tally_consume_<name>`, and the EXECUTE that runs it."""
    names: list[str] = []

    def number(placeholder: re.Match[str]) -> str:
        if placeholder[1] not in names:
            names.append(placeholder[1])
        return f"${names.index(placeholder[1]) + 1}"

    body = re.sub(r"%\((\w+)\)s", number, query)
    args = ", ".join(f"%({n})s" for n in names)
    return (f"PREPARE tally_consume_{name} AS {body}",
            f"EXECUTE tally_consume_{name}({args})")


_PREPARE_ALL = "; ".join(_prepare_statement(n, q)[0] for n, q in _STATEMENTS.items())
_EXECUTE = {n: _prepare_statement(n, q)[1] for n, q in _STATEMENTS.items()}
# The first round trip of a consume (its results in this order; `consume`).
_DECISION_TEXT = {name: "; ".join((
    "BEGIN", _EXECUTE["lock"], _EXECUTE["touch"], _EXECUTE["subscription"],
    _EXECUTE["usage_at"], _EXECUTE[f"used_{name}"])) for name in KINDS}
_RESERVE_AND_COMMIT = f"{_EXECUTE['reserve']}; COMMIT"
_PERIODS_KEPT = 65_536  # (tenant, meter) keys whose last period is remembered


def _reserved_at(row: tuple[Any, ...] | None) -> datetime | None:
    return row[0] if row is not None and isinstance(row[0], datetime) else None


def _used_of(row: tuple[Any, ...] | None) -> _Used:
    assert row is not None
    return _Used(Decimal(row[0]), bool(row[1]), bool(row[2]))


async def _next_rows(cur: AsyncClientCursor[Any], row_factory: AsyncRowFactory[Any] = tuple_row,
                     skip: int = 1) -> list[Any]:
    """The rows of the result `skip` results after the current one, made by
    `row_factory`."""
    for _ in range(skip):
        if not cur.nextset():
            raise AssertionError("a statement of the decision returned no result")
    cur.row_factory = row_factory
    return await cur.fetchall()


async def _next_row(cur: AsyncClientCursor[Any], skip: int = 1,
                    row_factory: AsyncRowFactory[Any] = tuple_row) -> Any:
    rows = await _next_rows(cur, row_factory, skip)
    return rows[0] if rows else None


async def _used(conn: AsyncConnection, kind: MeterKind, params: dict[str, Any]) -> _Used:
    """`_USED` for a check (no lock, no transaction)."""
    cur = await conn.execute(_USED_SQL[kind.name], params)
    return _used_of(await cur.fetchone())
