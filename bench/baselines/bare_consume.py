"""Ceiling: a bare aiokafka consumer that only parses the records, nothing else.

    python -m bench.baselines.bare_consume BOOTSTRAP TOPIC EXPECTED_EVENTS

The same client settings as every Tally consumer (`runtime.kafka.consumer`), every
partition assigned (no group to join); each record's value parsed with orjson and its
events counted (a batch record holds a JSON array). No state, no output, no commits: what
reading and parsing the records costs, which no consumer of them can beat by much.

Prints `DONE <events> <seconds>` (from the first fetch to the last event parsed) and exits.
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson
from aiokafka import TopicPartition

from runtime import kafka
from runtime.settings import Settings


async def consume(bootstrap: str, topic: str, expected: int) -> tuple[int, float]:
    settings = Settings(kafka_bootstrap_servers=bootstrap)
    consumer = kafka.consumer(settings)
    await consumer.start()
    events = 0
    loads = orjson.loads
    try:
        partitions = [TopicPartition(topic, p)
                      for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        first = time.perf_counter()
        while events < expected:
            batch = await consumer.getmany(timeout_ms=500, max_records=50_000)
            for records in batch.values():
                for r in records:
                    parsed = loads(r.value)
                    events += len(parsed) if type(parsed) is list else 1
        return events, time.perf_counter() - first
    finally:
        await consumer.stop()


def main() -> None:
    events, seconds = asyncio.run(consume(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    print(f"DONE {events} {seconds:.4f}", flush=True)


if __name__ == "__main__":
    main()
