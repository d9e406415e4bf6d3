"""Per-tenant batching with bounded memory: the buffering half of `UsageProducer`.

Events of one tenant and topic are buffered into one record (`application/cloudevents-
batch+json`, key = tenant) until it holds `max_batch_events` events, would exceed
`max_batch_bytes`, or is `linger_ms` old. At most `max_buffered_events` events wait in
memory; `record` awaits (backpressure) until acknowledgements or spool writes make room.
"""

from __future__ import annotations

import asyncio
import time as _time
from typing import Any, Literal

from producers import metrics
from producers.errors import (
    PayloadTooLargeError,
    Problem,
    ProducerClosedError,
    ProducerError,
    SpoolFullError,
)
from producers.options import ProducerOptions


class TopicMetrics:
    """The producer's event counters of one topic (labelled once, not per event)."""

    __slots__ = ("failed", "recorded", "replayed", "sent", "spooled")

    def __init__(self, topic: str) -> None:
        self.recorded = metrics.EVENTS_RECORDED.labels(topic)
        self.sent = metrics.EVENTS_SENT.labels(topic)
        self.failed = metrics.EVENTS_FAILED.labels(topic)
        self.spooled = metrics.EVENTS_SPOOLED.labels(topic)
        self.replayed = metrics.EVENTS_REPLAYED.labels(topic)


class Batch:
    """Events of one (topic, tenant) on their way into one record."""

    __slots__ = (
        "count",
        "finished",
        "key",
        "lost",
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
        # Set when the batch is settled, for a caller that starts waiting only afterwards.
        self.finished = False
        self.lost: ProducerError | None = None


class Batching:
    """Buffers admitted events into per-(topic, tenant) batches and seals them in order.

    A base of `UsageProducer`, which initialises the state declared here (in `__init__`
    and `start`); sealed batches go to `_sealed`, for `producers.delivery` to send.
    """

    options: ProducerOptions
    _state: Literal["new", "open", "closing", "closed"]
    _loop: asyncio.AbstractEventLoop
    _max_events: int
    _max_bytes: int
    _linger: float
    # The room check of `record`; 0 while a spool replay cuts over (see `Delivery._replay`).
    _limit: int
    _buffered: int
    _spool_full: bool  # refuse new events (see ProducerOptions.spool_max_bytes)
    _open: dict[tuple[str, str], Batch]
    _sealed: asyncio.Queue[Batch | None]
    _sealed_seq: int
    _pipeline: int  # sealed batches neither acknowledged nor spooled yet
    _waiters: list[asyncio.Future[None]]
    _metrics: dict[str, TopicMetrics]

    async def _enqueue(self, topic: str, tenant: str, encoded: bytes) -> Batch:
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

    def _add(self, topic: str, tenant: str, encoded: bytes) -> Batch:
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

    def _new_batch(self, key: tuple[str, str]) -> Batch:
        batch = Batch(key)
        batch.timer = self._loop.call_later(self._linger, self._linger_expired, batch)
        self._open[key] = batch
        return batch

    def _linger_expired(self, batch: Batch) -> None:
        if not batch.sealed:
            self._seal(batch)

    def _seal(self, batch: Batch) -> None:
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

    def _topic_metrics(self, topic: str) -> TopicMetrics:
        m = self._metrics.get(topic)
        if m is None:
            m = self._metrics[topic] = TopicMetrics(topic)
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
