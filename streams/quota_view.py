"""QuotaView: a service's local, always-current copy of `tally.quota-state`.

A service embeds one `QuotaView`, starts it, and asks `check(tenant, meter)` before doing
metered work. The answer is computed in memory, synchronously, in about a microsecond: no
network round trip sits between a request and its quota decision.

    async with QuotaView(settings) as view:
        await view.wait_ready(timeout=10)
        decision = view.check("tenant-42", "api_calls")
        if not decision.allowed: ...

How it stays current
- It reads every partition of the compacted quota-state topic from the beginning and keeps
  following it (a background task; no consumer group, so every instance sees every key).
- `ready` is set once it has caught up: after a fetch came back empty. The broker's end
  offsets are not used for this: the embedded broker under-reports them (DESIGN.md).
- Records are decoded and validated once, when they arrive (`apply`); each key keeps a
  precomputed entry, so `check` does a dict lookup and a comparison, no pydantic, no JSON.
- If the consumer fails, the view keeps answering from what it has, logs, and reconnects
  from the beginning after a pause (re-reading a compacted topic is idempotent: the latest
  value of a key wins). `staleness` tells how long it has been since it last heard from
  the broker.

Decision rules (`check`)
- no state for the key: the configured policy (`on_unknown`, default "allow"), reason
  "no quota state yet" — a tenant that never used the meter has used nothing;
- state `blocked`: not allowed;
- otherwise allowed iff used + quantity <= limit (`domain.quota.check`; limit None is
  unlimited);
- the state's period has ended: the new period has no usage yet, so the state is judged
  with used = 0 against the last known limit. Without this, a blocked tenant would stay
  blocked forever, because a service that denies every call sends no usage that would let
  the worker write the new period's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import re
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar

from aiokafka import TopicPartition
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from domain import quota
from runtime import kafka
from runtime.settings import Settings
from schemas.events import NAME_PATTERN, check_tenant
from schemas.records import QuotaState
from schemas.validation import quantity_of
from streams.errors import StreamsError

log = logging.getLogger(__name__)

UnknownPolicy = Literal["allow", "deny"]
P = ParamSpec("P")
R = TypeVar("R")

REASON_UNKNOWN = "no quota state yet"
REASON_NOT_READY = "quota view not caught up yet"
REASON_NEW_PERIOD = "period ended; no usage recorded in the new period yet"

_ONE = Decimal(1)
_ZERO = Decimal(0)

RECORDS = Counter("tally_quota_view_records_total", "Quota-state records applied by QuotaViews",
                  ["outcome"])
KEYS = Gauge("tally_quota_view_keys", "Tenant/meter keys held by QuotaViews in this process")


class QuotaViewError(StreamsError):
    """The quota view could not do what was asked (e.g. catch up in time)."""


class QuotaExceeded(StreamsError):
    """A guarded call was refused: the tenant may not use more of the meter."""

    def __init__(self, tenant: str, meter: str, decision: QuotaDecision) -> None:
        super().__init__(f"quota exceeded for {tenant}/{meter}: {decision.reason}")
        self.tenant = tenant
        self.meter = meter
        self.decision = decision


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """May a tenant use `quantity` more of a meter, and why.

    `remaining`: units left under the hard limit after this use when allowed, before it
    when refused; None when there is no hard limit or no state. `state`: the quota-state
    record the decision rests on (None when there is none).
    """

    allowed: bool
    reason: str
    remaining: Decimal | None
    state: QuotaState | None

    def to_json(self) -> dict[str, Any]:
        """The decision as the worker's `GET /quota/{tenant}/{meter}` answers it."""
        s = self.state
        return {
            "allowed": self.allowed,
            "reason": self.reason,
            "remaining": self.remaining,
            "state": s.state if s else None,
            "used": s.used if s else None,
            "limit": s.limit if s else None,
            "period_end": s.period_end.isoformat() if s else None,
        }


@dataclass(frozen=True)
class Staleness:
    """How current the view is.

    `seconds_since_fetch`: since the consumer last heard from the broker (a fetch that
    returned, with or without records); a large value means the view is cut off and its
    answers may be old. `last_record_age`: since the broker appended the newest record
    applied (its Kafka timestamp); large values are normal when nothing is changing.
    """

    ready: bool
    keys: int
    records_applied: int
    seconds_since_fetch: float | None
    last_record_age: float | None
    last_error: str | None


class _Entry:
    """One key's state, with everything `check` needs precomputed."""

    __slots__ = ("blocked", "limit", "next_period_one", "one", "period_end", "state", "used")

    def __init__(self, state: QuotaState) -> None:
        self.state = state
        self.used = state.used
        self.limit = state.limit
        self.blocked = state.state == "blocked"
        self.period_end = state.period_end.timestamp()
        # The decision for the default quantity of 1, and the same in a fresh period: the
        # answers to almost every call, computed once per record instead of once per call.
        self.one = self.decide(_ONE)
        self.next_period_one = self.decide_new_period(_ONE)

    def decide(self, quantity: Decimal | int) -> QuotaDecision:
        if self.blocked:
            reason = f"blocked: hard limit {self.limit} reached ({self.used} used)"
            left = _ZERO if self.limit is None else max(self.limit - self.used, _ZERO)
            return QuotaDecision(False, reason, left, self.state)
        d = quota.check(self.used, self.limit, Decimal(quantity))
        return QuotaDecision(d.allowed, d.reason, d.remaining, self.state)

    def decide_new_period(self, quantity: Decimal | int) -> QuotaDecision:
        d = quota.check(_ZERO, self.limit, Decimal(quantity))
        reason = REASON_NEW_PERIOD if d.allowed else d.reason
        return QuotaDecision(d.allowed, reason, d.remaining, self.state)


class QuotaView:
    """In-memory, continuously followed copy of the quota-state topic; see module docs.

    `on_unknown`: the answer for a tenant/meter without any state ("allow": a tenant that
    never used a meter has used nothing; "deny": fail closed, e.g. for costly meters).
    `clock`: wall-clock seconds, used to notice that a state's period has ended.
    `fetch_wait_ms`: how long the broker may hold a fetch waiting for new records; it
    bounds how late the view sees a change, so keep it well under a second.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        on_unknown: UnknownPolicy = "allow",
        clock: Callable[[], float] = time.time,
        fetch_wait_ms: int = 100,
        retry_seconds: float = 2.0,
    ) -> None:
        self.settings = settings
        self.topic = settings.topics.quota_state
        self.on_unknown: UnknownPolicy = on_unknown
        self._clock = clock
        self._fetch_wait_ms = fetch_wait_ms
        self._retry_seconds = retry_seconds
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._keys_of_tenant: dict[str, int] = {}  # how many entries each tenant has
        self._ready = asyncio.Event()
        self._unknown = QuotaDecision(on_unknown == "allow", REASON_UNKNOWN, None, None)
        self._not_ready = QuotaDecision(on_unknown == "allow", REASON_NOT_READY, None, None)
        self._task: asyncio.Task[None] | None = None
        self._records_applied = 0
        self._last_fetch: float | None = None  # monotonic
        self._last_record_ts: float | None = None  # Kafka timestamp, seconds
        self._last_error: str | None = None

    # --- the hot path ------------------------------------------------------------------

    def check(self, tenant: str, meter: str, quantity: Decimal | int = 1) -> QuotaDecision:
        """May `tenant` use `quantity` more of `meter`? Local and synchronous."""
        entry = self._entries.get((tenant, meter))
        if entry is None:
            return self._unknown if self._ready.is_set() else self._not_ready
        if self._clock() >= entry.period_end:
            return entry.next_period_one if quantity == 1 else entry.decide_new_period(quantity)
        return entry.one if quantity == 1 else entry.decide(quantity)

    def state(self, tenant: str, meter: str) -> QuotaState | None:
        """The latest quota-state record of a tenant and meter, if any."""
        entry = self._entries.get((tenant, meter))
        return entry.state if entry else None

    def knows_tenant(self, tenant: str) -> bool:
        """Whether the view holds a quota state of `tenant` for any meter."""
        return tenant in self._keys_of_tenant

    # --- loading -----------------------------------------------------------------------

    def apply(self, key: str, value: bytes | None) -> None:
        """Apply one quota-state record (the consumer's path; also for tests and benches).

        A tombstone (None) forgets the key. A record that does not match the contract is
        logged, counted and skipped: the previous state of the key stays in force.
        """
        if value is None:
            tenant, _, meter = key.rpartition("/")
            if self._entries.pop((tenant, meter), None) is not None:
                KEYS.dec()
                self._count_key(tenant, -1)
            RECORDS.labels("deleted").inc()
            return
        try:
            state = QuotaState.model_validate_json(value)
        except ValidationError as e:
            RECORDS.labels("invalid").inc()
            log.error("ignoring invalid quota-state record %r: %s", key, e)
            return
        k = (state.tenant_id, state.meter)
        if k not in self._entries:
            KEYS.inc()
            self._count_key(state.tenant_id, 1)
        self._entries[k] = _Entry(state)
        self._records_applied += 1
        RECORDS.labels("applied").inc()

    def _count_key(self, tenant: str, change: int) -> None:
        left = self._keys_of_tenant.get(tenant, 0) + change
        if left:
            self._keys_of_tenant[tenant] = left
        else:
            self._keys_of_tenant.pop(tenant, None)

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once the view has read the topic to its end at least once."""
        return self._ready.is_set()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the view has caught up; QuotaViewError after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError as e:
            raise QuotaViewError(
                f"quota view not caught up with {self.topic} after {timeout}s "
                f"(last error: {self._last_error})"
            ) from e

    @property
    def staleness(self) -> Staleness:
        """How current the view is; see `Staleness`."""
        since_fetch = (None if self._last_fetch is None
                       else time.monotonic() - self._last_fetch)
        record_age = (None if self._last_record_ts is None
                      else max(self._clock() - self._last_record_ts, 0.0))
        return Staleness(self.ready, len(self._entries), self._records_applied, since_fetch,
                         record_age, self._last_error)

    async def start(self) -> None:
        """Start following the topic in a background task (returns at once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"quota-view:{self.topic}")

    async def stop(self) -> None:
        """Stop following; the view keeps answering from what it has."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> QuotaView:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def run(self) -> None:
        """Follow the topic until cancelled, reconnecting after failures.

        For hosts that run their own tasks (the Faust worker); others use start()/stop().
        """
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # Answers from the last known states beat no answers; staleness shows it.
                self._last_error = repr(e)
                log.warning("quota view lost %s (%r); retrying in %.1fs", self.topic, e,
                            self._retry_seconds)
                await asyncio.sleep(self._retry_seconds)

    async def _follow(self) -> None:
        consumer = kafka.consumer(self.settings, fetch_max_wait_ms=self._fetch_wait_ms)
        await consumer.start()
        try:
            partitions = await self._partitions(consumer)
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                self._last_fetch = time.monotonic()
                self._last_error = None
                for records in batches.values():
                    for r in records:
                        self.apply(r.key.decode() if r.key else "", r.value)
                        self._last_record_ts = r.timestamp / 1000
                if not batches and not self._ready.is_set():
                    # Caught up: a fetch found nothing more (end offsets are not trusted).
                    self._ready.set()
                    log.info("quota view caught up: %d keys", len(self._entries))
        finally:
            await consumer.stop()

    async def _partitions(self, consumer: Any) -> set[int]:
        """The topic's partitions, waiting for it to exist (services may start first)."""
        waited = 0.0
        while True:
            await consumer.topics()  # refreshes the cluster metadata
            partitions: set[int] | None = consumer.partitions_for_topic(self.topic)
            if partitions:
                return partitions
            if waited % 10 == 0:
                log.warning("topic %s does not exist yet; waiting", self.topic)
            await asyncio.sleep(0.5)
            waited += 0.5


MAX_QUANTITY_TEXT = 64
QUOTA_QUERY_PARAMETERS = ("quantity",)


def _shown(text: str) -> str:
    return repr(text if len(text) <= MAX_QUANTITY_TEXT else text[:MAX_QUANTITY_TEXT] + "...")


def parse_quantity(text: str | None) -> Decimal:
    """A `?quantity=` value, 1 when absent: a positive quantity as every stage accepts it
    (schemas/validation.py: JSON's number grammar, at most 1e15 and 12 digits after the
    point, so no answer needs arithmetic beyond the decimal context); ValueError otherwise."""
    if text is None or text == "":
        return _ONE
    try:
        value = quantity_of(text[:MAX_QUANTITY_TEXT + 1])
    except ValueError as e:
        raise ValueError(f"{e}, not {_shown(text)}") from None
    if len(text) > MAX_QUANTITY_TEXT or value <= 0:
        raise ValueError(f"quantity must be a positive number such as 25 or 0.5, "
                         f"not {_shown(text)}")
    return value


def parse_quota_query(tenant: str, meter: str,
                      query: Iterable[tuple[str, str]]) -> Decimal:
    """The quantity of a `GET /quota/{tenant}/{meter}?quantity=` request; ValueError naming
    every problem: a tenant or meter that cannot exist, an unknown or repeated parameter,
    a bad quantity (an unnoticed typo, `?quantiy=5`, would answer for 1)."""
    problems: list[str] = []
    try:
        check_tenant(tenant)
    except ValueError as e:
        problems.append(f"{_shown(tenant)} is not a tenant id: {e}")
    if not re.fullmatch(NAME_PATTERN, meter):
        problems.append(f"{_shown(meter)} is not a meter name ({NAME_PATTERN})")
    values: dict[str, list[str]] = {}
    for name, value in query:
        values.setdefault(name, []).append(value)
    unknown = [_shown(name) for name in values if name not in QUOTA_QUERY_PARAMETERS]
    if unknown:
        problems.append(f"unknown query parameters {', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''}; the only one is quantity")
    quantities = values.get("quantity", [])
    quantity = _ONE
    if len(quantities) > 1:
        problems.append("quantity is given more than once")
    elif quantities:
        try:
            quantity = parse_quantity(quantities[0])
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))
    return quantity


def quota_guard(
    view: QuotaView, meter: str, tenant_arg: str = "tenant", quantity: Decimal | int = 1,
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Guard an async function: raise QuotaExceeded instead of running it over quota.

        @quota_guard(view, "executions")
        async def run_job(tenant: str, job: Job) -> Result: ...

    The tenant is the argument named `tenant_arg` (positional or keyword). The check runs
    before the call; recording the usage is still the function's (or the SDK's) job.
    """

    def decorate(
        fn: Callable[P, Coroutine[Any, Any, R]],
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        params = list(inspect.signature(fn).parameters.values())
        names = [p.name for p in params]
        if tenant_arg not in names:
            raise TypeError(f"{fn.__qualname__} has no argument {tenant_arg!r} to guard by")
        # Resolved once here, so a call costs a tuple index, not a signature bind.
        position = names.index(tenant_arg)
        default = params[position].default

        @functools.wraps(fn)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            if tenant_arg in kwargs:
                tenant = kwargs[tenant_arg]
            elif position < len(args):
                tenant = args[position]
            elif default is not inspect.Parameter.empty:
                tenant = default
            else:
                raise TypeError(f"{fn.__qualname__}() missing argument {tenant_arg!r}")
            decision = view.check(str(tenant), meter, quantity)
            if not decision.allowed:
                raise QuotaExceeded(str(tenant), meter, decision)
            return await fn(*args, **kwargs)

        return guarded

    return decorate
