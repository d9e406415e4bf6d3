"""The pre-batching stage: `tally.usage` records repacked into frames on `tally.usage.batched`.

Faust's machinery costs about the same per record whatever the record holds, so a stream
of one-event records would be bound by it. This stage reads `tally.usage` with a plain
aiokafka consumer (its own consumer group), packs the records of each partition into
frames (streams/frames.py) and writes each frame to the SAME partition number of
`tally.usage.batched`, which the Faust agent consumes. On the way it checks each record's
events (`schemas.fast_usage.check_record`): a record whose events are all plain travels as
compact checked rows, which the worker reads without checking them again; any other
record travels as it was, and the worker decides about it.

At least once, and harmless when repeated: the source offsets are committed only after
the frames carrying them are acknowledged. A crash or rebalance before the commit makes
the next owner send those records again; each carries its original offset, so the
worker's applied offsets and dedup window recognise them (streams/processor.py).

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
        self.source = settings.topics.usage
        self.target = settings.topics.usage_batched
        self._stopping = asyncio.Event()
        self.records = 0  # repacked so far
        self.checked = 0  # of which checked into rows
        self.frames = 0

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
            frames_of_tp, checked = _frames(records)
            for frame in frames_of_tp:
                futures.append(await producer.send(self.target, value=frame,
                                                   partition=tp.partition))
            self.records += len(records)
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


def _frames(records: list[Any]) -> tuple[list[bytes], int]:
    """Pack records (in offset order) into frames of at most MAX_FRAME_BYTES, each record
    checked into rows if it can be (the worker's core is then spared those checks); return
    the frames and how many records were checked."""
    out: list[bytes] = []
    checked = 0
    entries: list[frames.Entry] = []
    size = 0
    for r in records:
        rows = check_record(r.key, r.value)
        value = r.value if rows is None else rows
        entry_bytes = frames.entry_size(r.key, value)
        if entries and size + entry_bytes > MAX_FRAME_BYTES:
            out.append(frames.encode(entries))
            entries, size = [], 0
        entries.append((r.offset, r.timestamp, r.key, value, rows is not None))
        checked += rows is not None
        size += entry_bytes
    if entries:
        out.append(frames.encode(entries))
    return out, checked


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
