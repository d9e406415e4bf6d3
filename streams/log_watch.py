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

The same check watches the worker's progress: a partition of `tally.usage.batched` whose
log holds records past what the worker has processed, while that position has not moved
for `stall_seconds`, is stalled (a consumer sitting past the end of a new log, a group
that rejoined and fetches nothing): the worker's own position is compared, not a group
offset, and the broker's reported end, short on Tansu, can only make a stall look later.

What the worker does about either is its policy (streams/app.py, docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Waiting:
    """A partition's position, behind its log's end since `since` (monotonic seconds)."""

    position: int
    since: float


def waiting(before: Waiting | None, position: int, end: int, now: float) -> Waiting | None:
    """The partition's wait after this check: None when nothing is left to read; the
    same wait while its position has not moved; a new one from now when it moved."""
    if end <= position:
        return None
    if before is None or before.position != position:
        return Waiting(position, now)
    return before


class LogWatch:
    """Checks every `period` seconds; calls `on_lost(reason)` at the first log lost, or
    at the first partition of `progress_topic` stalled for `stall_seconds` (`progress()`
    gives the next offset the worker will process of each partition it holds), and ends.
    Broker errors during a check (the broker restarting) only skip that check."""

    def __init__(self, settings: Settings, topics: list[str], period: float,
                 on_lost: Callable[[str, str], Awaitable[None]], progress_topic: str,
                 progress: Callable[[], dict[int, int]], stall_seconds: float) -> None:
        self.settings = settings
        self.topics = topics
        self.period = period
        self.on_lost = on_lost
        self.progress_topic = progress_topic
        self.progress = progress
        self.stall_seconds = stall_seconds
        self.marks: dict[TopicPartition, Mark] = {}
        self.waits: dict[int, Waiting] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                found = await asyncio.wait_for(self.check(), CHECK_TIMEOUT_SECONDS)
            except (KafkaError, OSError, TimeoutError) as e:
                log.info("log watch: check skipped (%r)", e)
                continue
            except asyncio.CancelledError:
                # Not this watch being cancelled, but a client library raising it from
                # inside a check (aiokafka did: runtime/kafka.py, _Consumer): a watch that
                # ended with it would leave the worker unwatched without a word.
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                log.error("log watch: a check ended in a CancelledError nobody asked for;"
                          " skipped")
                continue
            if found is not None:
                await self.on_lost(*found)
                return

    async def check(self) -> tuple[str, str] | None:
        """One check: (reason, what) of a log lost or a stall, or None."""
        # Only a partition's first batch is wanted: the smallest fetches (the broker
        # answers with one whole batch even when it is larger), not the consumers'
        # default of 8 MiB a partition, every few seconds on the worker's core: with 1 MiB
        # fetches a check cost 180 ms of CPU, so about 60 ms (4 topics of 4 partitions,
        # 500 KiB frames). The checksum is the watch's own: no CRC check of the batches.
        consumer = kafka.consumer(self.settings, auto_offset_reset="earliest",
                                  max_partition_fetch_bytes=1024, fetch_max_bytes=1024,
                                  check_crcs=False)
        try:
            await consumer.start()
            for tp, mark in sorted((await self.first_records(consumer)).items()):
                why = judge(self.marks.get(tp), mark)
                if why is not None:
                    return "log_lost", f"{tp.topic} partition {tp.partition}: {why}"
                self.marks[tp] = mark
            return await self.stalled(consumer)
        finally:
            await consumer.stop()

    async def stalled(self, consumer: Any) -> tuple[str, str] | None:
        positions = self.progress()
        ends = await consumer.end_offsets(
            [TopicPartition(self.progress_topic, p) for p in sorted(positions)])
        now = time.monotonic()
        self.waits = {p: w for p in positions if (w := waiting(
            self.waits.get(p), positions[p], ends.get(TopicPartition(self.progress_topic, p), 0),
            now)) is not None}
        for p, w in sorted(self.waits.items()):
            if now - w.since >= self.stall_seconds:
                return "stalled", (f"{self.progress_topic} partition {p}: at offset {w.position}"
                                   f" for {now - w.since:.0f} s while its log goes on")
        return None

    async def first_records(self, consumer: Any) -> dict[TopicPartition, Mark]:
        """The first record of every partition of the watched topics that has one."""
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
