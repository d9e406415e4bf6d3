"""The pre-batching stage: `tally.usage` and `tally.subscriptions` records repacked into
frames on `tally.usage.batched`, each on the partition that owns its tenant.

Faust's machinery costs about the same per record whatever the record holds, so a stream
of one-event records would be bound by it. This stage reads both source topics with a
plain aiokafka consumer (its own consumer group) and packs their records into frames
(streams/frames.py) on the partition of `tally.usage.batched` that OWNS each record's
tenant (`runtime.kafka.owner_partition`), which the Faust agent consumes. Tally chooses
the owner, not the producer's partitioner: a tenant's usage and subscription records meet
in one processor whatever client published them (docs/architecture.md, "Partition
ownership"). A record without a key keeps its source partition number (the worker
dead-letters it). On the way it checks each usage record's events
(`schemas.fast_usage.check_record`): a record whose events are all plain travels as
compact checked rows, which the worker reads without checking them again; any other
record travels as it was, and the worker decides about it.

At least once, and harmless when repeated: the source offsets are committed only after
every frame carrying them is acknowledged. A crash or rebalance before the commit makes
the next owner send those records again; each carries its source partition and original
offset, so the worker's applied offsets and dedup window recognise them
(streams/processor.py).

`tally worker` runs this stage in a child process (`run_child`), so that it uses another
core than the Faust agent. The child stops when its stdin closes (the worker stopped or
died) or on SIGTERM/SIGINT, and reports its counts on stdout as JSON lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections import deque
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from runtime import kafka
from runtime.kafka import owner_partition
from runtime.settings import Settings
from schemas.fast_usage import check_record
from streams import frames, metrics
from streams.errors import StreamsError

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 512 << 10  # well below the producer's 4 MiB request size
MAX_RECORDS_PER_FETCH = 20000
MAX_FETCHES_IN_FLIGHT = 4
REPORT_EVERY_SECONDS = 0.5
STOP_TIMEOUT_SECONDS = 15


class PreBatchExitedError(StreamsError):
    """The pre-batching child process ended while the worker was running."""


class PreBatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.usage = settings.topics.usage
        self.subscriptions = settings.topics.subscriptions
        self.target = settings.topics.usage_batched
        self._stopping = asyncio.Event()
        self.records = 0  # repacked so far
        self.checked = 0  # of which checked into rows
        self.frames = 0
        self.owners = 1  # partitions of the target topic, read when the stage starts

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        consumer = kafka.consumer(
            self.settings, self.usage, self.subscriptions,
            group_id=f"{self.settings.worker_id}-prebatch",
            session_timeout_ms=4000, heartbeat_interval_ms=500,  # quick joins (DESIGN.md)
            max_poll_interval_ms=300_000,
        )
        producer = kafka.producer(self.settings, linger_ms=0)
        await consumer.start()
        await producer.start()
        # Owners are computed modulo the target's partition count as the broker has it
        # (topics made before a change of TALLY_PARTITIONS keep their count).
        self.owners = len(await producer.partitions_for(self.target))
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
        by_owner, checked = _by_owner(batch, self.subscriptions, self.owners)
        for owner, entries in sorted(by_owner.items()):
            for frame in _frames(entries):
                futures.append(await producer.send(self.target, value=frame, partition=owner))
        self.records += sum(len(records) for records in batch.values())
        self.checked += checked
        self.frames += len(futures)
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


def _by_owner(batch: dict[TopicPartition, list[Any]], subscriptions_topic: str,
              owners: int) -> tuple[dict[int, list[frames.Entry]], int]:
    """The batch's records as frame entries per owner partition, each in its source
    partition's offset order, usage records checked into rows where they can be (the
    worker's core is then spared those checks); and how many were checked."""
    by_owner: dict[int, list[frames.Entry]] = {}
    checked = 0
    # Subscription records first: usage published after a subscription change and fetched
    # with it is then placed under it. (Across fetches the topics are read as they come.)
    for tp, records in sorted(batch.items(), key=lambda item: item[0].topic != subscriptions_topic):
        is_subscription = tp.topic == subscriptions_topic
        for r in records:
            if is_subscription:
                kind, value = frames.SUBSCRIPTION, r.value
            else:
                rows = check_record(r.key, r.value)
                kind, value = (frames.RAW, r.value) if rows is None else (frames.CHECKED, rows)
                checked += rows is not None
            owner = tp.partition % owners if r.key is None else owner_partition(r.key, owners)
            by_owner.setdefault(owner, []).append(
                (r.offset, r.timestamp, r.key, value, kind, tp.partition))
    return by_owner, checked


def _frames(entries: list[frames.Entry]) -> list[bytes]:
    """Pack entries into frames of at most MAX_FRAME_BYTES (one entry may exceed it)."""
    out: list[bytes] = []
    frame: list[frames.Entry] = []
    size = 0
    for entry in entries:
        entry_bytes = frames.entry_size(entry[2], entry[3])
        if frame and size + entry_bytes > MAX_FRAME_BYTES:
            out.append(frames.encode(frame))
            frame, size = [], 0
        frame.append(entry)
        size += entry_bytes
    if frame:
        out.append(frames.encode(frame))
    return out


# --- the child process ----------------------------------------------------------------


async def run_child(settings: Settings) -> None:
    """Run the stage in a child process until cancelled (then stop it cleanly); raise
    PreBatchExitedError if it ends by itself. Its counts feed the worker's metrics."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streams.prebatch",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **settings.to_env()},
    )
    assert child.stdin is not None and child.stdout is not None
    reported = {"records": 0, "checked": 0, "frames": 0}
    counters = {"records": metrics.PREBATCH_RECORDS, "checked": metrics.PREBATCH_CHECKED,
                "frames": metrics.PREBATCH_FRAMES}
    try:
        async for line in child.stdout:
            counts = orjson.loads(line)
            for name, counter in counters.items():
                counter.inc(counts[name] - reported[name])
            reported = counts
        code = await child.wait()
        raise PreBatchExitedError(f"the pre-batching process exited with code {code}")
    finally:
        if child.returncode is None:  # the worker is stopping: let the child finish
            child.stdin.close()
            try:
                await asyncio.wait_for(child.wait(), STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                log.warning("the pre-batching process did not stop in time; killing it")
                child.kill()
                await child.wait()


async def _child_main() -> None:
    settings = Settings.load()
    prebatcher = PreBatcher(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, prebatcher.stop)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def stop_when_parent_goes() -> None:
        await stdin.read()  # EOF: the worker closed the pipe or died
        prebatcher.stop()

    def report() -> None:
        line = orjson.dumps({"records": prebatcher.records, "checked": prebatcher.checked,
                             "frames": prebatcher.frames})
        sys.stdout.buffer.write(line + b"\n")
        sys.stdout.buffer.flush()

    async def report_regularly() -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_SECONDS)
            report()

    helpers = [asyncio.create_task(stop_when_parent_goes()),
               asyncio.create_task(report_regularly())]
    try:
        await prebatcher.run()
    finally:
        for task in helpers:
            task.cancel()
    with contextlib.suppress(BrokenPipeError):  # the worker is gone: nobody to tell
        report()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="prebatch %(levelname)s %(message)s")
    asyncio.run(_child_main())
