"""Delivery to Kafka and the spool: the sending half of `UsageProducer`.

Sealed batches are sent with acks=all: Kafka acknowledges a record once all in-sync
replicas have it. A record not acknowledged in time is appended to the local spool
(`producers.spool`) before its memory is released, and the producer switches to spooling
every later record too, so the spool keeps the order in which records were sealed. A
background task reconnects with exponential backoff, replays the spool oldest first, and
only then resumes direct sends (see `Delivery._replay`).
"""

from __future__ import annotations

import asyncio
import logging
import time as _time
from collections import deque
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
)

from producers import metrics
from producers.batching import Batch, Batching, TopicMetrics
from producers.errors import DeliveryError, ProducerError, ProducerUnavailableError
from producers.spool import Spool, SpooledRecord
from runtime import kafka
from runtime.settings import Settings
from schemas import codec

log = logging.getLogger(__name__)

_BATCH_HEADERS = codec.content_type_headers(batch=True)
# Errors about the record itself: replaying it again would fail the same way forever.
_POISON = (MessageSizeTooLargeError, CorruptRecordException, InvalidTopicError)
_REPLAY_WINDOW = 256  # records of a segment in flight at once during a replay

# A sealed batch travelling from the sender to the completer, with the producer
# generation it was sent on and its delivery future (None: spool it).
InFlight = tuple[Batch, int, "asyncio.Future[Any] | None"]


class Delivery(Batching):
    """Sends sealed batches in seal order; spools, reconnects and replays when Kafka fails.

    A base of `UsageProducer`, which initialises the state declared here.
    """

    settings: Settings
    _capacity: int
    _finished_seq: int
    _inflight: asyncio.Queue[InFlight | None]
    _kafka: AIOKafkaProducer | None
    _generation: int
    _connected: bool
    # Whether sealed batches go straight to Kafka. False while the broker is away or
    # the spool holds records not yet replayed: then they queue up in the spool.
    _direct: bool
    _spool: Spool | None
    _lost: int
    _recovery: asyncio.Task[None] | None

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

    def _spool_batch(self, batch: Batch, m: TopicMetrics) -> None:
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
        batch.lost = DeliveryError(f"{batch.count} events lost")
        if batch.waiter is not None and not batch.waiter.done():
            batch.waiter.set_exception(batch.lost)

    def _finish(self, batch: Batch) -> None:
        self._buffered -= batch.count
        self._pipeline -= 1
        self._finished_seq = batch.seq  # the completer finishes batches in seal order
        metrics.BUFFERED_EVENTS.dec(batch.count)
        batch.value = b""
        batch.finished = True
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
