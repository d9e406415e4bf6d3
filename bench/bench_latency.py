"""Freshness under load: from an event's recording to the quota state and the ledger row
that count it, with every stage running on the same machine.

    python -m bench.bench_latency --rates 5000,20000,50000 --seconds 20 --hold-seconds 60 \
        --out FILE

One pipeline runs for the whole benchmark: `tally worker` (with its pre-batching child),
`tally project`, the broker and Postgres, and in this process the producer SDK
(`UsageProducer`, default options) recording usage at a steady rate for `--tenants`
tenants (api_calls on the Enterprise plan, so nothing is ever blocked), while two
observers watch the far ends:
- quota state: a `QuotaView` (what a service embeds), following `tally.quota-state`;
- ledger: a Postgres connection polling the per-period rollup every POLL_SECONDS (it is
  written in the ledger's own transaction, so its event count is the ledger's).
The producer works in ticks of TICK_SECONDS; the events of one tenant in one tick form a
sample, timed from the tick's start to the first observation that counts them all. So a
figure includes the SDK's linger, every Kafka hop, the worker, the projector's
transaction and the observer's own fetch wait or poll interval.

Phases, each after the pipeline has caught up with the one before:
1. every rate of `--rates` for `--seconds` (after `--warmup` seconds left out):
   p50/p95/p99/max to quota state and to the ledger, CPU cores used by each stage;
2. the highest rate held: short probes (`--seconds` each) between the highest rate of
   phase 1 that held and the lowest that did not (at most `--probes`), then the best for
   `--hold-seconds` (and, if that does not hold, once more a quarter lower: at most
   HOLD_ATTEMPTS long windows fit the time budget). A phase holds when the producer kept
   the rate (97%), every event reached both ends, and the lag (events recorded but not yet
   counted, in seconds of traffic) at the end of the phase is within LAG_GROWTH_SECONDS of
   the lag at its start.
Each phase also reports the cores each stage used, what other processes on the machine
used meanwhile, and the stages' own counters (worker batches, projector transactions).

Starts its own Tansu and Postgres unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are set.
Appends one JSON object per phase (JSON lines) to `--out` and prints each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg

from bench.procs import CpuMeter, postgres_pid
from bench.profiling import Profile, format_summary
from bench.report import append_rows
from bench.scratch import scratch_home
from devtools import devstack
from devtools.child import start_tally, wait_healthy
from producers import ProducerOptions, UsageProducer
from runtime import kafka
from runtime.plans import publish_catalog
from runtime.postgres import migrate
from runtime.settings import Settings
from schemas.plans import default_catalog_path, load_catalog
from streams.quota_view import QuotaView

TICK_SECONDS = 0.005
POLL_SECONDS = 0.02
SAMPLE_LAG_SECONDS = 0.5
LAG_GROWTH_SECONDS = 0.5
KEPT_RATE = 0.97
DRAIN_SECONDS = 45
HOLD_ATTEMPTS = 2  # the long window, then once more a quarter lower (the time budget)
PROFILED_RATE = 20_000
METER = "api_calls"
BENCH = "bench (producer SDK, observers)"


@dataclass
class End:
    """One far end (quota state or ledger): what it has counted per tenant, and the
    samples waiting for it."""

    name: str
    seen: dict[str, float] = field(default_factory=dict)
    waiting: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    measured_from: float = float("inf")

    def expect(self, tenant: str, total: float, at: float) -> None:
        self.waiting.setdefault(tenant, deque()).append((total, at))

    def observe(self, tenant: str, total: float, now: float) -> None:
        if total <= self.seen.get(tenant, 0.0):
            return
        self.seen[tenant] = total
        waiting = self.waiting.get(tenant)
        while waiting and waiting[0][0] <= total:
            _, at = waiting.popleft()
            if at >= self.measured_from:
                self.latencies.append(now - at)

    def counted(self) -> float:
        return sum(self.seen.values())

    def pending(self) -> int:
        return sum(len(w) for w in self.waiting.values())


class ObservedQuotaView(QuotaView):
    """A QuotaView that reports each tenant's `used` as it applies a state."""

    def __init__(self, settings: Settings, end: End) -> None:
        super().__init__(settings)
        self.end = end

    def apply(self, key: str, value: bytes | None) -> None:
        super().apply(key, value)
        tenant, _, meter = key.rpartition("/")
        state = self.state(tenant, meter) if meter == METER else None
        if state is not None:
            self.end.observe(tenant, float(state.used), time.perf_counter())


async def poll_ledger(database_url: str, end: End, stop: asyncio.Event) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        while not stop.is_set():
            rows = await (await conn.execute(
                "SELECT tenant_id, sum(event_count) FROM tally.usage_by_period"
                " WHERE meter = %s GROUP BY tenant_id", (METER,))).fetchall()
            now = time.perf_counter()
            for tenant, count in rows:
                end.observe(tenant, float(count), now)
            await asyncio.sleep(POLL_SECONDS)


def _pct(samples: list[float], q: float) -> float:
    return round(samples[min(int(q * len(samples)), len(samples) - 1)] * 1000, 1)


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    if not ordered:
        return {}
    return {"p50_ms": _pct(ordered, 0.5), "p95_ms": _pct(ordered, 0.95),
            "p99_ms": _pct(ordered, 0.99), "max_ms": round(ordered[-1] * 1000, 1),
            "samples": len(ordered)}


# The stages' own counters, read before and after a phase: (metric, its label text).
STAGE_METRICS = {
    "worker_batches": "tally_worker_batch_seconds_count",
    "worker_batch_seconds": "tally_worker_batch_seconds_sum",
    "worker_source_records": 'tally_worker_prebatch_records_total',
    "projector_transactions": "tally_projection_write_seconds_count",
    "projector_transaction_seconds": "tally_projection_write_seconds_sum",
    "projector_records": "tally_projection_batch_records_sum",
}


def scrape(ports: list[int]) -> dict[str, float]:
    """The STAGE_METRICS of the stages' /metrics pages (a stage that does not answer
    counts nothing)."""
    values: dict[str, float] = {}
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            for key, metric in STAGE_METRICS.items():
                if name == metric:
                    values[key] = values.get(key, 0.0) + float(value)
    return values


def per_second(before: dict[str, float], after: dict[str, float],
               seconds: float) -> dict[str, float]:
    """Rates of the stage counters over a phase, and the mean time per batch and per
    transaction."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in STAGE_METRICS}
    out = {f"{k}_per_s": round(delta[k] / seconds, 1) for k in
           ("worker_batches", "worker_source_records", "projector_transactions",
            "projector_records")}
    if delta["worker_batches"]:
        out["worker_ms_per_batch"] = round(
            1000 * delta["worker_batch_seconds"] / delta["worker_batches"], 1)
    if delta["projector_transactions"]:
        out["projector_ms_per_transaction"] = round(
            1000 * delta["projector_transaction_seconds"] / delta["projector_transactions"], 1)
    return out


class Pipeline:
    """The running stages, the producer and both observers, for all phases."""

    def __init__(self, settings: Settings, tenants: int, pids: dict[str, int | None],
                 metrics_ports: list[int] | None = None,
                 options: ProducerOptions | None = None) -> None:
        self.settings = settings
        self.options = options or ProducerOptions(source="bench/latency")
        self.metrics_ports = metrics_ports or []
        self.tenants = [f"tenant-{t}" for t in range(tenants)]
        self.totals = dict.fromkeys(self.tenants, 0.0)
        self.quota = End("quota_state")
        self.ledger = End("ledger")
        self.pids = pids

    async def run_phases(self, plan: Callable[[Pipeline], Any]) -> list[dict[str, Any]]:
        view = ObservedQuotaView(self.settings, self.quota)
        stop = asyncio.Event()
        self.producer = UsageProducer(self.settings, self.options)
        await self.producer.start()
        await view.start()
        poller = asyncio.create_task(poll_ledger(self.settings.require_database(),
                                                 self.ledger, stop))
        try:
            result: list[dict[str, Any]] = await plan(self)
            return result
        finally:
            stop.set()
            await poller
            await view.stop()
            await self.producer.close()

    async def phase(self, rate: int, seconds: float, warmup: float,
                    profile: Path | None = None) -> dict[str, Any]:
        """Record at `rate` events/s for warmup + seconds; measure the last `seconds`.
        With `profile`, py-spy samples the worker and the projector meanwhile, and their
        summaries go there."""
        profilers = {name: Profile(self.pids[name], warmup + seconds).__enter__()
                     for name in ("worker", "projector") if profile is not None}
        for end in (self.quota, self.ledger):
            end.latencies = []
        lag: list[tuple[float, float, float]] = []  # (time, quota lag, ledger lag) in events
        started = time.perf_counter()
        measured_from = started + warmup
        self.quota.measured_from = self.ledger.measured_from = measured_from
        cpu = CpuMeter({**self.pids, BENCH: os.getpid()}, alone=frozenset({BENCH}))
        sent = 0
        sent_measured_from = 0
        counters: dict[str, float] = {}
        next_lag = measured_from
        producer, tenants, totals = self.producer, self.tenants, self.totals
        count_per_tenant: dict[str, int] = {}
        measuring = False
        while (now := time.perf_counter()) < measured_from + seconds:
            if not measuring and now >= measured_from:
                measuring = True
                sent_measured_from = sent
                cpu.start()
                counters = scrape(self.metrics_ports)
            due = int((now - started) * rate)
            count_per_tenant.clear()
            while sent < due:
                tenant = tenants[sent % len(tenants)]
                await producer.record(tenant, METER, 1)
                count_per_tenant[tenant] = count_per_tenant.get(tenant, 0) + 1
                sent += 1
            for tenant, n in count_per_tenant.items():
                totals[tenant] += n
                self.quota.expect(tenant, totals[tenant], now)
                self.ledger.expect(tenant, totals[tenant], now)
            if measuring and now >= next_lag:
                expected = sum(totals.values())
                lag.append((now, expected - self.quota.counted(),
                            expected - self.ledger.counted()))
                next_lag += SAMPLE_LAG_SECONDS
            await asyncio.sleep(TICK_SECONDS)
        cores = cpu.stop()
        stages = per_second(counters, scrape(self.metrics_ports), seconds)
        sent_rate = (sent - sent_measured_from) / seconds
        if profile is not None:
            for profiler in profilers.values():
                profiler.__exit__()
            profile.write_text("\n\n".join(
                format_summary(f"{name} at {rate:,} events/s, all stages running",
                               profiler.summary()) for name, profiler in profilers.items())
                + "\n")
        await producer.flush()
        drained = await self._drain()
        row: dict[str, Any] = {
            "bench": "freshness", "rate_events_per_s": rate, "seconds": seconds,
            "warmup": warmup, "tenants": len(tenants),
            "sent_events_per_s": round(sent_rate),
            "quota_state": percentiles(self.quota.latencies),
            "ledger": percentiles(self.ledger.latencies),
            "cpu_cores": cores, "stages": stages,
        }
        row.update(self._lag_verdict(lag, rate, sent_rate, drained))
        return row

    def _lag_verdict(self, lag: list[tuple[float, float, float]], rate: int, sent_rate: float,
                     drained: bool) -> dict[str, Any]:
        quarter = max(len(lag) // 4, 1)
        verdict: dict[str, Any] = {"all_arrived": drained,
                                   "producer_kept_rate": sent_rate >= KEPT_RATE * rate}
        held = drained and sent_rate >= KEPT_RATE * rate
        for index, name in ((1, "quota_state"), (2, "ledger")):
            first = statistics.mean(s[index] for s in lag[:quarter]) / rate if lag else 0.0
            last = statistics.mean(s[index] for s in lag[-quarter:]) / rate if lag else 0.0
            verdict[f"{name}_lag_s"] = [round(first, 3), round(last, 3)]
            held = held and last - first <= LAG_GROWTH_SECONDS
        verdict["held"] = held
        return verdict

    async def _drain(self) -> bool:
        """Wait until both ends counted everything recorded; False if they did not."""
        deadline = time.perf_counter() + DRAIN_SECONDS
        while self.quota.pending() or self.ledger.pending():
            if time.perf_counter() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


def plan_phases(rates: list[int], seconds: float, warmup: float, hold_seconds: float,
                probes: int, profile_dir: Path | None) -> Callable[[Pipeline], Any]:
    async def plan(pipeline: Pipeline) -> list[dict[str, Any]]:
        rows = []
        for rate in rates:
            profile = (profile_dir / f"profile-pipeline-{rate // 1000}k.txt"
                       if profile_dir is not None and rate == PROFILED_RATE else None)
            rows.append(report(await pipeline.phase(rate, seconds, warmup, profile), "rate"))
        held = [r["rate_events_per_s"] for r in rows if r["held"]]
        failed = [r["rate_events_per_s"] for r in rows if not r["held"]]
        low = max(held, default=0)
        high = min((r for r in failed if r > low), default=None)
        tried = []
        for _ in range(probes):
            # Bisect between the best held and the lowest failed; above every rate, step up.
            candidate = int(low * 1.3) if high is None else (low + high) // 2
            candidate = candidate // 1000 * 1000
            if candidate <= low or (high is not None and candidate >= high):
                break
            row = report(await pipeline.phase(candidate, seconds, warmup), "probe")
            tried.append(row)
            if row["held"]:
                low = candidate
            else:
                high = candidate
        rows += tried
        best = low
        hold: dict[str, Any] | None = None
        for _ in range(HOLD_ATTEMPTS if hold_seconds > 0 else 0):
            if best <= 0:
                break
            hold = report(await pipeline.phase(best, hold_seconds, warmup), "hold")
            rows.append(hold)
            if hold["held"]:
                break
            best = best * 3 // 4 // 1000 * 1000  # not held for the long window: step down
        else:
            best = 0 if hold is None or not hold["held"] else best
        rows.append({"bench": "freshness_highest_held", "rate_events_per_s": best,
                     "seconds": hold_seconds, "probed": [r["rate_events_per_s"] for r in tried],
                     "hold": hold})
        return rows

    return plan


def report(row: dict[str, Any], kind: str) -> dict[str, Any]:
    row["phase"] = kind
    q, ledger = row["quota_state"], row["ledger"]
    print(f"{kind} {row['rate_events_per_s']:>6}/s (sent {row['sent_events_per_s']}/s): quota "
          f"p50 {q.get('p50_ms')} p99 {q.get('p99_ms')} ms, ledger p50 {ledger.get('p50_ms')} "
          f"p99 {ledger.get('p99_ms')} ms, lag {row['quota_state_lag_s']} "
          f"{row['ledger_lag_s']} s, held {row['held']}, cores {row['cpu_cores']}, "
          f"stages {row['stages']}", flush=True)
    return row


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


@contextlib.contextmanager
def stack(home: Path) -> Iterator[tuple[str, str, dict[str, int | None]]]:
    """(bootstrap, database url, pids of the broker and Postgres): embedded where not set."""
    stops: list[Callable[[], None]] = []
    pids: dict[str, int | None] = {}
    try:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
        if not bootstrap:
            bootstrap, pids["broker (tansu)"] = devstack.start_kafka(home)
            kafka_pid = pids["broker (tansu)"]
            stops.append(lambda: devstack.stop_kafka(kafka_pid))  # type: ignore[arg-type]
        database_url = os.environ.get("DATABASE_URL", "")
        if not database_url:
            database_url, pg_data = devstack.start_postgres(home)
            stops.append(lambda: devstack.stop_postgres(pg_data))
            pids["postgres"] = postgres_pid(pg_data)
        yield bootstrap, database_url, pids
    finally:
        for stop in reversed(stops):
            stop()


def run(args: argparse.Namespace, home: Path) -> list[dict[str, Any]]:
    with stack(home) as (bootstrap, database_url, pids):
        settings = Settings(kafka_bootstrap_servers=bootstrap, database_url=database_url,
                            topic_prefix=f"bench-fresh-{uuid.uuid4().hex[:6]}.",
                            worker_id="bench-fresh", partitions=4)
        asyncio.run(kafka.ensure_topics(settings))
        asyncio.run(publish_catalog(settings, load_catalog(default_catalog_path())))
        asyncio.run(subscribe_enterprise(settings, args.tenants))
        migrate(database_url)
        port, metrics_port = devstack.free_port(), devstack.free_port()
        worker = start_tally(settings, ["worker", "--web-port", str(port), "--loglevel",
                                        "warning"], home / "worker.log")
        projector = start_tally(settings, ["project", "--metrics-port", str(metrics_port)],
                                home / "projector.log")
        try:
            wait_healthy(port)
            pipeline = Pipeline(settings, args.tenants, {
                "worker": worker.pid, "projector": projector.pid, **pids},
                [port, metrics_port],
                ProducerOptions(source="bench/latency", **(
                    {} if args.linger_ms is None else {"linger_ms": args.linger_ms})))
            plan = plan_phases(args.rates, args.seconds, args.warmup, args.hold_seconds,
                               args.probes, args.profile_dir)
            return asyncio.run(pipeline.run_phases(plan))
        finally:
            for proc in (worker, projector):
                proc.terminate()
            for proc in (worker, projector):
                proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=lambda s: [int(r) for r in s.split(",")],
                        default=[5000, 20000, 50000], help="events per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=20, help="measured time per rate")
    parser.add_argument("--warmup", type=float, default=3,
                        help="seconds of traffic before measuring (left out)")
    parser.add_argument("--hold-seconds", type=float, default=60)
    parser.add_argument("--probes", type=int, default=2)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--linger-ms", type=float, default=None,
                        help="the SDK's linger (default: ProducerOptions' default)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/latency.jsonl"))
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help=f"profile the worker and projector at {PROFILED_RATE:,}/s")
    args = parser.parse_args()
    home = scratch_home("tally-bench-latency-")
    rows = run(args, home)
    append_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
