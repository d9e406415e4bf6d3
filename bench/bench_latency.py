"""Latency benchmark: from an event's publication to the quota state that counts it.

    python -m bench.bench_latency --rate 20000 --seconds 15 --out FILE

Publishes usage at a steady rate (records of 20 events, --tenants tenants, api_calls on the
Enterprise plan so nothing is ever blocked) to a running `tally worker`, while reading
`tally.quota-state`. For each published record, the latency is the time until a quota
state of its tenant shows a `used` at least as high as the tenant's total after that
record. Reports p50/p99/max; the issue's target is p99 under 1 s at 20k events/s.
Starts its own Tansu unless KAFKA_BOOTSTRAP_SERVERS is set.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
from aiokafka import TopicPartition

from devtools import devstack
from devtools.child import start_tally, wait_healthy
from runtime import kafka
from runtime.plans import publish_catalog
from runtime.settings import Settings
from schemas.plans import default_catalog_path, load_catalog

EVENTS_PER_RECORD = 20


async def subscribe_enterprise(settings: Settings, tenants: int) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2036, 1, 1, tzinfo=UTC)
    try:
        for t in range(tenants):
            tenant = f"tenant-{t}"
            event = {"specversion": "1.0", "id": uuid.uuid4().hex, "source": "bench",
                     "type": "tally.subscription.created.v1", "subject": tenant,
                     "time": start.isoformat(), "data": {
                         "plan_id": "enterprise", "period_start": start.isoformat(),
                         "period_end": end.isoformat()}}
            await producer.send_and_wait(settings.topics.subscriptions, key=tenant.encode(),
                                         value=orjson.dumps(event))
    finally:
        await producer.stop()


async def measure(settings: Settings, rate: int, seconds: float, warmup: float,
                  tenants: int) -> list[float]:
    sent: dict[str, list[tuple[float, float]]] = {}  # tenant -> [(cumulative, sent_at)]
    seen: dict[str, float] = {}
    latencies: list[float] = []
    consumer = kafka.consumer(settings)
    await consumer.start()
    topic = settings.topics.quota_state
    tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    producer = kafka.producer(settings, linger_ms=2)
    await producer.start()
    done = asyncio.Event()

    async def read() -> None:
        while not done.is_set() or any(
            seen.get(t, 0) < pending[-1][0] for t, pending in sent.items() if pending
        ):
            batch = await consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batch.values():
                for r in records:
                    state = orjson.loads(r.value)
                    tenant, used = state["tenant_id"], float(state["used"])
                    if used <= seen.get(tenant, 0):
                        continue
                    seen[tenant] = used
                    pending = sent.get(tenant, [])
                    reached = bisect.bisect_right(pending, (used, float("inf")))
                    latencies.extend(now - at for _, at in pending[:reached]
                                     if at >= measured_from)
                    del pending[:reached]
            if done.is_set() and time.perf_counter() - done_at[0] > 30:
                break

    done_at = [0.0]
    reader = asyncio.create_task(read())
    totals = dict.fromkeys((f"tenant-{t}" for t in range(tenants)), 0.0)
    records_per_s = rate / EVENTS_PER_RECORD
    started = time.perf_counter()
    measured_from = started + warmup  # the worker restores its state on the first batch
    n = 0
    now_text = datetime.now(UTC).isoformat()
    while time.perf_counter() - started < warmup + seconds:
        due = int((time.perf_counter() - started) * records_per_s)
        while n < due:
            tenant = f"tenant-{n % tenants}"
            events = [{"specversion": "1.0", "id": uuid.uuid4().hex, "source": "bench",
                       "type": "tally.usage.v1", "subject": tenant, "time": now_text,
                       "data": {"meter": "api_calls", "quantity": "1"}}
                      for _ in range(EVENTS_PER_RECORD)]
            await producer.send(settings.topics.usage, key=tenant.encode(),
                                value=orjson.dumps(events))
            totals[tenant] += EVENTS_PER_RECORD
            sent.setdefault(tenant, []).append((totals[tenant], time.perf_counter()))
            n += 1
        await asyncio.sleep(0.005)
    await producer.flush()
    done_at[0] = time.perf_counter()
    done.set()
    await reader
    await producer.stop()
    await consumer.stop()
    unmatched = sum(len(p) for p in sent.values())
    if unmatched:
        raise RuntimeError(f"{unmatched} records never showed up in a quota state")
    return latencies


def run(bootstrap: str, args: argparse.Namespace, home: Path) -> list[float]:
    """Start a worker on `bootstrap`, publish at the steady rate: the sorted latencies."""
    settings = Settings(kafka_bootstrap_servers=bootstrap, topic_prefix="bench-latency.",
                        worker_id="bench-latency", partitions=4)
    asyncio.run(kafka.ensure_topics(settings))
    asyncio.run(publish_catalog(settings, load_catalog(default_catalog_path())))
    asyncio.run(subscribe_enterprise(settings, args.tenants))
    port = devstack.free_port()
    worker = start_tally(
        settings, ["worker", "--web-port", str(port), "--loglevel", "warning"],
        home / "worker.log")
    try:
        wait_healthy(port)
        return sorted(asyncio.run(measure(settings, args.rate, args.seconds,
                                          args.warmup, args.tenants)))
    finally:
        worker.terminate()
        worker.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=20_000, help="events per second")
    parser.add_argument("--seconds", type=float, default=15, help="measured time")
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--warmup", type=float, default=3,
                        help="seconds of traffic before measuring (left out)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/latency.jsonl"))
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="tally-bench-latency-"))
    with devstack.embedded_where_missing(home, os.environ, postgres=False) as env:
        latencies = run(env["KAFKA_BOOTSTRAP_SERVERS"], args, home)

    def pct(q: float) -> float:
        return round(latencies[min(int(q * len(latencies)), len(latencies) - 1)] * 1000, 1)

    row = {"bench": "event_to_quota_state", "at": datetime.now(UTC).isoformat(),
           "rate_events_per_s": args.rate, "tenants": args.tenants, "seconds": args.seconds,
           "warmup": args.warmup,
           "records": len(latencies),
           "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0),
           "target_p99_ms": 1000, "met": pct(0.99) < 1000}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("ab") as f:
        f.write(orjson.dumps(row) + b"\n")
    print(orjson.dumps(row).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
