"""Projection benchmark: the projector's batched transaction against one upsert per event,
same run, same events; and the usage_by_period lookup over a large ledger.

    python -m bench.bench_projection --events 200000 --out bench/results/projection.jsonl
    python -m bench.bench_projection --ledger-rows 10000000 ...   # the full 10M check

(a) batched: the projector itself (`Projector.prepare`, `Projector.project` and
    `Projector.commit`), fed from memory instead of Kafka: batch records of 100 events as
    the worker writes them, `--batch` events per transaction (decoding and checking the
    records, month partitions, COPY into a staging table and one statement for ledger
    keys, ledger, daily and per-period rollups, offsets). Each batch is decoded and staged
    while the previous one's statement runs, as in the projector.
(b) baseline, the usual approach: each record validated with the AcceptedEvent model
    (pydantic, straight from its JSON), then per event `INSERT ... ON CONFLICT DO NOTHING
    RETURNING` into the ledger keys and, if new, one INSERT into the ledger and one
    `INSERT ... ON CONFLICT DO UPDATE` into each rollup; committed per batch with the
    offsets, like (a). A fresh database each, events made alike (10% are duplicates); the
    baseline gets `--baseline-events` of them (a rate: it needs fewer, and is 20-30
    times slower).
Both start from the same raw record values, with the keys and value formats the worker
writes (streams/processor.py), and decode them inside the timed run: the figure is the
projector's whole throughput, not only its writes.
(c) lookup: `--ledger-rows` ledger rows generated in SQL (`INSERT ... SELECT
    generate_series`), rolled up into usage_by_period, then the query finance and the
    billing jobs run for one tenant and period, timed `--lookups` times: p50/p99 ms. Also
    `tally.usage_as_of` for one tenant (a ledger scan by index), fewer times.

Starts its own embedded Postgres unless DATABASE_URL is set. Appends one JSON object per
result (JSON lines) to `--out` and prints each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from pydantic import TypeAdapter

from bench.profiling import Profile, format_summary
from bench.scratch import scratch_home
from devtools import devstack
from projections.batch import Batch
from projections.ledger import create_month_partitions
from projections.projector import Projector
from projections.queries import usage_event_count
from runtime.gc_tuning import tune_gc
from runtime.postgres import Connection, connect, migrate
from runtime.settings import Settings
from schemas.codec import dumps
from schemas.records import AcceptedEvent

PERIOD = datetime(2026, 11, 1, tzinfo=UTC)
PERIOD_END = datetime(2026, 12, 1, tzinfo=UTC)
METERS = ("api_calls", "tokens", "executions", "storage_mb")
AGGREGATION = {"api_calls": "sum", "tokens": "sum", "executions": "count", "storage_mb": "max"}
EVENTS_PER_RECORD = 100
TARGET_EVENTS_PER_S = 120_000  # the target for the projector
# The usual way to read a record: the model validates it straight from its JSON.
_MODEL = TypeAdapter(list[AcceptedEvent])


def make_records(n: int, tenants: int, seed: int = 7) -> tuple[list[tuple[bytes, bytes]], int]:
    """`n` accepted events in records of EVENTS_PER_RECORD, as (key, value), each event a
    dict with the keys and value formats of the worker's (streams/processor.py); and how
    many distinct (tenant, event id) they hold."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    for i in range(n):
        if events and rng.random() < 0.1:  # redelivered
            events.append(events[rng.randrange(len(events))])
            continue
        meter = METERS[i % len(METERS)]
        # As in a live stream: event time advances (the run spans one day), a minute of
        # jitter; a batch covers minutes, so its daily rollup rows are per tenant and meter.
        at = PERIOD + timedelta(days=10, seconds=i * 86400 // n + rng.randrange(60))
        events.append({
            "tenant_id": f"tenant-{rng.randrange(tenants)}", "event_id": str(uuid.UUID(int=i)),
            "meter": meter, "aggregation": AGGREGATION[meter], "unique_value": None,
            "quantity": str(Decimal(rng.randrange(1, 100))), "event_time": at.isoformat(),
            "ingested_at": (at + timedelta(seconds=1)).isoformat(), "source": "svc/bench",
            "dimensions": {"region": "eu"}, "period_start": PERIOD.isoformat(),
            "period_end": PERIOD_END.isoformat(), "plan_id": "starter", "late": False,
            "adjustment": False,
        })
    records = [(chunk[0]["tenant_id"].encode(), dumps(chunk))
               for i in range(0, n, EVENTS_PER_RECORD)
               for chunk in [events[i:i + EVENTS_PER_RECORD]]]
    return records, len({(e["tenant_id"], e["event_id"]) for e in events})


def _offsets(conn: Connection, batch_no: int) -> None:
    conn.execute(
        "INSERT INTO tally.projection_offsets VALUES ('bench', 'tally.usage.accepted', 0, %s)"
        " ON CONFLICT (projection, topic, partition) DO UPDATE SET"
        " next_offset = excluded.next_offset", (batch_no + 1,))


def run_batched(conn: Connection, values: list[tuple[bytes, bytes]], batch: int,
                profile: Path | None = None) -> float:
    settings = Settings()
    projector = Projector(settings)
    tp = TopicPartition(settings.topics.usage_accepted, 0)
    # What the consumer hands the projector.
    records = [ConsumerRecord(tp.topic, 0, offset, 0, 0, key, value, None, 0, 0, ())
               for offset, (key, value) in enumerate(values)]
    per_batch = max(batch // EVENTS_PER_RECORD, 1)

    async def batches() -> AsyncIterator[Batch]:
        for i in range(0, len(records), per_batch):
            prepared = projector.prepare({tp: records[i:i + per_batch]})
            assert not prepared.problems, prepared.problems[:3]
            yield prepared

    profiler = Profile(os.getpid()).__enter__() if profile is not None else None
    started = time.perf_counter()
    asyncio.run(projector.project(conn, batches()))
    seconds = time.perf_counter() - started
    if profiler is not None and profile is not None:
        profiler.__exit__()
        profile.write_text(format_summary(
            f"projector, {len(values) * EVENTS_PER_RECORD:,} events (Postgres not included)",
            profiler.summary()) + "\n")
    return seconds


def _months(events: list[AcceptedEvent]) -> set[datetime]:
    return {t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            for t in (e.event_time.astimezone(UTC) for e in events)}


_KEY = ("INSERT INTO tally.usage_event_keys VALUES (%s, %s) ON CONFLICT DO NOTHING"
        " RETURNING 1")
_LEDGER = (
    "INSERT INTO tally.usage_events (event_id, tenant_id, meter, quantity, event_time,"
    " ingested_at, source, dimensions, period_start, period_end, plan_id, aggregation)"
    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)")
_DAILY = (
    "INSERT INTO tally.usage_daily AS d (tenant_id, meter, day, quantity, event_count,"
    " aggregation) VALUES (%s,%s,%s,%s,1,%s) ON CONFLICT (tenant_id, meter, day) DO UPDATE SET"
    " quantity = CASE WHEN excluded.aggregation = 'max'"
    " THEN greatest(d.quantity, excluded.quantity) ELSE d.quantity + excluded.quantity END,"
    " event_count = d.event_count + 1")
_PERIOD = (
    "INSERT INTO tally.usage_by_period AS p (tenant_id, meter, period_start, period_end,"
    " plan_id, quantity, event_count, aggregation) VALUES (%s,%s,%s,%s,%s,%s,1,%s)"
    " ON CONFLICT (tenant_id, meter, period_start) DO UPDATE SET"
    " quantity = CASE WHEN excluded.aggregation = 'max'"
    " THEN greatest(p.quantity, excluded.quantity) ELSE p.quantity + excluded.quantity END,"
    " event_count = p.event_count + 1, plan_id = excluded.plan_id")


def run_per_event(conn: Connection, values: list[tuple[bytes, bytes]], batch: int,
                  profile: Path | None = None) -> float:
    months: set[datetime] = set()
    per_batch = max(batch // EVENTS_PER_RECORD, 1)
    started = time.perf_counter()
    for no, i in enumerate(range(0, len(values), per_batch)):
        chunk = [e for _, value in values[i:i + per_batch] for e in _MODEL.validate_json(value)]
        with conn.transaction():
            create_month_partitions(conn, _months(chunk) - months)
            months |= _months(chunk)
            for e in chunk:
                if conn.execute(_KEY, (e.tenant_id, e.event_id)).fetchone() is None:
                    continue
                q = Decimal(1) if e.aggregation == "count" else e.quantity
                conn.execute(_LEDGER, (
                    e.event_id, e.tenant_id, e.meter, e.quantity, e.event_time, e.ingested_at,
                    e.source, dumps(e.dimensions).decode(), e.period_start, e.period_end,
                    e.plan_id, e.aggregation))
                conn.execute(_DAILY, (e.tenant_id, e.meter, e.event_time.date(), q,
                                      e.aggregation))
                conn.execute(_PERIOD, (e.tenant_id, e.meter, e.period_start, e.period_end,
                                       e.plan_id, q, e.aggregation))
            _offsets(conn, no)
    return time.perf_counter() - started


def fill_ledger(conn: Connection, rows: int, tenants: int) -> float:
    """`rows` ledger rows over 12 months and `tenants` tenants, and their rollup, in SQL."""
    started = time.perf_counter()
    with conn.transaction():
        months = {PERIOD.replace(year=2026 + (PERIOD.month - 1 + k) // 12,
                                 month=(PERIOD.month - 1 + k) % 12 + 1) for k in range(12)}
        create_month_partitions(conn, months)
        conn.execute(
            "INSERT INTO tally.usage_events (event_id, tenant_id, meter, quantity, event_time,"
            " ingested_at, source, period_start, period_end, plan_id)"
            " SELECT 'g' || i, 'tenant-' || (i %% %(t)s),"
            " (ARRAY['api_calls', 'tokens'])[1 + i %% 2],"
            " 1 + i %% 7, m + (i %% 2419200) * interval '1 second',"
            " m + (i %% 2419200) * interval '1 second', 'svc/gen', m, m + interval '1 month',"
            " 'starter' FROM generate_series(1, %(n)s) AS i,"
            " LATERAL (SELECT %(start)s::timestamptz + ((i %% 12) || ' months')::interval AS m) mm",
            {"t": tenants, "n": rows, "start": min(months)})
        conn.execute(
            "INSERT INTO tally.usage_by_period (tenant_id, meter, period_start, period_end,"
            " plan_id, quantity, event_count) SELECT tenant_id, meter, period_start,"
            " max(period_end), max(plan_id), sum(quantity), count(*) FROM tally.usage_events"
            " GROUP BY 1, 2, 3 ON CONFLICT DO NOTHING")
    conn.execute("ANALYZE tally.usage_events")
    conn.execute("ANALYZE tally.usage_by_period")
    conn.commit()
    return time.perf_counter() - started


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3)}


def time_lookups(conn: Connection, tenants: int, lookups: int) -> dict[str, float]:
    rng = random.Random(1)
    samples = []
    for _ in range(lookups):
        tenant = f"tenant-{rng.randrange(tenants)}"
        started = time.perf_counter()
        conn.execute(
            "SELECT quantity, event_count FROM tally.usage_by_period WHERE tenant_id = %s"
            " AND meter = 'api_calls' AND period_start = %s", (tenant, PERIOD)).fetchall()
        samples.append(time.perf_counter() - started)
    return _percentiles(samples)


def time_as_of(conn: Connection, tenants: int, lookups: int) -> dict[str, float]:
    rng = random.Random(2)
    samples = []
    for _ in range(lookups):
        started = time.perf_counter()
        conn.execute("SELECT * FROM tally.usage_as_of(%s, %s)",
                     (PERIOD_END, f"tenant-{rng.randrange(tenants)}")).fetchall()
        samples.append(time.perf_counter() - started)
    return _percentiles(samples)


@contextmanager
def database(admin_url: str) -> Iterator[str]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    with connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def postgres() -> Iterator[str]:
    home = scratch_home("tally-bench-")
    with devstack.embedded_where_missing(home, os.environ, kafka=False) as env:
        yield env["DATABASE_URL"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_projection")
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--baseline-events", type=int, default=20_000,
                   help="events for the per-event baseline (a rate: it needs fewer)")
    p.add_argument("--profile-dir", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=3, help="runs of the projector (median)")
    p.add_argument("--batch", type=int, default=20_000, help="events per transaction")
    p.add_argument("--tenants", type=int, default=200)
    p.add_argument("--ledger-rows", type=int, default=1_000_000)
    p.add_argument("--lookups", type=int, default=2000)
    p.add_argument("--out", type=Path, default=Path("bench/results/projection.jsonl"))
    args = p.parse_args(argv)
    tune_gc()  # as `tally project` does: both contenders run under it
    args.out.parent.mkdir(parents=True, exist_ok=True)
    base = {"host": platform.node(), "cpus": os.cpu_count(),
            "at": datetime.now(UTC).isoformat(timespec="seconds")}

    def emit(result: dict[str, Any]) -> None:
        line = orjson.dumps({**base, **result}).decode()
        print(line, flush=True)
        with args.out.open("a") as f:
            f.write(line + "\n")

    records, distinct = make_records(args.events, args.tenants)
    baseline_events = min(args.baseline_events, args.events)
    baseline_records, baseline_distinct = make_records(baseline_events, args.tenants)
    profile = args.profile_dir / "profile-projector.txt" if args.profile_dir else None
    with postgres() as admin_url:
        rates = {}
        # The projector `--rounds` times (a fresh database each; the median), the baseline
        # once (it is 10-30 times slower: its share of the noise is small).
        for name, run, data, events, expected, rounds in (
                ("batched_copy", run_batched, records, args.events, distinct, args.rounds),
                ("per_event_upsert", run_per_event, baseline_records, baseline_events,
                 baseline_distinct, 1)):
            runs = []
            for round_no in range(rounds):
                with database(admin_url) as url:
                    migrate(url)
                    with connect(url) as conn:
                        runs.append(run(conn, data, args.batch, profile
                                        if name == "batched_copy" and round_no == 0 else None))
                        rows = usage_event_count(conn)
                    assert rows == expected, (rows, expected)
            seconds = statistics.median(runs)
            rates[name] = events / seconds
            emit({"bench": f"projection_{name}", "events": events,
                  "distinct": expected, "batch": args.batch, "rounds": rounds,
                  "events_per_s_by_round": [round(events / r) for r in runs],
                  "seconds": round(seconds, 3), "events_per_s": round(rates[name])})
        ratio = rates["batched_copy"] / rates["per_event_upsert"]
        emit({"bench": "projection_speedup", "ratio": round(ratio, 2),
              "target_events_per_s": TARGET_EVENTS_PER_S,
              "met": rates["batched_copy"] >= TARGET_EVENTS_PER_S})

        with database(admin_url) as url:
            migrate(url)
            with connect(url) as conn:
                fill = fill_ledger(conn, args.ledger_rows, args.tenants * 5)
                lookup = time_lookups(conn, args.tenants * 5, args.lookups)
                emit({"bench": "usage_by_period_lookup", "ledger_rows": args.ledger_rows,
                      "fill_seconds": round(fill, 1), "lookups": args.lookups, **lookup})
                as_of = time_as_of(conn, args.tenants * 5, max(args.lookups // 40, 10))
                emit({"bench": "usage_as_of_one_tenant", "ledger_rows": args.ledger_rows,
                      "rows_per_tenant": args.ledger_rows // (args.tenants * 5), **as_of})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
