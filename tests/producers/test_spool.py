"""The spool: durable while Kafka is away, replayed in order and exactly once, then empty."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from devtools import devstack
from producers import ProducerOptions, SpoolError, SpoolFullError, UsageProducer
from producers.spool import Spool, SpooledRecord
from runtime import kafka
from runtime.settings import Settings
from schemas import codec
from tests.producers import (
    all_events,
    consume,
    dead_address,
    kill_tansu,
    run,
    start_tansu_on,
)

SettingsFactory = Callable[..., Settings]


def record(i: int, events: int = 2) -> SpooledRecord:
    value = codec.encode_batch([{"id": f"e{i}-{n}", "subject": "t"} for n in range(events)])
    return SpooledRecord("topic", "t", value, 1_700_000_000_000 + i, events)


def replay_all(spool: Spool) -> list[SpooledRecord]:
    out: list[SpooledRecord] = []
    spool.rotate()
    for segment in spool.sealed_segments():
        out.extend(spool.read(segment))
        spool.remove(segment)
    return out


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.jsonl"))


# -- the spool on its own -------------------------------------------------------------------


def test_spooled_records_survive_a_restart_and_read_back_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync="always")
    for i in range(5):
        spool.append(record(i))
    assert spool.pending_bytes == sum(f.stat().st_size for f in segment_files(tmp_path))
    spool.close()
    reopened = Spool(tmp_path)
    assert reopened.pending_records == 5
    on_disk = sum(f.stat().st_size for f in segment_files(tmp_path))
    assert reopened.pending_bytes == on_disk > 0  # what `spool_max_bytes` bounds
    assert replay_all(reopened) == [record(i) for i in range(5)]
    assert reopened.pending_records == 0 and reopened.pending_bytes == 0
    reopened.close()
    assert segment_files(tmp_path) == []


def test_spool_lines_are_json_with_key_and_value(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync="never")
    spool.append(record(1))
    spool.close()
    (line,) = segment_files(tmp_path)[0].read_bytes().splitlines()
    doc = codec.loads(line)
    assert doc["key"] == "t" and doc["topic"] == "topic"
    assert doc["value"] == codec.loads(record(1).value)


def test_a_line_torn_by_a_crash_is_cut_off_and_the_rest_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync="always")
    spool.append(record(1))
    spool.append(record(2))
    spool.close()
    (path,) = segment_files(tmp_path)
    with path.open("ab") as f:
        f.write(b'{"topic": "topic", "key": "t", "val')  # the process died mid-write
    reopened = Spool(tmp_path)
    assert reopened.pending_records == 2
    assert replay_all(reopened) == [record(1), record(2)]
    reopened.close()


def test_appends_during_a_replay_go_to_a_newer_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(record(1))
    spool.rotate()
    (segment,) = spool.sealed_segments()
    spool.append(record(2))  # arrives while segment 1 is being replayed
    assert list(spool.read(segment)) == [record(1)]
    spool.remove(segment)
    assert spool.pending_records == 1
    assert replay_all(spool) == [record(2)]
    spool.close()


def test_a_segment_is_kept_until_removed_so_a_crash_mid_replay_replays_it_again(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    for i in range(3):
        spool.append(record(i))
    spool.rotate()
    (segment,) = spool.sealed_segments()
    next(iter(spool.read(segment)))  # replay started, then the process "dies"
    spool.close()
    reopened = Spool(tmp_path)
    assert replay_all(reopened) == [record(i) for i in range(3)]
    reopened.close()


def test_only_one_producer_may_use_a_spool_directory(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(SpoolError):
        Spool(tmp_path)
    spool.close()
    Spool(tmp_path).close()


# -- with a broker --------------------------------------------------------------------------


async def record_numbered(producer: UsageProducer, start: int, count: int,
                          tenants: int = 3) -> list[str]:
    ids = []
    for i in range(start, start + count):
        event_id = f"ev-{i:06d}"
        await producer.record(f"tenant-{i % tenants}", "api_calls", 1, event_id=event_id)
        ids.append(event_id)
    return ids


def assert_in_order_per_tenant(events: list[dict[str, Any]]) -> None:
    """Ids are numbered in recording order; per tenant they must arrive in that order."""
    for tenant in {e["subject"] for e in events}:
        got = [e["id"] for e in events if e["subject"] == tenant]
        assert got == sorted(got), f"{tenant}: out of order"


def test_events_recorded_while_the_broker_is_unreachable_are_spooled_then_replayed_once_in_order(
    settings_factory: SettingsFactory, tmp_path: Path,
) -> None:
    live = settings_factory()
    dead = live.model_copy(update={"kafka_bootstrap_servers": dead_address()})
    options = ProducerOptions(spool_dir=tmp_path / "spool", max_batch_events=50,
                              connect_timeout_ms=2000, spool_fsync="always")

    async def offline() -> list[str]:
        async with UsageProducer(dead, options) as producer:
            assert not producer.connected
            ids = await record_numbered(producer, 0, 1500)
        return ids

    ids = run(offline())
    assert segment_files(tmp_path / "spool")  # durable on disk, process gone

    async def back_online() -> list[Any]:
        async with UsageProducer(live, options) as producer:  # replays on start
            await producer.flush()
            assert producer.spooled_records == 0
        return await consume(live, live.topics.usage, len(ids))

    events = all_events(run(back_online()))
    assert sorted(e["id"] for e in events) == ids  # every event, exactly once
    assert_in_order_per_tenant(events)
    assert segment_files(tmp_path / "spool") == []


def test_a_full_spool_refuses_new_events_and_every_event_it_took_is_delivered(
    settings_factory: SettingsFactory, tmp_path: Path,
) -> None:
    live = settings_factory()
    dead = live.model_copy(update={"kafka_bootstrap_servers": dead_address()})
    options = ProducerOptions(spool_dir=tmp_path, max_batch_events=50, linger_ms=1,
                              connect_timeout_ms=2000, spool_max_bytes=40_000)

    async def offline() -> list[str]:
        taken: list[str] = []
        async with UsageProducer(dead, options) as producer:
            with pytest.raises(SpoolFullError, match="spool"):
                for i in range(20_000):
                    taken += await record_numbered(producer, i, 1)
                    await asyncio.sleep(0)  # let the spooling tasks run
            with pytest.raises(SpoolFullError):  # still full: nothing replays it
                await producer.subscription_created("tenant-0", "pro", *_PERIOD)
        return taken

    taken = run(offline())
    spooled = sum(f.stat().st_size for f in segment_files(tmp_path))
    # Refused once full, not before; what was taken stays, past the bound by a batch or so.
    assert 40_000 <= spooled < 40_000 + 2 * 50 * 400 and len(taken) >= 50

    async def back_online() -> list[Any]:
        async with UsageProducer(live, options) as producer:  # replays on start
            await producer.flush()
            assert producer.spooled_records == 0
            await producer.record("tenant-0", "api_calls", 1, event_id="ev-after")
        return await consume(live, live.topics.usage, len(taken) + 1)

    events = all_events(run(back_online()))
    assert sorted(e["id"] for e in events) == sorted([*taken, "ev-after"])  # each once


_PERIOD = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))


def test_new_events_wait_behind_the_spool_until_it_is_replayed(
    settings_factory: SettingsFactory, tmp_path: Path,
) -> None:
    live = settings_factory()
    dead = live.model_copy(update={"kafka_bootstrap_servers": dead_address()})
    options = ProducerOptions(spool_dir=tmp_path, max_batch_events=20)

    async def scenario() -> list[Any]:
        async with UsageProducer(dead, options) as producer:
            await record_numbered(producer, 0, 400)
        async with UsageProducer(live, options) as producer:
            # Recorded while the replay may still run: must land after the spooled ones.
            await record_numbered(producer, 400, 400)
        return await consume(live, live.topics.usage, 800)

    events = all_events(run(scenario()))
    assert sorted(e["id"] for e in events) == [f"ev-{i:06d}" for i in range(800)]
    assert_in_order_per_tenant(events)
    assert segment_files(tmp_path) == []


def test_a_broker_that_goes_away_mid_stream_gets_the_spooled_events_when_it_returns(
    tmp_path: Path,
) -> None:
    """Own broker (the session's is shared); Tansu is memory-only, so the broker that
    returns is empty and only holds what was sent after it came back."""
    home = tmp_path / "kafka"
    home.mkdir()
    address, pid = devstack.start_kafka(home)
    port = int(address.rsplit(":", 1)[1])
    settings = Settings(kafka_bootstrap_servers=address, topic_prefix="midstream.", partitions=2)
    options = ProducerOptions(
        spool_dir=tmp_path / "spool", delivery_timeout_ms=1500, connect_timeout_ms=1000,
        reconnect_backoff_max_ms=300, max_batch_events=50, linger_ms=5,
    )
    pids = [pid]

    async def scenario() -> tuple[list[str], list[str], list[Any]]:
        await kafka.ensure_topics(settings)
        async with UsageProducer(settings, options) as producer:
            await record_numbered(producer, 0, 300)
            await producer.flush()
            assert producer.connected

            kill_tansu(pids[0])
            during = await record_numbered(producer, 300, 300)
            await producer.flush()  # cannot be delivered: returns once spooled
            assert not producer.connected
            assert producer.spooled_records > 0

            pids.append(start_tansu_on(port, home))
            await kafka.ensure_topics(settings)
            deadline = time.monotonic() + 30
            while (producer.spooled_records or not producer.connected) and (
                time.monotonic() < deadline
            ):
                await asyncio.sleep(0.1)
            assert producer.spooled_records == 0
            after = await record_numbered(producer, 600, 300)
        return during, after, await consume(settings, settings.topics.usage, 600)

    try:
        during, after, received = run(scenario())
    finally:
        for p in pids:
            kill_tansu(p)
    events = all_events(received)
    assert sorted(e["id"] for e in events) == during + after  # exactly once each
    assert_in_order_per_tenant(events)
    assert segment_files(tmp_path / "spool") == []
