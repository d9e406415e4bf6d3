"""Worker benchmark: Tally's worker against two baselines on the same records, same run.

    python -m bench.bench_worker --batch-events 500000 --single-events 150000 --rounds 3 --out FILE

Two datasets, each published once and read by every contender through its own consumer
group: batch records (500 events per record, the SDK's format) and one-event records.
Contenders:
- tally: `tally worker` (dedup, periods, quotas, accepted events, DLQ, changelog);
- faust-textbook: a Faust agent adding each event to a Faust table (bench/baselines);
- quixstreams: a quixstreams app doing the same stateful per-tenant sum.
Each figure is events / (time from the first to the last event processed). Tally's is
read from its Prometheus counter, polled every 100 ms: the rate of the events counted
between the first poll that sees counting and the poll that sees them all. The whole is
repeated `--rounds` times on fresh topics, contenders in a rotating order, and each
contender's median rate is reported: this shared machine's speed drifts by a fifth from
minute to minute.

Starts its own Tansu unless KAFKA_BOOTSTRAP_SERVERS is set. Appends one JSON object per
figure to `--out` (JSON lines) and prints a table with ratios against the baselines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from devtools import devstack
from devtools.child import start_tally
from runtime import kafka
from runtime.plans import publish_catalog
from runtime.settings import Settings
from schemas.plans import default_catalog_path, load_catalog

TENANTS = 100
_COUNTED = re.compile(r'^tally_worker_events_total\{outcome="counted"\} ([0-9.e+]+)$', re.M)


def make_records(events: int, per_record: int) -> list[tuple[bytes, bytes]]:
    """`events` events of TENANTS tenants, `per_record` per record, stamped as the SDK
    stamps them: each tenant produces one event per millisecond, so a record's events have
    distinct times, and records of different tenants share them (as when 100 tenants send
    at once)."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=events // 1000 + 60)
    records = []
    for first in range(0, events, per_record * TENANTS):
        for t in range(TENANTS):
            tenant = f"tenant-{t}"
            count = min(per_record, events - first - t * per_record)
            ms = first // TENANTS  # this tenant's events so far
            batch = [
                {"specversion": "1.0", "id": uuid.uuid4().hex, "source": "bench",
                 "type": "tally.usage.v1", "subject": tenant,
                 "time": _sdk_time(start + timedelta(milliseconds=ms + i)),
                 "data": {"meter": "api_calls", "quantity": "1"}}
                for i in range(count)
            ]
            if batch:
                value = orjson.dumps(batch if per_record > 1 else batch[0])
                records.append((tenant.encode(), value))
    return records


def _sdk_time(moment: datetime) -> str:
    """The text the producer SDK writes for a time: microseconds, "Z", no fraction if zero."""
    return moment.isoformat().replace("+00:00", "Z")


async def publish(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        futures = [await producer.send(settings.topics.usage, key=k, value=v)
                   for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def run_tally(settings: Settings, expected: int, home: Path) -> float:
    """Seconds tally would take for `expected` events, from its counter's growth between
    the first poll that sees counting and the poll that sees all (events counted before
    the first sighting are left out of the rate, so late sightings cannot inflate it)."""
    port = devstack.free_port()
    proc = start_tally(settings, ["worker", "--web-port", str(port), "--loglevel", "warning"],
                       home / "worker.log")
    first = last = 0.0
    counted_at_first = 0.0
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    match = _COUNTED.search(r.read().decode())
            except OSError:
                continue
            counted = float(match.group(1)) if match else 0.0
            now = time.perf_counter()
            if counted > 0 and not first:
                first, counted_at_first = now, counted
            if counted >= expected:
                last = now
                break
        else:
            raise RuntimeError(f"tally worker did not finish; see {home / 'worker.log'}")
    finally:
        proc.terminate()
        proc.wait(30)
    if counted_at_first >= expected:
        raise RuntimeError("all events were counted before the first poll: use more events")
    return (last - first) * expected / (expected - counted_at_first)


def run_baseline(module: str, args: list[str]) -> float:
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                         text=True, timeout=300)
    # Faust prints terminal escapes before our line: search, don't anchor.
    if match := re.search(r"DONE (\d+) ([0-9.]+)", out.stdout):
        return float(match.group(2))
    raise RuntimeError(f"{module} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def run_round(name: str, bootstrap: str, events: int, per_record: int, home: Path,
              round_no: int) -> dict[str, float]:
    """Publish a fresh copy of the dataset and time every contender on it, each in its own
    consumer group (and tally with fresh state): contender -> seconds. The order rotates
    with `round_no`, so no contender always runs first after the publish."""
    settings = Settings(kafka_bootstrap_servers=bootstrap,
                        topic_prefix=f"bench-{name}-{round_no}.",
                        worker_id=f"bench-tally-{name}-{round_no}", partitions=4)
    asyncio.run(kafka.ensure_topics(settings))
    asyncio.run(publish_catalog(settings, load_catalog(default_catalog_path())))
    asyncio.run(publish(settings, make_records(events, per_record)))
    topic = settings.topics.usage
    runs: dict[str, Callable[[], float]] = {
        "tally": lambda: run_tally(settings, events, home),
        "faust-textbook": lambda: run_baseline(
            "bench.baselines.faust_textbook",
            [bootstrap, topic, str(events), str(devstack.free_port()),
             str(settings.partitions)]),
        "quixstreams": lambda: run_baseline(
            "bench.baselines.quix_sum", [bootstrap, topic, str(events),
                                         tempfile.mkdtemp(prefix="quix-", dir=home)]),
    }
    names = list(runs)
    order = names[round_no % len(names):] + names[:round_no % len(names)]
    return {contender: runs[contender]() for contender in order}


def bench_dataset(name: str, bootstrap: str, events: int, per_record: int, home: Path,
                  rounds: int) -> list[dict[str, Any]]:
    """Every contender's median rate over `rounds` rounds, with the ratios of the medians
    and each round's rates (the machine's speed drifts from minute to minute: one run of
    each would carry that drift into the ratios)."""
    rates: dict[str, list[float]] = {}
    for round_no in range(rounds):
        for contender, seconds in run_round(name, bootstrap, events, per_record, home,
                                            round_no).items():
            rates.setdefault(contender, []).append(events / seconds)
        print(f"{name} round {round_no + 1}/{rounds}: " + ", ".join(
            f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()), flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    return [{
        "bench": "worker", "dataset": name, "events": events, "events_per_record": per_record,
        "contender": k, "rounds": rounds, "events_per_s": round(median[k]),
        "events_per_s_by_round": [round(r) for r in rates[k]],
        "vs_faust_textbook": round(median[k] / median["faust-textbook"], 2),
        "vs_quixstreams": round(median[k] / median["quixstreams"], 2),
    } for k in rates]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Enough for tally to take seconds on each: its counter is polled every 100 ms.
    parser.add_argument("--batch-events", type=int, default=500_000)
    parser.add_argument("--single-events", type=int, default=150_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/worker.jsonl"))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    home = Path(tempfile.mkdtemp(prefix="tally-bench-worker-"))
    with devstack.embedded_where_missing(home, os.environ, postgres=False) as env:
        bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
        rows = bench_dataset("batch", bootstrap, args.batch_events, 500, home, args.rounds)
        rows += bench_dataset("single", bootstrap, args.single_events, 1, home, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("ab") as f:
        for row in rows:
            row["at"] = datetime.now(UTC).isoformat()
            f.write(orjson.dumps(row) + b"\n")
    print(f"medians of {args.rounds} rounds")
    print(f"{'dataset':<8} {'contender':<16} {'events/s':>10} {'x textbook':>11} {'x quix':>8}")
    for r in rows:
        print(f"{r['dataset']:<8} {r['contender']:<16} {r['events_per_s']:>10,} "
              f"{r['vs_faust_textbook']:>11} {r['vs_quixstreams']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
