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
   same database agrees on one owner at a time. The use's event id is locked too (its
   own lock space): two uses of one id on two meters, at once, are decided one after the
   other, the second as the duplicate of the first, not both reserving the id.

Consumes that arrive together are decided together (`_decide_batch`): one transaction
takes every use's advisory locks, in the order of the locks (two batches, in one process
or two, may wait for each other, never deadlock), then reads for every use, then reserves
the allowed ones and commits: two round trips for the batch instead of two per use. A key
has at most one use in a batch (ring 1 holds the others back), and so has an event id
(`_take_batch`: the second use of an id would not see the first's reservation). A batch
waits for nothing: it takes what is queued when one of a few deciders is free, so a lone
consume is decided at once, and a burst (requests that queued behind a stall of the
machine) drains at a lower cost per use, instead of queueing for connections at a higher
one (bench/results/notes.md).

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
- The decision reads Postgres: it is as available as Postgres, and costs its batch two
  round trips under the locks (three when a key's period is not the one it had last:
  `_decide_batch`). Throughput per (tenant, meter) key is one decision at a time. A
  batch fails or commits as one: a database error answers 503 to every use in it. And
  a batch waits for all its locks: a key another API process is deciding delays the
  batch's other uses by that decision (milliseconds).
- A request that goes away while its batch decides (its client disconnected) may leave
  its use reserved and unpublished: the sweeper releases it, as after a failed publish.
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
ID_LOCK_SPACE = 0x7A11_0091  # and of the event ids they reserve
# Where a consume's time goes: waiting for its key's lock in this process, for a decider
# and its pooled connection (queue), the deciding transaction (advisory locks, reads,
# reservations, commit), the publish until acknowledged.
CONSUME_SECONDS = Histogram(
    "tally_api_consume_phase_seconds", "Time of each phase of an entitlement consume",
    ["phase"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 5))
BATCH_SIZE = Histogram("tally_api_consume_batch_uses",
                       "Consumes decided together in one transaction", [],
                       buckets=(1, 2, 4, 8, 16, 32, 64))


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
        self._queue: list[_Use] = []  # uses waiting for a batch (`_take_batch`)
        self._deciders: set[asyncio.Task[None]] = set()

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
        """Check and record as one step (module docstring, steps 1 to 4): decided in a
        batch (`_decide_batch`), then published."""
        catalog, unique = self._spec(meter, dimensions)
        use = _Use(tenant, meter, quantity, event_id, unique, KINDS[catalog.meters[meter]
                   .aggregation], catalog, asyncio.get_running_loop().create_future())
        started = time.perf_counter()
        async with self._lock(tenant, meter):
            self._queue.append(use)
            if len(self._deciders) < _DECIDERS:
                self._deciders.add(asyncio.create_task(self._decide_queued()))
            decision, event_time = await use.done
        decided = time.perf_counter()
        CONSUME_SECONDS.labels("queue").observe(use.taken - started)
        CONSUME_SECONDS.labels("decide").observe(decided - use.taken)
        if decision.allowed:
            try:
                await self._publish(tenant, meter, quantity, event_id, event_time, dimensions)
            except Exception as e:
                raise Unavailable(
                    f"the use was allowed and reserved, but publishing its event failed "
                    f"({e}): consume again with the same id to complete it") from e
            CONSUME_SECONDS.labels("publish").observe(time.perf_counter() - decided)
        return decision

    async def _decide_queued(self) -> None:
        """Decide batches of the queued uses until none is left (one of `_DECIDERS`).

        It leaves `_deciders` in the same step as it finds the queue empty: removed by a
        done-callback instead (a loop turn later), a use queued in between by a consume
        that counted it as running would wait with no decider left to take it."""
        try:
            await self._decide_batches()
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._deciders.discard(task)

    async def _decide_batches(self) -> None:
        while batch := _take_batch(self._queue, _BATCH_MAX):
            try:
                results = await self._decide_batch(batch)
            except asyncio.CancelledError:
                for use in batch:
                    use.done.cancel()
                raise
            except Exception as e:
                for use in batch:
                    if not use.done.done():
                        use.done.set_exception(e)
                continue
            for use, result in zip(batch, results, strict=True):
                if not use.done.done():
                    use.done.set_result(result)

    async def _decide_batch(self, batch: list[_Use]) -> list[tuple[Decision, datetime]]:
        """Each use's decision and its event's time, in one transaction of two round
        trips, each ONE text of statements sent as one simple query (the client cursor
        binds each use's parameters into it): BEGIN, the advisory locks (`lock_all`), and
        each use's reservation lookup, plan reads and usage read; then the reservations
        and COMMIT. Each statement of a text reads its own snapshot, so the reads see
        every decision committed before the locks were granted. Every statement sent
        costs the API Python work (psycopg's pipeline mode spent most of a consume's CPU
        on it): so the usage is read for the period the key had last time (or the
        calendar month) before the plan reads say which period it is; for a key they say
        another, it is read again. The statements are server-side prepared once per
        connection (`_STATEMENTS`): a simple query is otherwise parsed and planned each
        time, which doubled Postgres's CPU per consume."""
        BATCH_SIZE.observe(len(batch))
        async with self._connect() as conn:
            taken = time.perf_counter()
            now = self._clock()
            params = []
            for use in batch:
                use.taken = taken
                guess = self._period_guess(use.tenant, use.meter, now)
                params.append({**_params(use.tenant, use.meter, guess, use.event_id,
                                         use.unique),
                               "at": now, "q": use.quantity})
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
                await cur.execute("; ".join((
                    "BEGIN", cur.mogrify(_EXECUTE["lock_all"], _advisory_locks(batch)),
                    *(cur.mogrify(_READS[use.kind.name], p)
                      for use, p in zip(batch, params, strict=True)))))
                reads = []
                for i, use in enumerate(batch):
                    # after BEGIN and the locks for the first use; then one result apart
                    earlier = _reserved_at(await _next_row(cur, 2 if i == 0 else 1))
                    subscription = await _next_row(cur, 1, class_row(queries.SubscriptionRow))
                    usage = await _next_rows(cur, class_row(queries.PeriodUsage))
                    reads.append(_Read(earlier, plan_at(use.catalog, use.tenant, now,
                                                        subscription, usage, use.meter),
                                       _used_of(await _next_row(cur, 1))))
                moved = [(read, p, use) for read, p, use in zip(reads, params, batch, strict=True)
                         if read.standing.period != Period(p["s"], p["e"])]
                if moved:  # read again, for the period it is
                    for read, p, use in moved:
                        self._remember_period(use.tenant, use.meter, read.standing.period)
                        p.update(s=read.standing.period.start, e=read.standing.period.end)
                    await cur.execute("; ".join(cur.mogrify(_EXECUTE[f"used_{use.kind.name}"],
                                                            p) for _, p, use in moved))
                    for i, (read, _, _) in enumerate(moved):
                        read.used = _used_of(await _next_row(cur, 0 if i == 0 else 1))
                results = []
                reserve = []
                for use, p, read in zip(batch, params, reads, strict=True):
                    if read.earlier is not None:  # reserved before: allowed, at its first time
                        results.append((_duplicate(
                            _decide(use.kind, read.standing, use.meter, use.quantity,
                                    replace(read.used, counted=False)),
                            use.quantity, use.event_id), read.earlier))
                        continue
                    decision = _decide(use.kind, read.standing, use.meter, use.quantity,
                                       read.used, use.event_id)
                    results.append((decision, now))
                    if decision.allowed and not decision.duplicate:
                        reserve.append(cur.mogrify(_EXECUTE["reserve"], p))
                await cur.execute("; ".join((*reserve, "COMMIT")))
            except BaseException:
                if conn.info.transaction_status in (TransactionStatus.INTRANS,
                                                    TransactionStatus.INERROR):
                    with contextlib.suppress(psycopg.Error):  # the pool then discards it
                        await conn.rollback()
                raise
        return results

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


@dataclass
class _Read:
    """What a batch's first round trip read for one use."""

    earlier: datetime | None  # the time of the use's reservation, if its id has one
    standing: TenantPlan
    used: _Used


@dataclass(eq=False)
class _Use:
    """One consume waiting for its batch's decision, or in it."""

    tenant: str
    meter: str
    quantity: Decimal
    event_id: str
    unique: str | None
    kind: MeterKind
    catalog: Catalog
    done: asyncio.Future[tuple[Decision, datetime]]
    taken: float = 0.0  # when a batch took it (time.perf_counter)


def _advisory_locks(batch: list[_Use]) -> dict[str, list[Any]]:
    """The advisory locks a batch's transaction takes (`lock_all`): each use's key, and its
    event id (module docstring)."""
    spaces: list[int] = []
    keys: list[str] = []
    for use in batch:
        spaces += (LOCK_SPACE, ID_LOCK_SPACE)
        keys += (f"{use.tenant}/{use.meter}", f"{use.tenant}/{use.event_id}")
    return {"spaces": spaces, "keys": keys}


def _take_batch(queue: list[_Use], limit: int) -> list[_Use]:
    """The queued uses to decide together, first come first, up to `limit`: at most one
    per key and one per event id (module docstring); the others stay queued, in order.
    Uses whose request is gone (cancelled) are dropped."""
    batch: list[_Use] = []
    taken: set[tuple[str, str]] = set()
    rest: list[_Use] = []
    for use in queue:
        if use.done.done():
            continue
        key, id_ = (use.tenant, "m:" + use.meter), (use.tenant, "i:" + use.event_id)
        if len(batch) < limit and key not in taken and id_ not in taken:
            batch.append(use)
            taken.update((key, id_))
        else:
            rest.append(use)
    queue[:] = rest
    return batch


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
    # Every key's lock, in the order of the locks themselves (their hashes): two batches
    # needing the same locks take them in the same order, so neither waits for the other
    # while holding what the other waits for.
    "lock_all": "SELECT count(pg_advisory_xact_lock(space, h)) FROM (SELECT DISTINCT space,"
                " hashtext(k) AS h FROM unnest(%(spaces)s::int[], %(keys)s::text[])"
                " AS lock(space, k) ORDER BY space, h) AS ordered",
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
# What the first round trip of a batch reads for each use, by its meter's kind (results
# in this order; `_decide_batch`).
_READS = {name: "; ".join((
    _EXECUTE["touch"], _EXECUTE["subscription"], _EXECUTE["usage_at"],
    _EXECUTE[f"used_{name}"])) for name in KINDS}
# Deciders at a time per API process, each with its batch's connection: a lone consume
# finds one free and is decided at once; when all are busy, what arrives meanwhile queues
# for the next batch. Few: a batch costs about what one use does, and the machine's cores
# run Postgres too.
_DECIDERS = 4
_BATCH_MAX = 64  # uses per batch: its texts stay small
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
