"""Talking to the real broker from tests: publish records, read topics, wait for effects.

DESIGN.md: the embedded broker under-reports end offsets, so nothing here uses them to
decide that a test has caught up; callers wait for the effect they expect instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from runtime import kafka
from runtime.plans import publish_catalog
from runtime.settings import Settings
from schemas.codec import loads
from schemas.plans import default_catalog_path, load_catalog

T = TypeVar("T")


async def _publish(settings: Settings, topic: str,
                   records: Iterable[tuple[str | None, bytes]]) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k.encode() if k is not None else None, value=v)
                   for k, v in records]
        for f in futures:
            await f
    finally:
        await producer.stop()


def publish(settings: Settings, topic: str, records: Iterable[tuple[str | None, bytes]]) -> None:
    """Send records with a plain Kafka client (the documented wire format, no SDK)."""
    asyncio.run(_publish(settings, topic, list(records)))


async def _publish_stamped(settings: Settings, topic: str,
                           records: list[tuple[str, bytes, int]]) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k.encode(), value=v, timestamp_ms=ts)
                   for k, v, ts in records]
        for f in futures:
            await f
    finally:
        await producer.stop()


def publish_stamped(settings: Settings, topic: str,
                    records: Iterable[tuple[str, bytes, int]]) -> None:
    """Send (key, value, timestamp_ms) records: the timestamp is the ingestion time the
    worker sees, as if the broker had received them then."""
    asyncio.run(_publish_stamped(settings, topic, list(records)))


def publish_seed_catalog(settings: Settings) -> None:
    asyncio.run(publish_catalog(settings, load_catalog(default_catalog_path())))


def read_records(settings: Settings, topic: str, idle_ms: int = 300) -> list[Any]:
    """Every record of a topic, read until a fetch comes back empty."""
    return asyncio.run(kafka.read_topic(settings, topic, idle_ms))


def read_compacted(settings: Settings, topic: str) -> dict[str, Any]:
    """The latest decoded value of every key (what a compacted topic converges to)."""
    latest: dict[str, Any] = {}
    for r in sorted(read_records(settings, topic), key=lambda r: (r.partition, r.offset)):
        latest[r.key.decode()] = loads(r.value) if r.value is not None else None
    return {k: v for k, v in latest.items() if v is not None}


def wait_for(probe: Callable[[], T], accept: Callable[[T], bool], timeout: float = 60,
             what: str = "condition") -> T:
    """Poll `probe` until `accept` holds; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not accept(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value: {value!r}")
        time.sleep(0.3)
        value = probe()
    return value
