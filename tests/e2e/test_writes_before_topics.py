"""Issue 17, the 12-32 events `make faults` lost after "broker restart, empty", on the
embedded broker (Tansu 0.6) with plain producers from `runtime.kafka.producer`.

When Tansu comes back empty on the same port, producers that kept running (the SDK, the
gateway, the worker's clients: aiokafka retries what was in flight, with the metadata it
cached) reach it before the topic job (`kafka.ensure_topics`) has created the topics.
Tansu acknowledges some of those writes and stores them under the topic's name although
it does not list the topic; when the topic is then created it gives those partitions'
offsets out again from 0, so a record acknowledged after the creation gets an offset
inside a batch stored before it, and a reader that read that batch is past it and never
sees the record. Before the fix, 12 of about 1,600 records acknowledged after the restart
were missing in each of four runs of this test (the fault run lost the first events
sent after the switch, which follows `ensure_topics`). Tally's producers now write only
to topics the broker lists (`runtime.kafka._WritesOnlyToListedTopics`), so no such write
is acknowledged: they wait for the topic job.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from runtime import kafka
from runtime.settings import Settings
from tests.projections.test_faults import Broker, own_broker

__all__ = ["own_broker"]

PRODUCERS = 3  # the fault run has several: SDK, gateway, the worker's
SEND_EVERY = 0.003
BEFORE_CREATION = 0.3  # writes reach the new broker this long before the topic job runs


async def _stream_through_an_empty_restart(broker: Broker) -> tuple[dict[str, int], set[str]]:
    """Producers write steadily while the broker restarts empty and the topics are created
    again; return what was acknowledged after the restart (value -> offset) and what the
    new log holds."""
    settings = Settings(kafka_bootstrap_servers=broker.address, partitions=4)
    topic = settings.topics.usage
    await kafka.ensure_topics(settings)
    producers = [kafka.producer(settings, linger_ms=2) for _ in range(PRODUCERS)]
    for p in producers:
        await p.start()
    acked: dict[str, tuple[int, float]] = {}
    pending: set[asyncio.Future[None]] = set()
    stop = asyncio.Event()

    async def settle(value: str, delivery: asyncio.Future[RecordMetadata]) -> None:
        try:
            metadata = await delivery
        except Exception:  # not acknowledged: the client's to retry, nothing promised
            return
        acked[value] = (metadata.offset, time.monotonic())

    async def stream(producer_no: int, producer: AIOKafkaProducer) -> None:
        n = 0
        while not stop.is_set():
            value = f"{producer_no}-{n}"
            n += 1
            try:
                delivery = await producer.send(
                    topic, value=value.encode(), key=f"tenant-{n % 20}".encode())
            except Exception:
                await asyncio.sleep(SEND_EVERY)
                continue
            task = asyncio.ensure_future(settle(value, delivery))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(SEND_EVERY)

    streams = [asyncio.ensure_future(stream(i, p)) for i, p in enumerate(producers)]
    try:
        await asyncio.sleep(1)
        await asyncio.to_thread(broker.restart)
        restarted = time.monotonic()
        await asyncio.sleep(BEFORE_CREATION)
        await kafka.ensure_topics(settings)  # the topic job, as bench/pipeline.py runs it
        await asyncio.sleep(2)
    finally:
        stop.set()
        await asyncio.gather(*streams)
        if pending:
            await asyncio.wait(pending, timeout=30)
        for p in producers:
            await p.stop()
    records = await kafka.read_topic(settings, topic)
    after = {v: offset for v, (offset, at) in acked.items() if at > restarted}
    return after, {r.value.decode() for r in records}


def test_every_write_acknowledged_after_an_empty_restart_is_in_the_new_log(
        own_broker: Broker) -> None:
    acknowledged, stored = asyncio.run(_stream_through_an_empty_restart(own_broker))
    assert len(acknowledged) > 500  # the producers did write through the restart
    missing = sorted(v for v in acknowledged if v not in stored)
    assert not missing, (f"{len(missing)} of {len(acknowledged)} records acknowledged after "
                         f"the restart are not in the new log, e.g. {missing[:5]}")
