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
   See `producers.encoding`.
2. **Batch per tenant.** Events of one tenant and topic are buffered into one record
   (`application/cloudevents-batch+json`, key = tenant) until it holds `max_batch_events`
   events, would exceed `max_batch_bytes`, or is `linger_ms` old.
3. **Bounded memory.** At most `max_buffered_events` events wait in memory; `record`
   awaits (backpressure) until acknowledgements or spool writes make room. See
   `producers.batching`.
4. **Deliver with acks=all.** Kafka acknowledges a record once all in-sync replicas have
   it. aiokafka retries retriable errors with `retry_backoff_ms` until
   `delivery_timeout_ms`; there is no idempotent producer (the embedded broker lacks it),
   so a retry may write a record twice — safe, because consumers dedup by (tenant, event
   id) (DESIGN.md guarantee 1). Callers retrying after an error must reuse the event id.
5. **Spool what cannot be delivered.** A record not acknowledged in time is appended to
   the local spool (`producers.spool`) before its memory is released, and the producer
   switches to spooling every later record too, so the spool keeps the order in which
   records were sealed. A background task reconnects with exponential backoff, replays the
   spool oldest first, and only then resumes direct sends (see `producers.delivery`). A
   new producer on the same spool directory replays what an earlier process left. A
   replayed record keeps its original Kafka timestamp (the time its batch was sealed). The
   spool's disk use is bounded (`spool_max_bytes`): once it holds that much, `record` raises
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
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from producers.batching import Batch
from producers.delivery import Delivery
from producers.encoding import (
    SubscriptionKind,
    TallyEvent,
    build_subscription_event,
    build_usage_event,
    fast_usage_event,
    fast_usage_json,
)
from producers.errors import DeliveryError, ProducerError, ProducerUnavailableError
from producers.options import ProducerOptions
from producers.spool import Spool
from runtime.settings import Settings
from schemas import codec
from schemas.events import UsageEvent

log = logging.getLogger(__name__)

# One event's value; the batch value joins these into a JSON array (see `Delivery._sender`).
_encode = codec.dumps


class UsageProducer(Delivery):
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
        self._source_json = _encode(o.source).decode()
        self._usage_topic = settings.topics.usage
        self._max_future = settings.max_future
        self._subscriptions_topic = settings.topics.subscriptions
        self._max_events = o.max_batch_events
        self._max_bytes = o.max_batch_bytes
        self._linger = o.linger_ms / 1000
        self._capacity = o.max_buffered_events
        self._limit = o.max_buffered_events
        self._buffered = 0
        self._open = {}
        self._sealed_seq = 0
        self._finished_seq = 0
        self._pipeline = 0
        self._kafka = None
        self._generation = 0
        self._connected = False
        self._direct = False
        self._spool = None
        self._spool_full = False
        self._lost = 0
        self._state = "new"
        self._waiters = []
        self._tasks: list[asyncio.Task[None]] = []
        self._recovery = None
        self._metrics = {}

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
        self._sealed = asyncio.Queue()
        self._inflight = asyncio.Queue()
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
        time: datetime | None = None, wait: bool = False,
    ) -> None:
        """Record usage: `quantity` of `meter` by `tenant`, at `time` (default now).

        `event_id` (default: a new UUIDv7) is the idempotency key: retry with the same id
        and the event is counted once. Raises InvalidEventError (every problem listed) or
        PayloadTooLargeError before anything is buffered; awaits while the buffer is full.
        With `wait`, return only once the event's batch was acknowledged by Kafka or written
        to the spool; raises DeliveryError if it was lost.
        """
        # The hot path (target 300k events/s): the commonest call straight to its bytes, then
        # the fast check, then the model when needed.
        encoded = (fast_usage_json(tenant, meter, quantity, self._source_json)
                   if dimensions is None and event_id is None and time is None else None)
        if encoded is None:
            encoded = _encode(fast_usage_event(
                tenant, meter, quantity, dimensions, event_id, time, self.source, self._max_future
            ) or build_usage_event(
                tenant, meter, quantity, dimensions=dimensions, event_id=event_id, time=time,
                source=self.source, max_future=self._max_future,
            ))
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
        else:
            batch = self._add(self._usage_topic, tenant, encoded)
            if batch.sealed:
                # Let the sender hand the record to Kafka before more events pile up.
                await asyncio.sleep(0)
        if wait:
            await self._delivered([batch])

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
        batches: dict[int, Batch] = {}
        for event in events:
            topic = self._usage_topic if isinstance(event, UsageEvent) else (
                self._subscriptions_topic
            )
            batch = await self._enqueue(
                topic, event.subject, _encode(event.model_dump(mode="json"))
            )
            batches[id(batch)] = batch
        if wait and batches:
            await self._delivered(batches.values())

    async def _delivered(self, batches: Iterable[Batch]) -> None:
        """Until each batch was acknowledged or spooled; DeliveryError if one was lost."""
        waiters = []
        for batch in batches:
            if batch.lost is not None:
                raise batch.lost
            if batch.finished:  # settled while the caller was still adding events
                continue
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

