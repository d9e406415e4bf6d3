"""The producer SDK: how a service publishes usage and subscription events to Tally.

    async with UsageProducer(settings, ProducerOptions(source="svc/api-gateway",
                                                      spool_dir=Path("/var/spool/tally"))) as p:
        await p.record("tenant-42", "api_calls", 1, dimensions={"endpoint": "/v1/x"})

What happens to an event, and what is guaranteed at each step:

1. **Validate at the call site.** `record` builds the wire form of the event and raises
   `InvalidEventError` listing every problem. The rules are those of `schemas.events.
   UsageEvent`: common, obviously-valid input takes a fast path that checks the same rules
   without building the model (`build_usage_event`; tests/producers/test_validation.py
   proves with hypothesis that both agree); anything else is validated by the model itself.
2. **Batch per tenant.** Events of one tenant and topic are buffered into one record
   (`application/cloudevents-batch+json`, key = tenant) until it holds `max_batch_events`
   events, would exceed `max_batch_bytes`, or is `linger_ms` old.
3. **Bounded memory.** At most `max_buffered_events` events wait in memory; `record`
   awaits (backpressure) until acknowledgements or spool writes make room.
4. **Deliver with acks=all.** Kafka acknowledges a record once all in-sync replicas have
   it. aiokafka retries retriable errors with `retry_backoff_ms` until
   `delivery_timeout_ms`; there is no idempotent producer (the embedded broker lacks it),
   so a retry may write a record twice — safe, because consumers dedup by (tenant, event
   id) (DESIGN.md guarantee 1). Callers retrying after an error must reuse the event id.
5. **Spool what cannot be delivered.** A record not acknowledged in time is appended to
   the local spool (`producers.spool`) before its memory is released, and the producer
   switches to spooling every later record too, so the spool keeps the order in which
   records were sealed. A background task reconnects with exponential backoff, replays the
   spool oldest first, and only then resumes direct sends (see `_replay`). A new producer
   on the same spool directory replays what an earlier process left. A replayed record
   keeps its original Kafka timestamp (the time its batch was sealed). The spool's disk
   use is bounded (`spool_max_bytes`): once it holds that much, `record` raises
   `SpoolFullError` for new events until a replay makes room, so an event is either taken
   (and then delivered or spooled) or refused at the call site, never dropped later.
6. **flush / close** return once everything recorded before the call is acknowledged or
   spooled (and a replay under way, if the broker is reachable, has finished).

Without a spool directory, records that cannot be delivered are counted
(`tally_producer_events_failed_total`) and reported by the next `flush`/`close` as
`DeliveryError`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import threading
import time as _time
from collections import deque
from collections.abc import Coroutine, Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeVar
from uuid import UUID

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from producers import metrics
from producers.errors import (
    DeliveryError,
    InvalidEventError,
    PayloadTooLargeError,
    Problem,
    ProducerClosedError,
    ProducerError,
    ProducerUnavailableError,
    SpoolFullError,
)
from producers.spool import FsyncPolicy, Spool, SpooledRecord
from runtime import kafka
from runtime.settings import Settings
from schemas import codec
from schemas.events import (
    MAX_QUANTITY,
    NAME_PATTERN,
    TENANT_PATTERN,
    USAGE_TYPE,
    SubscriptionEvent,
    UsageEvent,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
SubscriptionKind = Literal["created", "plan_changed", "canceled", "renewed"]
TallyEvent = UsageEvent | SubscriptionEvent

# ---------------------------------------------------------------------------------------
# Event ids: UUIDv7 (RFC 9562), which Python 3.11's uuid module lacks.
# ---------------------------------------------------------------------------------------

_VARIANT = 0b10 << 62
_HEX3 = [f"{i:03x}" for i in range(0x1000)]


class _UUID7:
    """UUIDv7 generator: 48-bit Unix ms, 12-bit sequence counter, 62 random bits.

    Ids from one thread sort in creation order (RFC 9562 method 1: the counter is seeded
    randomly each millisecond and, on overflow, borrows the next millisecond). Uniqueness
    rests on the 62 random bits. They come from a private Mersenne Twister seeded from
    os.urandom, reseeded in a forked child so parent and child never share a stream:
    event ids must be unique, not unguessable, and os.urandom per id costs a syscall.
    No lock: threads racing here may share a counter value, never the random bits.
    """

    def __init__(self) -> None:
        self._rng = random.Random()
        self._last_ms = -1
        self._counter = 0
        self._prefix = ""  # "tttttttt-tttt-7" for _last_ms

    def reseed(self) -> None:
        self._rng.seed()

    def _set_ms(self, ms: int) -> None:
        self._last_ms = ms
        h = f"{ms & 0xFFFF_FFFF_FFFF:012x}"
        self._prefix = f"{h[:8]}-{h[8:]}-7"

    def next_str(self) -> str:
        ms = _time.time_ns() // 1_000_000
        if ms > self._last_ms:
            self._set_ms(ms)
            self._counter = self._rng.getrandbits(11)  # top bit clear: room to count up
        else:
            self._counter += 1
            if self._counter > 0xFFF:
                self._set_ms(self._last_ms + 1)
                self._counter = 0
        # Variant bits 0b10, then 62 random bits: "vrrr-rrrrrrrrrrrr" (hex with a dash
        # 6 bytes from the right is the fastest formatting CPython offers here).
        tail = (_VARIANT | self._rng.getrandbits(62)).to_bytes(8, "big").hex("-", 6)
        return f"{self._prefix}{_HEX3[self._counter]}-{tail}"


_GENERATOR = _UUID7()
os.register_at_fork(after_in_child=_GENERATOR.reseed)


def uuid7() -> UUID:
    """A new UUIDv7: time-ordered, unique."""
    return UUID(_GENERATOR.next_str())


def new_event_id() -> str:
    """A new event id: the canonical text of a UUIDv7 (what `record` uses by default)."""
    return _GENERATOR.next_str()


class _UtcClock:
    """Now, to the millisecond, as the text the UsageEvent model writes for it, cheaply.

    Default event times have millisecond precision (like the UUIDv7 event id), so the text
    changes once per ms, not per event: at 150k events/s that saves a format per event.
    The model writes the fraction as 6 digits, and none at all when it is zero.
    """

    def __init__(self) -> None:
        self._ms = -1
        self._second = -1
        self._prefix = ""
        self._text = ""

    def now_text(self) -> str:
        ms = _time.time_ns() // 1_000_000
        if ms != self._ms:
            self._ms = ms
            second, milli = divmod(ms, 1000)
            if second != self._second:
                self._second = second
                self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._text = f"{self._prefix}.{milli:03d}000Z" if milli else f"{self._prefix}Z"
        return self._text


_CLOCK = _UtcClock()


# ---------------------------------------------------------------------------------------
# Validation: the UsageEvent model's rules, with a fast path for plain input.
# ---------------------------------------------------------------------------------------

_NAME_RE = re.compile(NAME_PATTERN)
_MAX_INT_QUANTITY = int(MAX_QUANTITY)
_MAX_FLOAT_QUANTITY = float(MAX_QUANTITY)
_KNOWN_CACHE_SIZE = 65_536
_known_tenants: set[str] = set()
_known_meters: set[str] = set()

# Field paths of the models, named as the SDK's parameters.
_USAGE_FIELDS = {
    "subject": "tenant", "id": "event_id", "time": "time", "source": "source",
    "data.meter": "meter", "data.quantity": "quantity", "data.dimensions": "dimensions",
}
_SUBSCRIPTION_FIELDS = {"subject": "tenant", "id": "event_id", "time": "time",
                        "source": "source"}


def _remember(known: set[str], value: str) -> None:
    if len(known) >= _KNOWN_CACHE_SIZE:  # bounded (DESIGN.md guarantee 5)
        known.clear()
    known.add(value)


def _fast_usage_event(
    tenant: object, meter: object, quantity: object, dimensions: object,
    event_id: object, time: object, source: str,
) -> dict[str, Any] | None:
    """The wire form of a usage event if the input is plain and valid, else None.

    Plain means exact builtin types (str, int, float, Decimal, dict, UTC datetime). Returns
    exactly `UsageEvent(...).model_dump(mode="json")` for such input; None sends the
    caller to the model, which decides (and explains) everything else.
    """
    if type(tenant) is not str or type(meter) is not str:
        return None
    if tenant not in _known_tenants:
        # Same check as the model's (schemas.events._check_tenant).
        if not TENANT_PATTERN.fullmatch(tenant):
            return None
        _remember(_known_tenants, tenant)
    if meter not in _known_meters:
        # fullmatch: the model's pattern is anchored at the true end of the text.
        if not _NAME_RE.fullmatch(meter):
            return None
        _remember(_known_meters, meter)

    qtype = type(quantity)
    if qtype is int:
        if not 0 <= quantity <= _MAX_INT_QUANTITY:  # type: ignore[operator]
            return None
        amount = str(quantity)
    elif qtype is Decimal:
        q: Decimal = quantity  # type: ignore[assignment]
        if not (q.is_finite() and 0 <= q <= MAX_QUANTITY):
            return None
        amount = str(q)
    elif qtype is float:
        # NaN fails both comparisons; the model reads a float through its repr.
        if not 0.0 <= quantity <= _MAX_FLOAT_QUANTITY:  # type: ignore[operator]
            return None
        amount = str(Decimal(repr(quantity)))
    else:
        return None

    if dimensions is None:
        dims: dict[str, str] = {}
    elif type(dimensions) is dict and len(dimensions) <= 32:
        for k, v in dimensions.items():
            if type(k) is not str or type(v) is not str or len(k) > 64 or len(v) > 256:
                return None
        dims = dimensions
    else:
        return None

    if event_id is None:
        eid = new_event_id()
    elif type(event_id) is str and 0 < len(event_id) <= 128:
        eid = event_id
    else:
        return None

    if time is None:
        stamp = _CLOCK.now_text()
    elif type(time) is datetime and time.tzinfo is UTC:
        # isoformat of a UTC datetime ends in "+00:00"; the model writes "Z".
        stamp = time.isoformat()[:-6] + "Z"
    else:
        return None

    return {
        "specversion": "1.0",
        "id": eid,
        "source": source,
        "subject": tenant,
        "time": stamp,
        "datacontenttype": "application/json",
        "type": USAGE_TYPE,
        "data": {"meter": meter, "quantity": amount, "dimensions": dims},
    }


def _problems(error: ValidationError, names: Mapping[str, str]) -> list[Problem]:
    found = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        path = ".".join(loc)
        for prefix in sorted(names, key=len, reverse=True):
            if path == prefix or path.startswith(prefix + "."):
                path = names[prefix] + path[len(prefix) :]
                break
        if path.startswith("data."):
            path = path[len("data.") :]
        found.append(Problem(path, item["msg"]))
    return found


def build_usage_event(
    tenant: str, meter: str, quantity: int | float | Decimal | str, *,
    dimensions: Mapping[str, str] | None = None, event_id: str | None = None,
    time: datetime | None = None, source: str,
) -> dict[str, Any]:
    """The wire form of a usage event (as `UsageEvent.model_dump(mode="json")`).

    `dimensions=None` means no dimensions, `event_id=None` a new UUIDv7, `time=None` now
    (to the millisecond).
    Raises InvalidEventError naming every problem.
    """
    fast = _fast_usage_event(tenant, meter, quantity, dimensions, event_id, time, source)
    if fast is not None:
        return fast
    data: dict[str, Any] = {"meter": meter, "quantity": quantity}
    if dimensions is not None:
        data["dimensions"] = dimensions
    try:
        event = UsageEvent.model_validate(
            {
                "specversion": "1.0",
                "id": new_event_id() if event_id is None else event_id,
                "source": source,
                "subject": tenant,
                "time": datetime.now(UTC) if time is None else time,
                "datacontenttype": "application/json",
                "type": USAGE_TYPE,
                "data": data,
            }
        )
    except ValidationError as e:
        raise InvalidEventError(_problems(e, _USAGE_FIELDS)) from None
    return event.model_dump(mode="json")


def build_subscription_event(
    kind: SubscriptionKind, tenant: str, plan_id: str, period_start: datetime,
    period_end: datetime, *, source: str, stripe_customer_id: str | None = None,
    stripe_subscription_id: str | None = None, cancel_at_period_end: bool | None = None,
    trial_end: datetime | None = None, event_id: str | None = None,
    time: datetime | None = None,
) -> dict[str, Any]:
    """The wire form of a `tally.subscription.<kind>.v1` event; InvalidEventError if invalid."""
    try:
        event = SubscriptionEvent.model_validate(
            {
                "specversion": "1.0",
                "id": new_event_id() if event_id is None else event_id,
                "source": source,
                "subject": tenant,
                "time": datetime.now(UTC) if time is None else time,
                "datacontenttype": "application/json",
                "type": f"tally.subscription.{kind}.v1",
                "data": {
                    "plan_id": plan_id, "period_start": period_start, "period_end": period_end,
                    "stripe_customer_id": stripe_customer_id,
                    "stripe_subscription_id": stripe_subscription_id,
                    "cancel_at_period_end": cancel_at_period_end, "trial_end": trial_end,
                },
            }
        )
    except ValidationError as e:
        raise InvalidEventError(_problems(e, _SUBSCRIPTION_FIELDS)) from None
    return event.model_dump(mode="json")


# ---------------------------------------------------------------------------------------
# The producer
# ---------------------------------------------------------------------------------------


class ProducerOptions(BaseModel):
    """How a producer batches, delivers and spools. Defaults suit a service in production."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(default="tally/sdk", min_length=1, max_length=256)
    """CloudEvents `source` of every event this producer builds, e.g. "svc/api-gateway"."""
    max_batch_events: int = Field(default=500, ge=1)
    max_batch_bytes: int = Field(default=900_000, ge=1024)
    """Bound on a record value; stays under the broker's 1 MiB default message size."""
    linger_ms: float = Field(default=20, ge=0)
    max_buffered_events: int = Field(default=100_000, ge=1)
    spool_dir: Path | None = None
    spool_fsync: FsyncPolicy = "interval"
    spool_fsync_interval_ms: int = Field(default=100, ge=1)
    spool_segment_bytes: int = Field(default=64 << 20, ge=1)
    spool_max_bytes: int = Field(default=4 << 30, ge=1)
    """Bound on the spool's disk use: once it holds this much, new events are refused with
    SpoolFullError until a replay makes room. Events already taken are always spooled, so
    the spool may pass the bound by what the buffer holds."""
    delivery_timeout_ms: int = Field(default=30_000, ge=100)
    """How long a record may wait for acknowledgement (retries included) before spooling."""
    connect_timeout_ms: int = Field(default=10_000, ge=100)
    retry_backoff_ms: int = Field(default=100, ge=1)
    reconnect_backoff_max_ms: int = Field(default=5_000, ge=1)
    kafka_options: dict[str, Any] = Field(default_factory=dict)
    """Extra aiokafka producer options, over those of `runtime.kafka.producer`."""


_BATCH_HEADERS = codec.content_type_headers(batch=True)
# One event's value; the batch value joins these into a JSON array (see `_sender`).
_encode = codec.dumps
# Errors about the record itself: replaying it again would fail the same way forever.
_POISON = (MessageSizeTooLargeError, CorruptRecordException, InvalidTopicError)
_REPLAY_WINDOW = 256  # records of a segment in flight at once during a replay


class _TopicMetrics:
    __slots__ = ("failed", "recorded", "replayed", "sent", "spooled")

    def __init__(self, topic: str) -> None:
        self.recorded = metrics.EVENTS_RECORDED.labels(topic)
        self.sent = metrics.EVENTS_SENT.labels(topic)
        self.failed = metrics.EVENTS_FAILED.labels(topic)
        self.spooled = metrics.EVENTS_SPOOLED.labels(topic)
        self.replayed = metrics.EVENTS_REPLAYED.labels(topic)


class _Batch:
    """Events of one (topic, tenant) on their way into one record."""

    __slots__ = (
        "count",
        "key",
        "nbytes",
        "parts",
        "sealed",
        "sealed_at",
        "seq",
        "timer",
        "timestamp_ms",
        "value",
        "waiter",
    )

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key
        self.parts: list[bytes] = []
        # Length of "[" + ",".join(parts) + "]": 1 + sum(len(part) + 1).
        self.nbytes = 1
        self.count = 0
        self.sealed = False
        self.seq = 0
        self.sealed_at = 0.0
        self.timestamp_ms = 0
        self.value = b""
        self.timer: asyncio.TimerHandle | None = None
        self.waiter: asyncio.Future[None] | None = None


# A sealed batch travelling from the sender to the completer, with the producer
# generation it was sent on and its delivery future (None: spool it).
_InFlight = tuple[_Batch, int, "asyncio.Future[Any] | None"]


class UsageProducer:
    """Async producer of usage and subscription events (see the module docstring).

    Use as `async with UsageProducer(...) as p:` or call `start()` and `close()`.
    One producer per process is the norm; every method must be called from the event loop
    that started it.
    """

    def __init__(self, settings: Settings, options: ProducerOptions | None = None) -> None:
        self.settings = settings
        self.options = options or ProducerOptions()
        o = self.options
        self.source = o.source
        self._usage_topic = settings.topics.usage
        self._subscriptions_topic = settings.topics.subscriptions
        self._max_events = o.max_batch_events
        self._max_bytes = o.max_batch_bytes
        self._linger = o.linger_ms / 1000
        self._capacity = o.max_buffered_events
        # The room check of `record`; 0 while a spool replay cuts over (see `_replay`).
        self._limit = o.max_buffered_events
        self._buffered = 0
        self._open: dict[tuple[str, str], _Batch] = {}
        self._sealed_seq = 0
        self._finished_seq = 0
        self._pipeline = 0  # sealed batches neither acknowledged nor spooled yet
        self._kafka: AIOKafkaProducer | None = None
        self._generation = 0
        self._connected = False
        # Whether sealed batches go straight to Kafka. False while the broker is away or
        # the spool holds records not yet replayed: then they queue up in the spool.
        self._direct = False
        self._spool: Spool | None = None
        self._spool_full = False  # refuse new events (see ProducerOptions.spool_max_bytes)
        self._lost = 0
        self._state: Literal["new", "open", "closing", "closed"] = "new"
        self._waiters: list[asyncio.Future[None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._recovery: asyncio.Task[None] | None = None
        self._metrics: dict[str, _TopicMetrics] = {}

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> UsageProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the spool, connect to Kafka and start delivering.

        An unreachable broker is not an error when there is a spool: events are spooled
        and replayed once it answers. Without a spool it raises ProducerUnavailableError.
        """
        if self._state != "new":
            raise ProducerError("a producer can be started once")
        self._loop = asyncio.get_running_loop()
        self._sealed: asyncio.Queue[_Batch | None] = asyncio.Queue()
        self._inflight: asyncio.Queue[_InFlight | None] = asyncio.Queue()
        o = self.options
        if o.spool_dir is not None:
            self._spool = Spool(
                o.spool_dir, fsync=o.spool_fsync, fsync_interval_ms=o.spool_fsync_interval_ms,
                segment_bytes=o.spool_segment_bytes,
            )
            self._note_spool_size()
        try:
            await self._connect()
        except ProducerUnavailableError as e:
            if self._spool is None:
                raise
            log.warning("kafka unreachable at start, spooling to %s: %s", o.spool_dir, e)
        self._direct = self._connected and (
            self._spool is None or self._spool.pending_records == 0
        )
        self._tasks = [
            asyncio.create_task(self._sender(), name="tally-producer-sender"),
            asyncio.create_task(self._completer(), name="tally-producer-completer"),
        ]
        if not self._direct:
            self._ensure_recovery()
        self._state = "open"

    async def flush(self, timeout: float | None = None) -> None:
        """Send every buffered event now and wait until each is acknowledged or spooled.

        When the broker is reachable and the spool is being replayed, also wait for the
        replay to finish. Raises DeliveryError if events were lost (possible only without
        a spool) since the last flush, TimeoutError after `timeout` seconds.
        """
        if self._state in ("new", "closed"):
            return
        for batch in list(self._open.values()):
            self._seal(batch)
        target = self._sealed_seq

        def done() -> bool:
            replay_done = self._direct or not self._connected or self._spool is None
            return self._finished_seq >= target and replay_done

        await asyncio.wait_for(self._wait_until(done), timeout)
        if self._lost:
            lost, self._lost = self._lost, 0
            raise DeliveryError(f"{lost} events could be neither delivered nor spooled")

    async def close(self, timeout: float | None = None) -> None:
        """Stop accepting events, flush (see `flush`), and release the connection and spool."""
        if self._state in ("closing", "closed"):
            return
        if self._state == "new":
            self._state = "closed"
            return
        self._state = "closing"
        self._notify()  # wake `record` calls held by backpressure: they now fail
        try:
            await self.flush(timeout)
        finally:
            if self._recovery is not None:
                self._recovery.cancel()
                await asyncio.gather(self._recovery, return_exceptions=True)
            self._sealed.put_nowait(None)
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._retire_kafka()
            if self._spool is not None:
                self._spool.close()
            self._state = "closed"

    # -- publishing ----------------------------------------------------------------------

    async def record(
        self, tenant: str, meter: str, quantity: int | float | Decimal | str, *,
        dimensions: Mapping[str, str] | None = None, event_id: str | None = None,
        time: datetime | None = None,
    ) -> None:
        """Record usage: `quantity` of `meter` by `tenant`, at `time` (default now).

        `event_id` (default: a new UUIDv7) is the idempotency key: retry with the same id
        and the event is counted once. Raises InvalidEventError (every problem listed) or
        PayloadTooLargeError before anything is buffered; awaits while the buffer is full.
        """
        # The hot path (target 150k events/s): the fast check inline, the model when needed.
        event = _fast_usage_event(
            tenant, meter, quantity, dimensions, event_id, time, self.source
        ) or build_usage_event(
            tenant, meter, quantity, dimensions=dimensions, event_id=event_id, time=time,
            source=self.source,
        )
        encoded = _encode(event)
        if self._state != "open" or len(encoded) + 2 > self._max_bytes or (
            self._buffered >= self._limit or self._spool_full
        ):
            await self._admit(encoded)
        batch = self._open.get((self._usage_topic, tenant))
        size = len(encoded) + 1
        if (batch is not None and batch.count + 1 < self._max_events
                and batch.nbytes + size <= self._max_bytes):
            # Common case inlined (it is `_add` when the batch neither seals nor overflows).
            batch.parts.append(encoded)
            batch.nbytes += size
            batch.count += 1
            self._buffered += 1
        elif self._add(self._usage_topic, tenant, encoded).sealed:
            # Let the sender hand the record to Kafka before more events pile up.
            await asyncio.sleep(0)

    async def subscription_event(
        self, kind: SubscriptionKind, tenant: str, plan_id: str, period_start: datetime,
        period_end: datetime, *, stripe_customer_id: str | None = None,
        stripe_subscription_id: str | None = None, cancel_at_period_end: bool | None = None,
        trial_end: datetime | None = None, event_id: str | None = None,
        time: datetime | None = None,
    ) -> None:
        """Publish `tally.subscription.<kind>.v1` to the subscriptions topic."""
        event = build_subscription_event(
            kind, tenant, plan_id, period_start, period_end, source=self.source,
            stripe_customer_id=stripe_customer_id, stripe_subscription_id=stripe_subscription_id,
            cancel_at_period_end=cancel_at_period_end, trial_end=trial_end, event_id=event_id,
            time=time,
        )
        await self._enqueue(self._subscriptions_topic, tenant, _encode(event))

    async def subscription_created(
        self, tenant: str, plan_id: str, period_start: datetime, period_end: datetime,
        **optional: Any,
    ) -> None:
        """A tenant subscribed to `plan_id`. `optional`: the keywords of subscription_event."""
        await self.subscription_event(
            "created", tenant, plan_id, period_start, period_end, **optional
        )

    async def subscription_plan_changed(
        self, tenant: str, plan_id: str, period_start: datetime, period_end: datetime,
        **optional: Any,
    ) -> None:
        """A tenant moved to `plan_id`. `optional`: the keywords of subscription_event."""
        await self.subscription_event(
            "plan_changed", tenant, plan_id, period_start, period_end, **optional
        )

    async def subscription_canceled(
        self, tenant: str, plan_id: str, period_start: datetime, period_end: datetime,
        **optional: Any,
    ) -> None:
        """A tenant canceled. `optional`: the keywords of subscription_event."""
        await self.subscription_event(
            "canceled", tenant, plan_id, period_start, period_end, **optional
        )

    async def subscription_renewed(
        self, tenant: str, plan_id: str, period_start: datetime, period_end: datetime,
        **optional: Any,
    ) -> None:
        """A tenant's subscription entered a new period. `optional`: see subscription_event."""
        await self.subscription_event(
            "renewed", tenant, plan_id, period_start, period_end, **optional
        )

    async def publish(self, events: Iterable[TallyEvent], *, wait: bool = True) -> None:
        """Publish already-validated events (the ingest gateway's path).

        With `wait`, return only once every batch holding one of them was acknowledged by
        Kafka or written to the spool; raises DeliveryError if one was lost.
        """
        batches: dict[int, _Batch] = {}
        for event in events:
            topic = self._usage_topic if isinstance(event, UsageEvent) else (
                self._subscriptions_topic
            )
            batch = await self._enqueue(
                topic, event.subject, _encode(event.model_dump(mode="json"))
            )
            batches[id(batch)] = batch
        if wait and batches:
            waiters = []
            for batch in batches.values():
                if batch.waiter is None:
                    batch.waiter = self._loop.create_future()
                waiters.append(batch.waiter)
            await asyncio.gather(*waiters)

    # -- state, for health checks and tests ------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the producer believes the broker is reachable."""
        return self._connected

    @property
    def spooled_records(self) -> int:
        """Records in the spool waiting for replay (0 without a spool)."""
        return self._spool.pending_records if self._spool is not None else 0

    @property
    def buffered_events(self) -> int:
        """Events in memory, neither acknowledged nor spooled yet."""
        return self._buffered

    # -- buffering -----------------------------------------------------------------------

    async def _enqueue(self, topic: str, tenant: str, encoded: bytes) -> _Batch:
        await self._admit(encoded)
        batch = self._add(topic, tenant, encoded)
        if batch.sealed:
            await asyncio.sleep(0)
        return batch

    async def _admit(self, encoded: bytes) -> None:
        """Refuse an event that cannot be taken; wait while the buffer is full."""
        if self._state != "open":
            raise ProducerClosedError(f"producer is {self._state}; start() it or make a new one")
        if self._spool_full:
            raise SpoolFullError(
                f"the spool {self.options.spool_dir} holds its maximum of "
                f"{self.options.spool_max_bytes} bytes until Kafka takes them back; the event "
                f"was not taken"
            )
        if len(encoded) + 2 > self._max_bytes:
            raise PayloadTooLargeError(
                [Problem("event", f"encoded size {len(encoded)} bytes exceeds the record "
                                  f"bound of {self._max_bytes} bytes")]
            )
        if self._buffered >= self._limit:
            # Backpressure: bounded memory (DESIGN.md guarantee 5) before throughput.
            await self._wait_until(lambda: self._buffered < self._limit or self._state != "open")
            if self._state != "open":
                raise ProducerClosedError(f"producer is {self._state}")

    def _add(self, topic: str, tenant: str, encoded: bytes) -> _Batch:
        """Put an admitted event into its tenant's open batch; seal the batch when full."""
        key = (topic, tenant)
        size = len(encoded) + 1
        batch = self._open.get(key)
        if batch is None:
            batch = self._new_batch(key)
        elif batch.nbytes + size > self._max_bytes:
            self._seal(batch)
            batch = self._new_batch(key)
        batch.parts.append(encoded)
        batch.nbytes += size
        batch.count += 1
        self._buffered += 1
        if batch.count >= self._max_events:
            self._seal(batch)
        return batch

    def _new_batch(self, key: tuple[str, str]) -> _Batch:
        batch = _Batch(key)
        batch.timer = self._loop.call_later(self._linger, self._linger_expired, batch)
        self._open[key] = batch
        return batch

    def _linger_expired(self, batch: _Batch) -> None:
        if not batch.sealed:
            self._seal(batch)

    def _seal(self, batch: _Batch) -> None:
        del self._open[batch.key]
        batch.sealed = True
        if batch.timer is not None:
            batch.timer.cancel()
        self._sealed_seq += 1
        batch.seq = self._sealed_seq
        batch.sealed_at = _time.monotonic()
        batch.timestamp_ms = _time.time_ns() // 1_000_000
        self._pipeline += 1
        self._topic_metrics(batch.key[0]).recorded.inc(batch.count)
        metrics.BUFFERED_EVENTS.inc(batch.count)
        self._sealed.put_nowait(batch)

    def _topic_metrics(self, topic: str) -> _TopicMetrics:
        m = self._metrics.get(topic)
        if m is None:
            m = self._metrics[topic] = _TopicMetrics(topic)
        return m

    async def _wait_until(self, predicate: Any) -> None:
        while not predicate():
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._waiters.append(waiter)
            await waiter

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- delivery ------------------------------------------------------------------------

    async def _sender(self) -> None:
        """Hand sealed batches to Kafka in seal order (or mark them for the spool)."""
        while True:
            batch = await self._sealed.get()
            if batch is None:
                self._inflight.put_nowait(None)
                return
            batch.value = b"[" + b",".join(batch.parts) + b"]"
            batch.parts = []
            metrics.BATCH_EVENTS.observe(batch.count)
            metrics.BATCH_BYTES.observe(len(batch.value))
            future: asyncio.Future[Any] | None = None
            generation = self._generation
            if self._direct and self._kafka is not None:
                try:
                    future = await self._kafka.send(
                        batch.key[0], value=batch.value, key=batch.key[1].encode(),
                        headers=_BATCH_HEADERS, timestamp_ms=batch.timestamp_ms,
                    )
                except Exception as e:  # aiokafka raises several kinds; all mean "not sent"
                    self._connection_lost(e, generation)
            self._inflight.put_nowait((batch, generation, future))

    async def _completer(self) -> None:
        """Settle sealed batches in seal order: acknowledged, or else spooled.

        Processing strictly in seal order is what keeps the spool in that order too.
        """
        while True:
            item = await self._inflight.get()
            if item is None:
                return
            batch, generation, future = item
            m = self._topic_metrics(batch.key[0])
            if future is not None:
                try:
                    await future
                except Exception as e:
                    m.failed.inc(batch.count)
                    self._connection_lost(e, generation)
                else:
                    # Delivered: acks=all, every in-sync replica has the record.
                    m.sent.inc(batch.count)
                    metrics.SEND_SECONDS.observe(_time.monotonic() - batch.sealed_at)
                    self._finish(batch)
                    continue
            self._spool_batch(batch, m)
            self._finish(batch)

    def _spool_batch(self, batch: _Batch, m: _TopicMetrics) -> None:
        # Guarantee: a record that was not acknowledged is in the spool before its memory
        # is released; from now on later records follow it there (`_direct` is False).
        self._direct = False
        if self._spool is not None:
            try:
                self._spool.append(
                    SpooledRecord(batch.key[0], batch.key[1], batch.value, batch.timestamp_ms,
                                  batch.count)
                )
            except ProducerError as e:
                log.error("spool write failed, %d events lost: %s", batch.count, e)
            else:
                m.spooled.inc(batch.count)
                self._note_spool_size()
                self._ensure_recovery()
                return
        else:
            log.error("kafka unavailable and no spool: %d events lost", batch.count)
        self._lost += batch.count
        if batch.waiter is not None and not batch.waiter.done():
            batch.waiter.set_exception(DeliveryError(f"{batch.count} events lost"))

    def _finish(self, batch: _Batch) -> None:
        self._buffered -= batch.count
        self._pipeline -= 1
        self._finished_seq = batch.seq  # the completer finishes batches in seal order
        metrics.BUFFERED_EVENTS.dec(batch.count)
        batch.value = b""
        if batch.waiter is not None and not batch.waiter.done():
            batch.waiter.set_result(None)
        self._notify()

    # -- connection and recovery ---------------------------------------------------------

    async def _connect(self) -> None:
        o = self.options
        producer = kafka.producer(
            self.settings, request_timeout_ms=o.delivery_timeout_ms,
            retry_backoff_ms=o.retry_backoff_ms, **o.kafka_options,
        )
        try:
            await asyncio.wait_for(producer.start(), o.connect_timeout_ms / 1000)
        except (KafkaError, OSError, TimeoutError) as e:
            try:
                await asyncio.wait_for(producer.stop(), 5)
            except Exception:
                log.debug("stopping a producer that failed to start", exc_info=True)
            raise ProducerUnavailableError(
                f"cannot reach Kafka at {self.settings.kafka_bootstrap_servers}: {e!r}"
            ) from e
        self._kafka = producer
        self._generation += 1
        self._connected = True
        metrics.CONNECTED.inc()
        self._notify()

    async def _retire_kafka(self) -> None:
        producer, self._kafka = self._kafka, None
        if self._connected:
            self._connected = False
            metrics.CONNECTED.dec()
        if producer is not None:
            try:
                # Stop flushes what aiokafka still holds; with a dead broker that ends
                # when those records time out, and the completer spools them.
                await asyncio.wait_for(
                    producer.stop(), self.options.delivery_timeout_ms / 1000 + 5
                )
            except Exception:
                log.debug("stopping the kafka producer", exc_info=True)

    def _connection_lost(self, error: BaseException, generation: int) -> None:
        self._direct = False
        if generation == self._generation and self._connected:
            log.warning("kafka delivery failed, spooling from now on: %r", error)
            self._connected = False
            metrics.CONNECTED.dec()
            self._notify()
        self._ensure_recovery()

    def _ensure_recovery(self) -> None:
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover(), name="tally-producer-recovery")

    async def _recover(self) -> None:
        """Reconnect with exponential backoff, replay the spool, resume direct sends."""
        o = self.options
        backoff = o.retry_backoff_ms / 1000
        while True:
            if not self._connected:
                await self._retire_kafka()
                try:
                    await self._connect()
                except ProducerUnavailableError as e:
                    log.info("kafka still unreachable, retrying in %.1fs: %s", backoff, e)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, o.reconnect_backoff_max_ms / 1000)
                    continue
                log.info("kafka reachable again, replaying the spool")
            backoff = o.retry_backoff_ms / 1000
            if self._spool is None:
                self._direct = True
                self._notify()
                return
            if await self._replay(self._spool):
                return
            await asyncio.sleep(backoff)

    async def _replay(self, spool: Spool) -> bool:
        """Replay the spool oldest first; cut over to direct sends once it is empty.

        The cutover must not let a newer record overtake a spooled one. So when the spool
        is empty but sealed batches are still on their way into it, `record` is held
        (`_limit = 0`) until they have landed and are replayed too; the flip to direct
        sends then happens with no await between the check and the flip.
        Returns False when the broker went away again (the rest stays spooled).
        """
        try:
            while True:
                spool.rotate()
                for segment in spool.sealed_segments():
                    if not await self._replay_segment(spool, segment):
                        return False
                if spool.pending_records == 0 and self._pipeline == 0:
                    self._direct = True
                    log.info("spool replayed, sending directly again")
                    return True
                if spool.pending_records == 0:
                    self._limit = 0
                    await self._wait_until(lambda: self._pipeline == 0 or not self._connected)
                if not self._connected:
                    return False
        finally:
            self._limit = self._capacity
            self._notify()

    async def _replay_segment(self, spool: Spool, segment: Any) -> bool:
        producer, generation = self._kafka, self._generation
        if producer is None:
            return False
        window: deque[tuple[SpooledRecord, asyncio.Future[Any]]] = deque()

        async def settle(record: SpooledRecord, future: asyncio.Future[Any]) -> bool:
            try:
                await future
            except _POISON as e:
                spool.reject(record, repr(e))
                log.error("kafka refused a spooled record for good, kept aside: %r", e)
            except Exception as e:
                self._connection_lost(e, generation)
                return False
            else:
                m = self._topic_metrics(record.topic)
                m.sent.inc(record.events)
                m.replayed.inc(record.events)
            return True

        for record in spool.read(segment):
            try:
                future = await producer.send(
                    record.topic, value=record.value, key=record.key.encode(),
                    headers=_BATCH_HEADERS, timestamp_ms=record.timestamp_ms,
                )
            except Exception as e:
                self._connection_lost(e, generation)
                return False
            window.append((record, future))
            if len(window) >= _REPLAY_WINDOW and not await settle(*window.popleft()):
                return False
        while window:
            if not await settle(*window.popleft()):
                return False
        # Every record of the segment is acknowledged: only now may it go.
        spool.remove(segment)
        self._note_spool_size()
        return True

    def _note_spool_size(self) -> None:
        """Refuse new events while the spool holds its maximum (the room check of `record`)."""
        assert self._spool is not None
        self._spool_full = self._spool.pending_bytes >= self.options.spool_max_bytes


class SyncUsageProducer:
    """A blocking facade over UsageProducer, for code without an event loop.

    Runs the async producer on a private event-loop thread; each call blocks until the
    async call returns. For throughput, prefer the async API.
    """

    def __init__(self, settings: Settings, options: ProducerOptions | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tally-producer", daemon=True
        )
        self._thread.start()
        self._producer = UsageProducer(settings, options)
        try:
            self._call(self._producer.start())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> SyncUsageProducer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def record(
        self, tenant: str, meter: str, quantity: int | float | Decimal | str, *,
        dimensions: Mapping[str, str] | None = None, event_id: str | None = None,
        time: datetime | None = None,
    ) -> None:
        """See UsageProducer.record."""
        self._call(self._producer.record(
            tenant, meter, quantity, dimensions=dimensions, event_id=event_id, time=time
        ))

    def subscription_event(
        self, kind: SubscriptionKind, tenant: str, plan_id: str, period_start: datetime,
        period_end: datetime, **optional: Any,
    ) -> None:
        """See UsageProducer.subscription_event (the four helpers are shorthands of it)."""
        self._call(self._producer.subscription_event(
            kind, tenant, plan_id, period_start, period_end, **optional
        ))

    def subscription_created(self, tenant: str, plan_id: str, period_start: datetime,
                             period_end: datetime, **optional: Any) -> None:
        """See UsageProducer.subscription_created."""
        self.subscription_event("created", tenant, plan_id, period_start, period_end, **optional)

    def subscription_plan_changed(self, tenant: str, plan_id: str, period_start: datetime,
                                  period_end: datetime, **optional: Any) -> None:
        """See UsageProducer.subscription_plan_changed."""
        self.subscription_event(
            "plan_changed", tenant, plan_id, period_start, period_end, **optional
        )

    def subscription_canceled(self, tenant: str, plan_id: str, period_start: datetime,
                              period_end: datetime, **optional: Any) -> None:
        """See UsageProducer.subscription_canceled."""
        self.subscription_event("canceled", tenant, plan_id, period_start, period_end, **optional)

    def subscription_renewed(self, tenant: str, plan_id: str, period_start: datetime,
                             period_end: datetime, **optional: Any) -> None:
        """See UsageProducer.subscription_renewed."""
        self.subscription_event("renewed", tenant, plan_id, period_start, period_end, **optional)

    def flush(self, timeout: float | None = None) -> None:
        """See UsageProducer.flush."""
        self._call(self._producer.flush(timeout))

    def close(self, timeout: float | None = None) -> None:
        """See UsageProducer.close; also stops the loop thread."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._producer.close(timeout))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
