"""Producer benchmark: the SDK against plain aiokafka, same broker, same run.

    python -m bench.bench_producer --events 200000 --out bench/results/producer.json

(a) baseline: plain aiokafka, one record per event (a single CloudEvent built as a
    service would without the SDK: dict + uuid4 + isoformat, encoded with the codec),
    `send` each then `gather` the futures; acks=all, the shared client settings.
(b) the SDK: `UsageProducer.record` for the same number of events across `--tenants`
    tenants (validation, UUIDv7 ids, batching per tenant, acks=all), then `flush`.
Both are timed from the first event to the last acknowledgement, `--rounds` times in
turns on fresh topics; the figures are the medians. The SDK's events of the last round are
then read back and counted (not timed) so the figure is of delivered events.

Starts its own Tansu unless KAFKA_BOOTSTRAP_SERVERS is set. Appends a result object to the
JSON array in `--out` and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.scratch import scratch_home
from devtools import devstack
from producers import ProducerOptions, UsageProducer
from runtime import kafka
from runtime.settings import Settings
from schemas import codec


async def _baseline(settings: Settings, events: int, tenants: list[str]) -> float:
    producer = kafka.producer(settings)
    await producer.start()
    topic = settings.topics.usage
    headers = codec.content_type_headers(batch=False)
    try:
        started = time.perf_counter()
        futures = []
        for i in range(events):
            tenant = tenants[i % len(tenants)]
            event = {
                "specversion": "1.0", "id": str(uuid.uuid4()), "source": "bench/baseline",
                "subject": tenant, "time": datetime.now(UTC).isoformat(),
                "datacontenttype": "application/json", "type": "tally.usage.v1",
                "data": {"meter": "api_calls", "quantity": "1", "dimensions": {}},
            }
            futures.append(await producer.send(
                topic, value=codec.encode_event(event), key=tenant.encode(), headers=headers
            ))
        await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def _sdk(settings: Settings, events: int, tenants: list[str]) -> float:
    async with UsageProducer(settings, ProducerOptions(source="bench/sdk")) as producer:
        started = time.perf_counter()
        for i in range(events):
            await producer.record(tenants[i % len(tenants)], "api_calls", 1)
        await producer.flush()
        return time.perf_counter() - started


async def _count(settings: Settings, expected: int, timeout: float = 120) -> tuple[int, int]:
    """Events and records on the usage topic, read until `expected` events or timeout
    (never end offsets: the embedded broker undercounts them)."""
    consumer = kafka.consumer(settings, settings.topics.usage)
    await consumer.start()
    events = records = 0
    try:
        deadline = time.monotonic() + timeout
        while events < expected and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                for record in batch:
                    records += 1
                    events += len(codec.decode_record(record.value))
    finally:
        await consumer.stop()
    return events, records


async def _run(address: str, events: int, tenant_count: int, partitions: int,
               rounds: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    tenants = [f"tenant-{i}" for i in range(tenant_count)]
    warm = Settings(kafka_bootstrap_servers=address, topic_prefix=f"bench-{tag}-warm.",
                    partitions=partitions)
    await kafka.ensure_topics(warm)
    await _baseline(warm, 2000, tenants)
    await _sdk(warm, 2000, tenants)

    # Rounds on fresh topics, the two in turns (the machine's speed drifts): medians.
    baseline_runs, sdk_runs = [], []
    for round_no in range(rounds):
        base = warm.model_copy(update={"topic_prefix": f"bench-{tag}-{round_no}-base."})
        sdk = warm.model_copy(update={"topic_prefix": f"bench-{tag}-{round_no}-sdk."})
        for s in (base, sdk):
            await kafka.ensure_topics(s)
        if round_no % 2:
            sdk_runs.append(await _sdk(sdk, events, tenants))
            baseline_runs.append(await _baseline(base, events, tenants))
        else:
            baseline_runs.append(await _baseline(base, events, tenants))
            sdk_runs.append(await _sdk(sdk, events, tenants))
    delivered, records = await _count(sdk, events)
    baseline_s, sdk_s = statistics.median(baseline_runs), statistics.median(sdk_runs)
    baseline_rate = events / baseline_s
    sdk_rate = events / sdk_s
    return {
        "bench": "producer",
        "at": datetime.now(UTC).isoformat(),
        "events": events,
        "tenants": tenant_count,
        "partitions": partitions,
        "baseline_seconds": round(baseline_s, 3),
        "baseline_events_per_s": round(baseline_rate),
        "sdk_seconds": round(sdk_s, 3),
        "sdk_events_per_s": round(sdk_rate),
        "rounds": rounds,
        "sdk_events_per_s_by_round": [round(events / s) for s in sdk_runs],
        "baseline_events_per_s_by_round": [round(events / s) for s in baseline_runs],
        "ratio": round(sdk_rate / baseline_rate, 2),
        "sdk_events_delivered": delivered,
        "sdk_records": records,
        "broker": "embedded tansu" if "KAFKA_BOOTSTRAP_SERVERS" not in os.environ else address,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _append(path: Path, result: dict[str, Any]) -> None:
    results: list[Any] = []
    if path.exists() and path.read_bytes().strip():
        loaded = orjson.loads(path.read_bytes())
        results = loaded if isinstance(loaded, list) else [loaded]
    results.append(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/producer.json"))
    args = parser.parse_args(argv)

    home = scratch_home("tally-bench-")
    with devstack.embedded_where_missing(home, os.environ, postgres=False) as env:
        address = env["KAFKA_BOOTSTRAP_SERVERS"]
        result = asyncio.run(_run(address, args.events, args.tenants, args.partitions,
                                  args.rounds))
    _append(args.out, result)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    target_ok = result["sdk_events_per_s"] >= 300_000
    print(f"target (>=300k events/s): {'met' if target_ok else 'NOT met'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
