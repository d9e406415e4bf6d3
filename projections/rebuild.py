"""Rebuild the read models from offset 0 beside the live ones, then swap; and checksums.

DESIGN guarantee 2: dropping the read models and replaying the topics from offset 0 gives
byte-identical query results. `checksum` is how to see it; `rebuild` is how to use it
without taking the live tables offline:

1. build beside: schema `tally_rebuild` gets empty copies of the rebuilt tables
   (`LIKE ... INCLUDING ALL`, so they follow every migration), and a second Projector
   fills them from offset 0 of every topic, committing its own offsets there. Readers and
   the live projector carry on with schema `tally` meanwhile;
2. swap, in ONE transaction: take the live projection's advisory lock (the live projector
   takes it first in each of its transactions, so it pauses at its next commit), catch the
   shadow up to at least the live offsets, replace each live table's rows with the
   shadow's (DELETE + INSERT of the rows that differ, `_replace_rows`: readers keep seeing
   the old rows until the commit, then the new ones; table OIDs, grants, index names and
   functions stay as they are), and set the live offsets to the shadow's;
3. after the commit the live projector's next transaction finds the offsets moved, drops
   its batch and re-seeks to them (projector.py, fencing). The shadow schema is dropped.

Progress (`Progress`, every few seconds, on stderr from the command): events and records
applied, events/s, and how much of the log's end offsets, as they were at the start, the
shadow has read. The build uses the projector's own pipeline (`Projector.project`: the
next batch is fetched and decoded while Postgres folds this one).

Live offsets outside the log (the broker lost records: restarted empty, topic recreated;
or retention removed some) make the rebuild refuse at once, before anything changes: the
read models hold what the log no longer does, and a rebuild would drop it. The live
projector resets such offsets itself (projector.py, `_outside_log`).

The swap reads every row (two hash anti-joins per table) but writes only those that
differ; for ledgers of many millions of rows it holds the live projector for that long
(readers are never blocked); VACUUM ANALYZE runs afterwards for the deleted rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from aiokafka import TopicPartition

from projections.batch import Batch
from projections.errors import ProjectionError
from projections.lag import log_ends
from projections.ledger import create_month_partitions
from projections.projector import PROJECTION, Projector, lock_key
from runtime.postgres import Connection, connect, fetch_value, migrate
from runtime.settings import Settings

log = logging.getLogger(__name__)

LIVE = "tally"
SHADOW = "tally_rebuild"
_REBUILD_LOCK = 0x7A11_0002

# Every table the projector writes (all derived from the log), parents before children.
REBUILT_TABLES = (
    "usage_event_keys", "usage_events", "usage_daily", "usage_by_period",
    "usage_daily_uniques", "usage_period_uniques", "subscriptions", "quota_state",
    "meters", "plans", "plan_meters", "projection_errors", "subscription_events",
    "ingestion_watermarks", "catalog_settings",
)

# Finance-facing tables -> columns left out of their digest because they are wall-clock,
# not derived from the log. Every column the projector writes is derived from the log
# (updated_at of subscriptions and quota_state are the event's / record's time).
CHECKSUM_TABLES: dict[str, tuple[str, ...]] = {
    "usage_events": (),
    "usage_daily": (),
    "usage_by_period": (),
    "subscriptions": (),
    "quota_state": (),
    "meters": (),
    "plans": (),
    "plan_meters": (),
    "subscription_events": (),
    "invoices": ("created_at",),  # written by the billing jobs, not rebuilt
    "invoice_lines": (),
}


class RebuildError(ProjectionError):
    """The rebuild could not run or could not catch up."""


@dataclass(frozen=True)
class Progress:
    """How far a rebuild is: what it applied, and the offsets it read of the end offsets
    the log had when it started (Tansu under-reports ends: shown at most 100%)."""

    records: int
    events: int
    seconds: float
    read: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 if self.total <= 0 else min(100.0, 100.0 * self.read / self.total)

    def line(self) -> str:
        rate = self.events / self.seconds if self.seconds > 0 else 0.0
        return (f"rebuild: {self.percent:5.1f}% of the end offsets, {self.events:,} events"
                f" ({self.records:,} records) in {self.seconds:.1f}s, {rate:,.0f} events/s")


@dataclass(frozen=True)
class RebuildReport:
    records: int
    seconds: float
    offsets: dict[tuple[str, int], int]
    phases: dict[str, float]  # seconds of build, swap, vacuum


def checksum(conn: Connection, schema: str = LIVE) -> dict[str, tuple[int, str]]:
    """table -> (rows, digest). Order-independent: the digest sums a hash of each row's
    canonical JSON (UTC timestamps, numerics as stored), so equal rows give equal digests
    however they were written. Streams through the table; no sort, no big aggregate."""
    digests: dict[str, tuple[int, str]] = {}
    with conn.transaction():
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        for table, excluded in CHECKSUM_TABLES.items():
            row = conn.execute(
                "SELECT count(*), coalesce(sum(('x' || substr(md5((to_jsonb(t) - %s::text[])"
                f"::text), 1, 15))::bit(60)::bigint), 0) FROM {schema}.{table} t",
                (list(excluded),),
            ).fetchone()
            assert row is not None
            rows, total = int(row[0]), row[1]
            digest = hashlib.sha256(f"{table}:{rows}:{total}".encode()).hexdigest()[:32]
            digests[table] = (rows, digest)
    return digests


def prepare_shadow(conn: Connection) -> None:
    """An empty copy of every rebuilt table (and of projection_offsets) in the shadow."""
    with conn.transaction():
        conn.execute(f"DROP SCHEMA IF EXISTS {SHADOW} CASCADE")
        conn.execute(f"CREATE SCHEMA {SHADOW}")
        for table in (*REBUILT_TABLES, "projection_offsets"):
            partitioned = " PARTITION BY RANGE (event_time)" if table == "usage_events" else ""
            conn.execute(f"CREATE TABLE {SHADOW}.{table}"
                         f" (LIKE {LIVE}.{table} INCLUDING ALL){partitioned}")
            # LIKE copies no storage parameters (the rollups' fillfactor, migration 130).
            options = conn.execute(
                "SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                (f"{LIVE}.{table}",)).fetchone()
            if options and options[0]:
                conn.execute(f"ALTER TABLE {SHADOW}.{table} SET ({', '.join(options[0])})")


def _swap(conn: Connection) -> None:
    """Replace the live rows with the shadow's (inside the caller's transaction)."""
    months = {row[0].astimezone(UTC) for row in conn.execute(
        f"SELECT DISTINCT date_trunc('month', event_time, 'UTC') FROM {SHADOW}.usage_events")}
    create_month_partitions(conn, months, LIVE)
    conn.execute("SET LOCAL work_mem = '256MB'")  # the anti-joins below hash whole tables
    for table in REBUILT_TABLES:
        _replace_rows(conn, table)
    conn.execute(f"DELETE FROM {LIVE}.projection_offsets WHERE projection = %s", (PROJECTION,))
    conn.execute(
        f"INSERT INTO {LIVE}.projection_offsets (projection, topic, partition, next_offset)"
        f" SELECT %s, topic, partition, next_offset FROM {SHADOW}.projection_offsets"
        " WHERE projection = %s", (PROJECTION, PROJECTION))


def _replace_rows(conn: Connection, table: str) -> None:
    """Make the live table's rows the shadow's, writing only the rows that differ.

    A rebuild mostly finds the rows it had (it repairs a few, or confirms them): rewriting
    every row cost most of a 1M-event rebuild in index writes and dead tuples. Rows are
    matched by key (the primary key; the ledger's tenant and event id) and compared column
    by column, numerics with their scale too (1.0 and 1.00 are equal numbers but not equal
    bytes). After deleting the live rows the shadow has no equal of and inserting the shadow
    rows the live table has no equal of, both hold the same set of rows; the same rows as
    many times when the counts agree too (the shadow has no duplicates: every table has a
    key, and the ledger one row per usage_event_keys key). A live ledger with duplicated
    rows fails that check and is rewritten whole, as before.
    """
    columns = _typed_columns(conn, table)
    cols = ", ".join(name for name, _ in columns)
    same = " AND ".join(
        [f"s.{k} = l.{k}" for k in _key(conn, table)]
        + [f"s.{name} IS NOT DISTINCT FROM l.{name}" for name, _ in columns]
        + [f"scale(s.{name}) IS NOT DISTINCT FROM scale(l.{name})"
           for name, kind in columns if kind == "numeric"])
    live, shadow = f"{LIVE}.{table}", f"{SHADOW}.{table}"
    conn.execute(f"DELETE FROM {live} l WHERE NOT EXISTS (SELECT 1 FROM {shadow} s WHERE {same})")
    conn.execute(f"INSERT INTO {live} ({cols}) SELECT {cols} FROM {shadow} s"
                 f" WHERE NOT EXISTS (SELECT 1 FROM {live} l WHERE {same})")
    if (fetch_value(conn, f"SELECT count(*) FROM {live}")
            != fetch_value(conn, f"SELECT count(*) FROM {shadow}")):
        conn.execute(f"DELETE FROM {live}")
        conn.execute(f"INSERT INTO {live} ({cols}) SELECT {cols} FROM {shadow}")


def _typed_columns(conn: Connection, table: str) -> list[tuple[str, str]]:
    """(quoted name, data type) of each column of the live table, in order."""
    return [(f'"{name}"', kind) for name, kind in conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
        (LIVE, table))]


def _key(conn: Connection, table: str) -> list[str]:
    """The quoted columns that identify a row: the primary key, or the ledger's (its
    uniqueness lives in usage_event_keys)."""
    if table == "usage_events":
        return ['"tenant_id"', '"event_id"']
    names = [f'"{row[0]}"' for row in conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = ANY (i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary"
        " ORDER BY array_position(i.indkey::int2[], a.attnum)", (f"{LIVE}.{table}",))]
    if not names:
        raise RebuildError(f"{LIVE}.{table} has no primary key to match its rows by")
    return names


async def rebuild(settings: Settings, max_records: int = 1000,
                  catch_up_timeout: float = 300,
                  progress: Callable[[Progress], None] | None = None,
                  every: float = 2.0) -> RebuildReport:
    """Rebuild every read model from offset 0 and swap it in (module docstring);
    `progress` gets a `Progress` every `every` seconds while building, and at its end."""
    started = time.monotonic()
    database_url = settings.require_database()
    migrate(database_url)
    with connect(database_url, autocommit=True) as conn:
        if not fetch_value(conn, "SELECT pg_try_advisory_lock(%s)", (_REBUILD_LOCK,)):
            raise RebuildError("another rebuild is running on this database")
        conn.autocommit = False
        prepare_shadow(conn)
        shadow = Projector(settings, max_records, schema=SHADOW, projection=PROJECTION)
        await shadow.open(conn)
        try:
            # 0. Refuse before the live tables change when the log lost what they hold.
            starts, ends = await shadow.log_bounds()
            with conn.transaction():
                live = _live_offsets(conn)
            await _refuse_outside_log(settings, live, starts, ends)
            # 1. Build beside the live tables, up to the end offsets of the start.
            meter = _Meter(shadow, started, sum(ends.values()), progress, every)
            await shadow.project(conn, meter.through(shadow.until_caught_up(ends)))
            meter.report()
            phases = {"build": time.monotonic() - started}
            # 2. Swap in one transaction, the live projector paused at its next commit.
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(LIVE, PROJECTION),))
                live = _live_offsets(conn)
                deadline = time.monotonic() + catch_up_timeout
                while _behind(shadow.committed, live):
                    if time.monotonic() > deadline:
                        raise RebuildError(f"the rebuild did not reach the live offsets {live}"
                                           f" within {catch_up_timeout:.0f}s")
                    await shadow.step(conn)
                # In a thread: the event loop keeps the consumer's fetches and heartbeats
                # going meanwhile (the swap of a large ledger takes many seconds).
                await asyncio.to_thread(_swap, conn)
        finally:
            await shadow.close()
        offsets = shadow.committed
        conn.execute(f"DROP SCHEMA {SHADOW} CASCADE")
        conn.commit()
        phases["swap"] = time.monotonic() - started - phases["build"]
        conn.autocommit = True
        for table in REBUILT_TABLES:  # the DELETE left the old rows as dead tuples
            conn.execute(f"VACUUM ANALYZE {LIVE}.{table}")
        conn.execute("SELECT pg_advisory_unlock(%s)", (_REBUILD_LOCK,))
    seconds = time.monotonic() - started
    phases["vacuum"] = seconds - phases["build"] - phases["swap"]
    return RebuildReport(shadow.projected, seconds, offsets, phases)


def _live_offsets(conn: Connection) -> dict[tuple[str, int], int]:
    return {(t, p): int(o) for t, p, o in conn.execute(
        f"SELECT topic, partition, next_offset FROM {LIVE}.projection_offsets"
        " WHERE projection = %s", (PROJECTION,))}


async def _refuse_outside_log(settings: Settings, live: dict[tuple[str, int], int],
                              starts: dict[TopicPartition, int],
                              ends: dict[TopicPartition, int]) -> None:
    """RebuildError when a live offset lies outside the log (module docstring)."""
    at = {TopicPartition(t, p): offset for (t, p), offset in live.items()}
    past = {tp: ends[tp] for tp, offset in at.items() if tp in ends and offset > ends[tp]}
    real = await log_ends(settings, past) if past else {}
    if real is None:
        raise RebuildError("cannot read the log's ends from the broker: try again")
    outside = []
    for tp, offset in sorted(at.items()):
        if tp not in ends:
            if offset > 0:
                outside.append(f"{tp.topic}/{tp.partition} at {offset} (no such partition)")
            continue
        end = real.get(tp, ends[tp])
        if offset < starts[tp] or offset > end:
            outside.append(f"{tp.topic}/{tp.partition} at {offset} (the log holds offsets"
                           f" {starts[tp]} to {end})")
    if outside:
        shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3
                                          else "")
        raise RebuildError(
            f"the live offsets lie outside the log: {shown}. The broker lost records the read"
            " models hold (restarted empty, topic recreated) or retention removed some; a"
            " rebuild replays only what the log holds now and would drop the rest, so nothing"
            " was changed (docs/operations.md, offsets outside the log)")


class _Meter:
    """Progress of the build, handed to `progress` every `every` seconds."""

    def __init__(self, shadow: Projector, started: float, total: int,
                 progress: Callable[[Progress], None] | None, every: float) -> None:
        self.shadow = shadow
        self.started = started
        self.total = total
        self.progress = progress
        self.every = every
        self.last = time.monotonic()

    def report(self) -> None:
        self.last = time.monotonic()
        if self.progress is not None:
            self.progress(Progress(self.shadow.projected, self.shadow.events,
                                   self.last - self.started,
                                   sum(self.shadow.committed.values()), self.total))

    async def through(self, batches: AsyncIterator[Batch | None]
                      ) -> AsyncIterator[Batch | None]:
        async for batch in batches:
            if time.monotonic() - self.last >= self.every:
                self.report()
            yield batch


def _behind(shadow: dict[tuple[str, int], int], live: dict[tuple[str, int], Any]) -> bool:
    return any(shadow.get(tp, 0) < int(offset) for tp, offset in live.items())
