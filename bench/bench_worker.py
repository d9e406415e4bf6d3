"""Worker benchmark: Tally's worker against three baselines on the same records, same run;
and how its throughput and memory scale with tenants and with events per record.

    python -m bench.bench_worker --batch-events 500000 --single-events 150000 --rounds 3 --out FILE

Two datasets, each published once and read by every contender through its own consumer
group: batch records (500 events per record, the SDK's format) and one-event records.
Contenders:
- tally: `tally worker` (dedup, periods, quotas, accepted events, DLQ, changelog);
- ceiling: a bare aiokafka consumer that only parses the records (bench/baselines): what
  reading them costs, the bound no consumer of them gets far past;
- quixstreams: a quixstreams app doing a stateful per-tenant sum;
- faust-textbook: a Faust agent adding each event to a Faust table, timed over its first
  `--textbook-events` events (it is 15-30 times slower: a whole dataset would take minutes).
Each figure is events / (time from the first to the last event processed). Tally's is
read from its Prometheus counter, polled every 100 ms: the rate of the events counted
between the first poll that sees counting and the poll that sees them all. The whole is
repeated `--rounds` times on fresh topics, contenders in a rotating order, and each
contender's median rate is reported: this shared machine's speed drifts by a fifth from
minute to minute. Tally's peak resident memory (the worker and its pre-batching child) is
sampled every 100 ms.

Scaling (`--scaling-events`, 0 to skip): one tally run and one ceiling run per point, on
fresh topics: tenants 10, 1,000 and 100,000 (records of SCALING_PER_RECORD events), then
1, 10, 100 and 1,000 events per record (100 tenants).

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

from bench.procs import PeakRss
from bench.profiling import Profile, format_summary
from bench.report import append_rows
from bench.scratch import scratch_home
from devtools import devstack
from devtools.child import start_tally
from runtime import kafka
from runtime.plans import publish_catalog
from runtime.settings import Settings
from schemas.plans import default_catalog_path, load_catalog

TENANTS = 100
SCALING_PER_RECORD = 5
TENANT_POINTS = (10, 1_000, 100_000)
PER_RECORD_POINTS = (1, 10, 100, 1_000)
_COUNTED = re.compile(r'^tally_worker_events_total\{outcome="counted"\} ([0-9.e+]+)$', re.M)


def make_records(events: int, per_record: int,
                 tenants: int = TENANTS) -> list[tuple[bytes, bytes]]:
    """`events` events of `tenants` tenants, `per_record` per record, stamped as the SDK
    stamps them: each tenant produces one event per millisecond, so a record's events have
    distinct times, and records of different tenants share them (as when 100 tenants send
    at once)."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=events // 1000 + 60)
    records = []
    for first in range(0, events, per_record * tenants):
        for t in range(tenants):
            tenant = f"tenant-{t}"
            count = min(per_record, events - first - t * per_record)
            ms = first // tenants  # this tenant's events so far
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


async def publish(settings: Settings, records: list[tuple[bytes, bytes]],
                  topic: str | None = None) -> None:
    """Send (key, value) records to `topic` (default: tally.usage), all acknowledged."""
    producer = kafka.producer(settings)
    await producer.start()
    try:
        futures = [await producer.send(topic or settings.topics.usage, key=k, value=v)
                   for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def run_tally(settings: Settings, expected: int, home: Path,
              profile: Path | None = None) -> tuple[float, int]:
    """Seconds tally would take for `expected` events, from its counter's growth between
    the first poll that sees counting and the poll that sees all (events counted before
    the first sighting are left out of the rate, so late sightings cannot inflate it); and
    the peak resident memory of the worker and its pre-batching child, in bytes. With
    `profile`, py-spy samples both processes meanwhile and its summary goes there."""
    port = devstack.free_port()
    proc = start_tally(settings, ["worker", "--web-port", str(port), "--loglevel", "warning"],
                       home / "worker.log")
    first = last = 0.0
    counted_at_first = 0.0
    memory = PeakRss(proc.pid).__enter__()
    profiler = Profile(proc.pid).__enter__() if profile else None
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
        memory.__exit__()
        if profiler is not None and profile is not None:
            profiler.__exit__()
            profile.write_text(format_summary(
                f"tally worker, {expected:,} events", profiler.summary()) + "\n")
        proc.terminate()
        proc.wait(30)
    if counted_at_first >= expected:
        raise RuntimeError("all events were counted before the first poll: use more events")
    return (last - first) * expected / (expected - counted_at_first), memory.peak


def run_baseline(module: str, args: list[str]) -> tuple[float, int]:
    """(seconds, events) a baseline reported for the events it was asked to process."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                         text=True, timeout=300)
    # Faust prints terminal escapes before our line: search, don't anchor.
    if match := re.search(r"DONE (\d+) ([0-9.]+)", out.stdout):
        return float(match.group(2)), int(match.group(1))
    raise RuntimeError(f"{module} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def fresh_topics(name: str, bootstrap: str, records: list[tuple[bytes, bytes]]) -> Settings:
    """Settings of a fresh set of topics holding the catalog and `records`."""
    settings = Settings(kafka_bootstrap_servers=bootstrap, topic_prefix=f"bench-{name}.",
                        worker_id=f"bench-tally-{name}", partitions=4)
    asyncio.run(kafka.ensure_topics(settings))
    asyncio.run(publish_catalog(settings, load_catalog(default_catalog_path())))
    asyncio.run(publish(settings, records))
    return settings


def run_round(name: str, bootstrap: str, events: int, per_record: int, home: Path,
              round_no: int, textbook_events: int,
              profile: Path | None = None) -> dict[str, tuple[float, float]]:
    """Publish a fresh copy of the dataset and time every contender on it, each in its own
    consumer group (and tally with fresh state): contender -> (events/s, peak memory in
    bytes, 0 where not measured). The order rotates with `round_no`, so no contender
    always runs first after the publish."""
    settings = fresh_topics(f"{name}-{round_no}", bootstrap, make_records(events, per_record))
    topic = settings.topics.usage
    textbook = min(events, textbook_events)

    def tally() -> tuple[float, float]:
        seconds, rss = run_tally(settings, events, home, profile)
        return events / seconds, rss

    def baseline(module: str, *args: str) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            seconds, done = run_baseline(module, [bootstrap, topic, *args])
            return done / seconds, 0.0
        return run

    runs: dict[str, Callable[[], tuple[float, float]]] = {
        "tally": tally,
        "ceiling": baseline("bench.baselines.bare_consume", str(events)),
        "quixstreams": baseline("bench.baselines.quix_sum", str(events),
                                tempfile.mkdtemp(prefix="quix-", dir=home)),
        "faust-textbook": baseline("bench.baselines.faust_textbook", str(textbook),
                                   str(devstack.free_port()), str(settings.partitions)),
    }
    names = list(runs)
    order = names[round_no % len(names):] + names[:round_no % len(names)]
    return {contender: runs[contender]() for contender in order}


def bench_dataset(name: str, bootstrap: str, events: int, per_record: int, home: Path,
                  rounds: int, textbook_events: int,
                  profile_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every contender's median rate over `rounds` rounds, with the ratios of the medians
    and each round's rates (the machine's speed drifts from minute to minute: one run of
    each would carry that drift into the ratios)."""
    rates: dict[str, list[float]] = {}
    memory: list[float] = []
    for round_no in range(rounds):
        # The first round is profiled (py-spy samples from outside, at 50 Hz).
        profile = (profile_dir / f"profile-worker-{name}.txt"
                   if profile_dir is not None and round_no == 0 else None)
        for contender, (rate, rss) in run_round(name, bootstrap, events, per_record, home,
                                                round_no, textbook_events, profile).items():
            rates.setdefault(contender, []).append(rate)
            if rss:
                memory.append(rss)
        print(f"{name} round {round_no + 1}/{rounds}: " + ", ".join(
            f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()), flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    rows = []
    for k in rates:
        row: dict[str, Any] = {
            "bench": "worker", "dataset": name, "events": events,
            "events_per_record": per_record, "contender": k, "rounds": rounds,
            "events_per_s": round(median[k]),
            "events_per_s_by_round": [round(r) for r in rates[k]],
            "vs_quixstreams": round(median[k] / median["quixstreams"], 2),
            "vs_faust_textbook": round(median[k] / median["faust-textbook"], 2),
            "of_ceiling": round(median[k] / median["ceiling"], 2),
        }
        if k == "tally":
            row["peak_rss_mib"] = round(statistics.median(memory) / (1 << 20))
        if k == "faust-textbook":
            row["events"] = min(events, textbook_events)
        rows.append(row)
    return rows


def scaling(bootstrap: str, events: int, home: Path) -> list[dict[str, Any]]:
    """Tally and the ceiling at each point of the two scaling axes (one run each)."""
    points = [("tenants", t, t, SCALING_PER_RECORD) for t in TENANT_POINTS]
    points += [("events_per_record", n, TENANTS, n) for n in PER_RECORD_POINTS]
    rows = []
    for axis, value, tenants, per_record in points:
        settings = fresh_topics(f"scale-{axis}-{value}", bootstrap,
                                make_records(events, per_record, tenants))
        seconds, rss = run_tally(settings, events, home)
        ceiling_seconds, ceiling_events = run_baseline(
            "bench.baselines.bare_consume", [bootstrap, settings.topics.usage, str(events)])
        rate, ceiling = events / seconds, ceiling_events / ceiling_seconds
        rows.append({"bench": "worker_scaling", "axis": axis, "value": value,
                     "tenants": tenants, "events_per_record": per_record, "events": events,
                     "events_per_s": round(rate), "ceiling_events_per_s": round(ceiling),
                     "of_ceiling": round(rate / ceiling, 2),
                     "peak_rss_mib": round(rss / (1 << 20))})
        print(f"scaling {axis}={value}: tally {rate:,.0f}/s ({rows[-1]['peak_rss_mib']} MiB),"
              f" ceiling {ceiling:,.0f}/s", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Enough for tally to take seconds on each: its counter is polled every 100 ms.
    parser.add_argument("--batch-events", type=int, default=500_000)
    parser.add_argument("--single-events", type=int, default=150_000)
    parser.add_argument("--textbook-events", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scaling-events", type=int, default=300_000,
                        help="events per scaling point (0: no scaling curves)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/worker.jsonl"))
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="profile tally's first round of each dataset, summaries here")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    home = scratch_home("tally-bench-worker-")
    with devstack.embedded_where_missing(home, os.environ, postgres=False) as env:
        bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
        rows = bench_dataset("batch", bootstrap, args.batch_events, 500, home, args.rounds,
                             args.textbook_events, args.profile_dir)
        rows += bench_dataset("single", bootstrap, args.single_events, 1, home, args.rounds,
                              args.textbook_events, args.profile_dir)
        if args.scaling_events:
            rows += scaling(bootstrap, args.scaling_events, home)
    append_rows(args.out, rows)
    print(f"medians of {args.rounds} rounds")
    print(f"{'dataset':<8} {'contender':<16} {'events/s':>10} {'x quix':>8} {'x textbook':>11}"
          f" {'of ceiling':>11}")
    for r in rows:
        if r["bench"] == "worker":
            print(f"{r['dataset']:<8} {r['contender']:<16} {r['events_per_s']:>10,} "
                  f"{r['vs_quixstreams']:>8} {r['vs_faust_textbook']:>11} {r['of_ceiling']:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
