"""The read side at scale: `tally api serve` over a 10M-event ledger of 10,000 tenants.

    python -m bench.bench_read --out bench/results/read.jsonl [--events N] [--tenants N]

1. Load: the tables the projector writes that the API reads, straight from SQL
   (`generate_series`, no pipeline): the ledger (`usage_events`, month partitions loaded
   as plain tables, indexed, then attached, the fast path of a bulk load) and the rollup
   the API reads (`usage_by_period`, aggregated from it). Not loaded, to keep the phase
   within its minutes: `usage_daily`, which no API route reads, and the ledger keys
   (`usage_event_keys`), which a consume probes by primary key only (a 10M-row index
   answers that in a few more page reads than an empty one). Events are
   spread over the last 90 days on the seed catalog's four meters, with three dimensions
   (region: 4 values, model: 6, endpoint: 20); one tenant in a hundred is heavy (ten times
   the events of the others). Each step's seconds go in the results.
2. Sequential requests to `tally api serve` on the embedded stack, each figure beside its
   baseline from the same run: the meter query for one tenant, one month, by day, grouped
   by one dimension (target p99 < 50 ms) and the current usage with charges (target p99 <
   20 ms), against a bare HTTP endpoint (`/healthz`) and a `SELECT 1` round trip.
3. Entitlement consume end to end (decision, reservation, publish acknowledged by the
   broker) at a fixed rate of 500 requests/s, open loop: each request is timed from the
   instant it was due, so a slow answer delays none and hides none (target p99 < 10 ms);
   its baselines are the same open loop on `/healthz` and on the consume's own I/O from
   this process without the API (two Postgres round trips, one acknowledged publish:
   `consume_io`), which says what the machine's Postgres and broker allow. Before it,
   consumes one at a time give the latency of a consume with no queue before it. After
   them, one round at 1,200 requests/s (`--overload-rate`, no target): what the API holds
   when requests arrive faster than one at a time can be decided, with its consumes'
   uses per batch and its I/O alone at that rate.

Appends one JSON line per figure to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool

from bench.bench_latency import stack
from bench.procs import CpuMeter
from bench.profiling import Profile, format_summary
from bench.report import append_rows
from bench.scratch import scratch_home
from devtools.child import start_tally, wait_healthy
from devtools.devstack import free_port
from devtools.metrics import sample_sum
from domain.periods import add_months, calendar_month
from runtime import kafka
from runtime.plans import publish_catalog
from runtime.postgres import migrate
from runtime.settings import Settings
from schemas.plans import default_catalog_path, load_catalog

TOKEN = "bench-read"
TARGETS_MS = {"meter_query": 50.0, "current_usage": 20.0, "consume": 10.0}
DAYS = 90


def _months(now: datetime) -> list[datetime]:
    first = calendar_month(now - timedelta(days=DAYS)).start
    months = [first]
    while months[-1] <= now:
        months.append(add_months(months[-1], 1))
    return months


def load(database_url: str, tenants: int, events: int, now: datetime) -> dict[str, float]:
    """The ledger, its keys and rollups (module docstring); seconds per step."""
    seconds: dict[str, float] = {}
    first = now - timedelta(days=DAYS)
    step = DAYS * 86400 / events  # event g is at first + g x step (+ up to an hour)
    heavy = max(tenants // 100, 1)

    def rows(lo: int, hi: int, start: datetime, end: datetime) -> str:
        """Events lo..hi (by time) within [start, end): a heavy tenant for one in ten
        (spread over the heavy ones), else any; meter, dimensions and quantity from g."""
        return f"""
        SELECT 'e' || g, 't' || lpad((CASE WHEN g % 10 = 0 THEN (g / 10) % {heavy} * 100
                       ELSE (hashint4(g::int) & 2147483647) % {tenants} END)::text, 5, '0'),
          (ARRAY['api_calls', 'executions', 'tokens', 'storage_mb'])[1 + g % 4],
          (CASE g % 4 WHEN 2 THEN 1 + g % 2000 WHEN 3 THEN 1 + g % 500 ELSE 1 END)::numeric,
          t, t + interval '2 seconds', 'bench',
          jsonb_build_object('region', (ARRAY['eu', 'us', 'ap', 'sa'])[1 + (g / 4) % 4],
                             'model', 'm' || (g / 16) % 6, 'endpoint', '/v1/e' || (g / 96) % 20),
          '{start.isoformat()}', '{end.isoformat()}', 'free',
          CASE g % 4 WHEN 3 THEN 'max' ELSE 'sum' END
        FROM generate_series({lo}, {hi}) g,
          LATERAL (SELECT least(greatest('{first.isoformat()}'::timestamptz
            + make_interval(secs => g * {step} + (hashint4(g::int) & 4095) % 3600),
            '{start.isoformat()}'), '{end.isoformat()}'::timestamptz - interval '1 ms') AS t) x"""

    months = _months(now)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("SET work_mem = '256MB'")
        started = time.monotonic()
        for start in months:
            end = add_months(start, 1)
            lo = max(1, int((start - first).total_seconds() / step) + 1)
            hi = min(events, int((end - first).total_seconds() / step))
            name = f"tally.usage_events_y{start.year:04d}m{start.month:02d}"
            conn.execute(f"CREATE TABLE {name} (LIKE tally.usage_events INCLUDING DEFAULTS"
                         " INCLUDING CONSTRAINTS)")
            if lo <= hi:
                conn.execute(
                    f"INSERT INTO {name} (event_id, tenant_id, meter, quantity, event_time,"
                    " ingested_at, source, dimensions, period_start, period_end, plan_id,"
                    f" aggregation) {rows(lo, hi, start, end)}")
        seconds["ledger"] = time.monotonic() - started
        started = time.monotonic()
        for start in months:
            name = f"usage_events_y{start.year:04d}m{start.month:02d}"
            conn.execute(f"CREATE INDEX ON tally.{name} (tenant_id, meter, event_time)")
            conn.execute(f"ALTER TABLE tally.usage_events ATTACH PARTITION tally.{name}"
                         f" FOR VALUES FROM ('{start.isoformat()}')"
                         f" TO ('{add_months(start, 1).isoformat()}')")
        seconds["ledger_index"] = time.monotonic() - started
        started = time.monotonic()
        conn.execute(
            "INSERT INTO tally.usage_by_period (tenant_id, meter, period_start, period_end,"
            " plan_id, quantity, event_count, aggregation)"
            " SELECT tenant_id, meter, period_start, min(period_end), 'free',"
            "   CASE min(aggregation) WHEN 'max' THEN max(quantity) ELSE sum(quantity) END,"
            "   count(*), min(aggregation)"
            " FROM tally.usage_events GROUP BY 1, 2, 3")
        seconds["rollups"] = time.monotonic() - started
        # VACUUM too, not only ANALYZE: rows just bulk-inserted are past autovacuum's
        # insert threshold, and its vacuum of the new partitions would otherwise run
        # during the measured requests. A ledger in service is vacuumed as it grows.
        started = time.monotonic()
        for table in ("usage_events", "usage_by_period"):
            conn.execute(f"VACUUM (ANALYZE) tally.{table}")
        seconds["vacuum_analyze"] = time.monotonic() - started
    return {k: round(v, 1) for k, v in seconds.items()}


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(int(q * n), n - 1)] * 1000, 3)

    return {"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99),
            "max_ms": round(ordered[-1] * 1000, 3), "requests": n}


async def sequential(session: aiohttp.ClientSession, paths: list[str]) -> tuple[
        list[float], dict[str, int]]:
    """Each path requested after the previous answered: latencies and status counts."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    for path in paths:
        t0 = time.perf_counter()
        async with session.get(path) as answer:
            await answer.read()
        latencies.append(time.perf_counter() - t0)
        statuses[str(answer.status)] = statuses.get(str(answer.status), 0) + 1
    return latencies, statuses


async def open_loop(rate: int, seconds: float, operation: Callable[[int], Awaitable[str]]
                    ) -> tuple[list[float], dict[str, int]]:
    """`rate` operations a second for `seconds`, each timed from when it was due;
    `operation(i)` gives the answer's status."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    total = int(rate * seconds)
    start = time.perf_counter() + 0.05

    async def one(i: int) -> None:
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        status = "timeout"
        with contextlib.suppress(TimeoutError):  # overloaded: counted, its time kept
            status = await operation(i)
        latencies.append(time.perf_counter() - due)
        statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(one(i) for i in range(total)))
    return latencies, statuses


def http(session: aiohttp.ClientSession, request: Callable[[aiohttp.ClientSession, int], Any]
         ) -> Callable[[int], Awaitable[str]]:
    """An open loop's operation: the HTTP request `request(session, i)`, read whole."""
    async def operation(i: int) -> str:
        async with request(session, i) as answer:
            await answer.read()
            return str(answer.status)
    return operation


@contextlib.asynccontextmanager
async def consume_io(settings: Settings) -> AsyncIterator[Callable[[int], Awaitable[str]]]:
    """The I/O of a consume without the API, from this process: the deciding transaction's
    two Postgres round trips (BEGIN, an advisory lock and a read; an insert and COMMIT) and
    one event of the same size published and acknowledged by the broker, with no linger.
    Its latency at the same rate is what the machine's Postgres and broker allow; the rest
    of a consume's is the API's own work."""
    pool = AsyncConnectionPool(settings.require_database(), min_size=20, max_size=20,
                               open=False, kwargs={"autocommit": True})
    producer = kafka.producer(settings, linger_ms=0)
    await pool.open(wait=True)
    await producer.start()
    try:
        async with pool.connection() as conn:
            # Indexed, as the consume's reads are: an unindexed read would cost more with
            # every round's inserts.
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_consume_io (id text);"
                               " CREATE INDEX IF NOT EXISTS bench_consume_io_id"
                               " ON bench_consume_io (id)")

        async def operation(i: int) -> str:
            async with pool.connection() as conn:
                await conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock(1, {i % 1000});"
                                   f" SELECT count(*) FROM bench_consume_io WHERE id = '{i}'")
                await conn.execute(f"INSERT INTO bench_consume_io VALUES ('{i}'); COMMIT")
            await producer.send_and_wait(settings.topics.usage, b"x" * 300,
                                         key=f"io-{i % 1000}".encode())
            return "ok"
        yield operation
    finally:
        await producer.stop()
        await pool.close()


async def consume_phases(session: aiohttp.ClientSession) -> dict[str, tuple[float, float]]:
    """(seconds, count) of each consume phase so far, from the API's /metrics."""
    async with session.get("/metrics") as answer:
        text = await answer.text()
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        for suffix, index in (("_sum", 0), ("_count", 1)):
            head = f"tally_api_consume_phase_seconds{suffix}{{phase=\""
            if line.startswith(head):
                phase = line[len(head):].split('"', 1)[0]
                found.setdefault(phase, [0.0, 0.0])[index] = float(line.rsplit(" ", 1)[1])
    return {phase: (v[0], v[1]) for phase, v in found.items()}


async def batch_uses(session: aiohttp.ClientSession) -> tuple[float, float]:
    """(uses, batches) of the consumes decided so far, from the API's /metrics."""
    async with session.get("/metrics") as answer:
        text = await answer.text()
    return (sample_sum(text, "tally_api_consume_batch_uses_sum"),
            sample_sum(text, "tally_api_consume_batch_uses_count"))


async def metered(pids: dict[str, int | None],
                  loop: Awaitable[tuple[list[float], dict[str, int]]]
                  ) -> tuple[list[float], dict[str, int], dict[str, float], float]:
    """An open loop's latencies and statuses, the cores each process in `pids` and this
    load generator (which shares the machine: its cores say whether it could keep the
    rate) used meanwhile, and the API's CPU milliseconds per request."""
    cpu = CpuMeter({**pids, "load generator": os.getpid()},
                   alone=frozenset({"load generator"}))
    cpu.start()
    wall = time.perf_counter()
    latencies, statuses = await loop
    wall = time.perf_counter() - wall
    cores = cpu.stop()
    return latencies, statuses, cores, round(cores["api"] * wall * 1000 / len(latencies), 3)


def select_one(database_url: str, n: int) -> list[float]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        latencies = []
        for _ in range(n):
            t0 = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            latencies.append(time.perf_counter() - t0)
    return latencies


async def measure(url: str, settings: Settings, tenants: int, now: datetime,
                  requests: int, rate: int, overload_rate: int, seconds: float,
                  consume_rounds: int, seed: int,
                  pids: dict[str, int | None],
                  profile: tuple[int, Path] | None = None) -> list[dict[str, Any]]:
    """The figures (module docstring). `pids`: the processes whose CPU the open loops are
    charged with (the API, the broker, Postgres; `metered`)."""
    rng = random.Random(seed)
    month = calendar_month(now)
    names = [f"t{i:05d}" for i in range(tenants)]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    connector = aiohttp.TCPConnector(limit=1000)
    rows: list[dict[str, Any]] = []
    # An overloaded open loop would queue for minutes: a request is given up after 10 s.
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(url, headers=headers, connector=connector,
                                     timeout=timeout) as session:
        warm = [f"/v1/tenants/{rng.choice(names)}/usage/current" for _ in range(50)]
        await sequential(session, warm + ["/healthz"] * 50)
        base, _ = await sequential(session, ["/healthz"] * requests)
        sql_base = await asyncio.to_thread(select_one, settings.require_database(), requests)
        baselines = {"http": percentiles(base), "select_1": percentiles(sql_base)}
        query = (f"from={month.start.isoformat()}&to={month.end.isoformat()}"
                 "&window=day&group_by=region").replace("+", "%2B")
        for name, paths in (
            ("meter_query", [f"/v1/meters/api_calls/query?tenant={rng.choice(names)}&{query}"
                             for _ in range(requests)]),
            ("current_usage", [f"/v1/tenants/{rng.choice(names)}/usage/current"
                               for _ in range(requests)]),
        ):
            latencies, statuses = await sequential(session, paths)
            rows.append({"bench": f"read_{name}", **percentiles(latencies),
                         "statuses": statuses, "baseline_http": baselines["http"],
                         "baseline_select_1": baselines["select_1"],
                         "target_p99_ms": TARGETS_MS[name]})
        run = uuid.uuid4().hex[:8]

        def consume(s: aiohttp.ClientSession, i: int) -> Any:
            return s.post("/v1/entitlements/consume", json={
                "tenant": names[(abs(i) * 7919) % tenants], "meter": "api_calls",
                "id": f"bench-{run}-{i}-{uuid.uuid4().hex[:8]}"})  # new in every round

        def health(s: aiohttp.ClientSession, i: int) -> Any:
            return s.get("/healthz")

        # One consume at a time: its latency with nothing queued before it (the open
        # loop below adds the queueing a rate beyond the API's throughput builds).
        latencies = []
        consumed: dict[str, int] = {}
        for i in range(requests // 4):
            t0 = time.perf_counter()
            async with consume(session, -1 - i) as answer:
                await answer.read()
            latencies.append(time.perf_counter() - t0)
            consumed[str(answer.status)] = consumed.get(str(answer.status), 0) + 1
        rows.append({"bench": "read_consume_sequential", **percentiles(latencies),
                     "statuses": consumed, "baseline_http": baselines["http"],
                     "baseline_select_1": baselines["select_1"]})
        base_loop, _, base_cores, base_cpu = await metered(
            pids, open_loop(rate, seconds, http(session, health)))
        # Rounds, each the consumes then their I/O alone at the same rate: one burst of
        # other work on the shared machine moves a round's p99 by tens of ms, so the
        # figure is the median round's (as the worker's are medians of rounds), with
        # every round kept beside it.
        rounds = []
        async with consume_io(settings) as io:  # its pool and producer, once
            for round_no in range(consume_rounds):
                profiler = (Profile(profile[0], seconds).__enter__()
                            if profile is not None and round_no == 0 else None)
                before = await consume_phases(session)
                latencies, statuses, cores, cpu = await metered(
                    pids, open_loop(rate, seconds, http(session, consume)))
                after = await consume_phases(session)
                if profiler is not None and profile is not None:
                    profiler.__exit__(None, None, None)
                    profile[1].write_text(format_summary(
                        f"tally api serve, entitlement consumes at {rate}/s", profiler.summary()))
                io_loop, _ = await open_loop(rate, seconds, io)
                rounds.append({
                    **percentiles(latencies), "statuses": statuses, "cores": cores,
                    "phase_mean_ms": {
                        phase: round((s - before.get(phase, (0, 0))[0])
                                     / max(n - before.get(phase, (0, 0))[1], 1) * 1000, 3)
                        for phase, (s, n) in after.items()},
                    # The API's CPU per consume: what bounds its throughput on one core.
                    "api_cpu_ms_per_consume": cpu,
                    "baseline_consume_io": percentiles(io_loop)})
            # Beyond the target: requests arriving faster than one at a time can be decided
            # (a burst, or 2.4x the target's rate) queue, and are decided together
            # (api/entitlements.py); no target, what the API holds.
            batched = await batch_uses(session)
            latencies, statuses, cores, cpu = await metered(
                pids, open_loop(overload_rate, seconds, http(session, consume)))
            uses, batches = (after - before for after, before in
                             zip(await batch_uses(session), batched, strict=True))
            io_loop, _ = await open_loop(overload_rate, seconds, io)
            overload = {"bench": "read_consume_overload", **percentiles(latencies),
                        "statuses": statuses, "rate": overload_rate, "seconds": seconds,
                        "cores": cores, "api_cpu_ms_per_consume": cpu,
                        "uses_per_batch": round(uses / max(batches, 1), 2),
                        "baseline_consume_io": percentiles(io_loop)}
        median = sorted(rounds, key=lambda r: r["p99_ms"])[len(rounds) // 2]
        rows.append({"bench": "read_consume", **median, "rate": rate, "seconds": seconds,
                     "rounds": len(rounds),
                     "round_figures": [
                         {k: r[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")}
                         | {"io_p99_ms": r["baseline_consume_io"]["p99_ms"]} for r in rounds],
                     "baseline_http": {**percentiles(base_loop), "cores": base_cores,
                                       "api_cpu_ms_per_request": base_cpu},
                     "target_p99_ms": TARGETS_MS["consume"]})
        rows.append({**overload, "baseline_http": rows[-1]["baseline_http"]})
    return rows


def run(args: argparse.Namespace, home: Path) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    with stack(home) as (bootstrap, database_url, pids):
        tokens = home / "tokens.json"
        tokens.write_text(json.dumps({TOKEN: {"service": "bench/read", "tenants": "*",
                                              "scopes": ["admin", "read", "usage", "quota"]}}))
        settings = Settings(kafka_bootstrap_servers=bootstrap, database_url=database_url,
                            topic_prefix=f"bench-read-{uuid.uuid4().hex[:6]}.",
                            tokens_file=tokens, api_pool_size=20)
        asyncio.run(kafka.ensure_topics(settings))
        asyncio.run(publish_catalog(settings, load_catalog(default_catalog_path())))
        migrate(database_url)
        started = time.monotonic()
        seconds = load(database_url, args.tenants, args.events, now)
        loaded = {"bench": "read_load", "events": args.events, "tenants": args.tenants,
                  "seconds": round(time.monotonic() - started, 1), "steps": seconds,
                  "how": "INSERT .. SELECT from generate_series into month partitions "
                  "created as plain tables (events in time order, each partition one range "
                  "of the series), then indexed and attached; usage_by_period by GROUP BY "
                  "over the ledger; VACUUM (ANALYZE) (usage_daily and the ledger keys not loaded: "
                  "no API read uses them)"}
        port = free_port()
        api = start_tally(settings, ["api", "serve", "--port", str(port)], home / "api.log")
        try:
            wait_healthy(port, timeout=120)
            profile = ((api.pid, args.profile_dir / "profile-api-consume.txt")
                       if args.profile_dir is not None else None)
            rows = asyncio.run(measure(f"http://127.0.0.1:{port}", settings,
                                       args.tenants, now, args.requests, args.rate,
                                       args.overload_rate, args.seconds, args.rounds, args.seed,
                                       {**pids, "api": api.pid}, profile))
        finally:
            api.terminate()
            api.wait(30)
        return [loaded, *rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=2000,
                        help="sequential requests per figure")
    parser.add_argument("--rate", type=int, default=500, help="consumes per second")
    parser.add_argument("--overload-rate", type=int, default=1200,
                        help="consumes per second of the overload round (no target)")
    parser.add_argument("--seconds", type=float, default=10,
                        help="of consumes at --rate, each round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="of consumes at --rate; the median round's figures are kept")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench/results/read.jsonl"))
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="profile `tally api serve` during the consumes (py-spy)")
    args = parser.parse_args()
    home = scratch_home("tally-bench-read-")
    rows = run(args, home)
    append_rows(args.out, rows)
    for row in rows:
        print(orjson.dumps(row).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
