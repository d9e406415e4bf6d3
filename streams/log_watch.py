"""The worker's watch over the logs it reads: has the broker lost them?

A broker that comes back empty (Tansu keeps its log in memory; a topic deleted and
recreated; a cluster rebuilt) starts every partition again at offset 0. The worker's
positions, its group offsets and the applied offsets in its state then belong to a log
that no longer exists: the Faust consumer drops every new record below its old position,
the pre-batching stage may sit past the new end, and a processor would take the new
records for replays. Nothing of that raises an error, so it is watched for.

The watch remembers the FIRST record of every partition of the logs the worker depends on
(its source topics, `tally.usage.batched` and its changelog): offset, timestamp and a
checksum. The start of a log moves only forward (retention, compaction); a log that now
starts before the remembered offset, or whose record at that offset is another one, is
not the log the worker read. This holds however fast the new log grows (an end-offset
comparison does not: the new log can outgrow the old position within seconds, and
Tansu under-reports ends, DESIGN.md), and an empty or unreachable log judges nothing
(nothing in it can be lost; it is judged once its first record comes).

What the worker does about it is its policy (streams/app.py, docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from runtime import kafka
from runtime.settings import Settings

log = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 10
EMPTY_FETCHES = 2  # a partition without a record after this many fetches is left unjudged


@dataclass(frozen=True)
class Mark:
    """The first record of a partition, as far as it tells one log from another."""

    offset: int
    timestamp: int
    checksum: int


def mark_of(offset: int, timestamp: int, key: bytes | None, value: bytes | None) -> Mark:
    return Mark(offset, timestamp, zlib.crc32(value or b"", zlib.crc32(key or b"")))


def judge(before: Mark | None, now: Mark | None) -> str | None:
    """Why the log whose first record is `now` cannot be the one whose first record was
    `before`; None when it can (or when either is unknown)."""
    if before is None or now is None:
        return None
    if now.offset < before.offset:
        return f"it now starts at offset {now.offset}, before {before.offset}"
    if now.offset == before.offset and now != before:
        return f"its record at offset {now.offset} is another one than before"
    return None  # the same start, or one moved forward by retention or compaction


class LogWatch:
    """Checks every `period` seconds; calls `on_loss(reason)` at the first log lost and
    ends. Broker errors during a check (the broker restarting) only skip that check."""

    def __init__(self, settings: Settings, topics: list[str], period: float,
                 on_loss: Callable[[str], Awaitable[None]]) -> None:
        self.settings = settings
        self.topics = topics
        self.period = period
        self.on_loss = on_loss
        self.marks: dict[TopicPartition, Mark] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                now = await asyncio.wait_for(self.first_records(), CHECK_TIMEOUT_SECONDS)
            except (KafkaError, OSError, TimeoutError) as e:
                log.info("log watch: check skipped (%r)", e)
                continue
            for tp, mark in sorted(now.items()):
                why = judge(self.marks.get(tp), mark)
                if why is not None:
                    await self.on_loss(f"{tp.topic} partition {tp.partition}: {why}")
                    return
                self.marks[tp] = mark

    async def first_records(self) -> dict[TopicPartition, Mark]:
        """The first record of every partition of the watched topics that has one."""
        consumer = kafka.consumer(self.settings, auto_offset_reset="earliest")
        try:
            await consumer.start()
            tps = [TopicPartition(topic, p) for topic in self.topics
                   for p in sorted(consumer.partitions_for_topic(topic) or ())]
            if not tps:
                return {}
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            found: dict[TopicPartition, Mark] = {}
            empty = 0
            while len(found) < len(tps) and empty < EMPTY_FETCHES:
                batch = await consumer.getmany(*[tp for tp in tps if tp not in found],
                                               timeout_ms=300, max_records=len(tps))
                empty = 0 if batch else empty + 1
                for tp, records in batch.items():
                    if records and tp not in found:
                        r = records[0]
                        found[tp] = mark_of(r.offset, r.timestamp, r.key, r.value)
            return found
        finally:
            await consumer.stop()
