"""The pre-batching stage: `tally.usage` records repacked into frames on `tally.usage.batched`.

Faust's machinery costs about the same per record whatever the record holds, so a stream
of one-event records would be bound by it. This stage reads `tally.usage` with a plain
aiokafka consumer (its own consumer group), packs the records of each partition into
frames (streams/frames.py) and writes each frame to the SAME partition number of
`tally.usage.batched`, which the Faust agent consumes.

At least once, and harmless when repeated: the source offsets are committed only after
the frames carrying them are acknowledged. A crash or rebalance before the commit makes
the next owner send those records again; each carries its original offset, so the
worker's applied offsets and dedup window recognise them (streams/processor.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from streams import frames, metrics
from tally import kafka
from tally.settings import Settings

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 512 << 10  # well below the producer's 4 MiB request size
MAX_RECORDS_PER_FETCH = 20000
MAX_FETCHES_IN_FLIGHT = 4


class PreBatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.source = settings.topics.usage
        self.target = settings.topics.usage_batched
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        consumer = kafka.consumer(
            self.settings, self.source, group_id=f"{self.settings.worker_id}-prebatch",
            session_timeout_ms=4000, heartbeat_interval_ms=500,  # quick joins (DESIGN.md)
            max_poll_interval_ms=300_000,
        )
        producer = kafka.producer(self.settings, linger_ms=0)
        await consumer.start()
        await producer.start()
        # Fetching goes on while the broker stores earlier frames; commits stay in order.
        in_flight: deque[asyncio.Future[None]] = deque()
        try:
            while not self._stopping.is_set():
                batch = await consumer.getmany(timeout_ms=20, max_records=MAX_RECORDS_PER_FETCH)
                if batch:
                    futures = await self._send(producer, batch)
                    previous = in_flight[-1] if in_flight else None
                    in_flight.append(asyncio.ensure_future(
                        self._commit_when_durable(consumer, batch, futures, previous)))
                while len(in_flight) > MAX_FETCHES_IN_FLIGHT or (
                    in_flight and in_flight[0].done()
                ):
                    await in_flight.popleft()
            while in_flight:
                await in_flight.popleft()
        finally:
            await producer.stop()
            await consumer.stop()

    async def _send(self, producer: Any,
                    batch: dict[TopicPartition, list[Any]]) -> list[asyncio.Future[Any]]:
        futures = []
        for tp, records in batch.items():
            for frame in _frames(records):
                futures.append(await producer.send(self.target, value=frame,
                                                   partition=tp.partition))
            metrics.PREBATCH_RECORDS.inc(len(records))
        metrics.PREBATCH_FRAMES.inc(len(futures))
        return futures

    async def _commit_when_durable(
        self, consumer: Any, batch: dict[TopicPartition, list[Any]],
        futures: list[asyncio.Future[Any]], previous: asyncio.Future[None] | None,
    ) -> None:
        if previous is not None:
            await previous
        await asyncio.gather(*futures)  # 1. frames durable ...
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items() if records}
        try:
            await consumer.commit(offsets)  # 2. ... then the source offsets
        except (CommitFailedError, IllegalStateError) as e:
            # Rebalanced away: the new owner re-sends these records; the worker's applied
            # offsets make that harmless.
            log.info("prebatch commit skipped after a rebalance: %s", e)


def _frames(records: list[Any]) -> list[bytes]:
    """Pack records (in offset order) into frames of at most MAX_FRAME_BYTES."""
    out: list[bytes] = []
    entries: list[frames.Entry] = []
    size = 0
    for r in records:
        entry_bytes = frames.entry_size(r.key, r.value)
        if entries and size + entry_bytes > MAX_FRAME_BYTES:
            out.append(frames.encode(entries))
            entries, size = [], 0
        entries.append((r.offset, r.timestamp, r.key, r.value))
        size += entry_bytes
    if entries:
        out.append(frames.encode(entries))
    return out
