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
   shadow's (DELETE + INSERT: readers keep seeing the old rows until the commit, then the
   new ones; table OIDs, grants, index names and functions stay as they are), and set the
   live offsets to the shadow's;
3. after the commit the live projector's next transaction finds the offsets moved, drops
   its batch and re-seeks to them (projector.py, fencing). The shadow schema is dropped.

The swap is O(rows): for ledgers of many millions of rows it holds the live projector for
that long (readers are never blocked); VACUUM ANALYZE runs afterwards for the deleted rows.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from projections.errors import ProjectionError
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
class RebuildReport:
    records: int
    seconds: float
    offsets: dict[tuple[str, int], int]


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


def _columns(conn: Connection, table: str) -> str:
    names = [r[0] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
        " AND table_name = %s ORDER BY ordinal_position", (LIVE, table))]
    return ", ".join(f'"{n}"' for n in names)


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
    for table in REBUILT_TABLES:
        cols = _columns(conn, table)
        conn.execute(f"DELETE FROM {LIVE}.{table}")
        conn.execute(f"INSERT INTO {LIVE}.{table} ({cols}) SELECT {cols} FROM {SHADOW}.{table}")
    conn.execute(f"DELETE FROM {LIVE}.projection_offsets WHERE projection = %s", (PROJECTION,))
    conn.execute(
        f"INSERT INTO {LIVE}.projection_offsets (projection, topic, partition, next_offset)"
        f" SELECT %s, topic, partition, next_offset FROM {SHADOW}.projection_offsets"
        " WHERE projection = %s", (PROJECTION, PROJECTION))


async def rebuild(settings: Settings, max_records: int = 20000,
                  catch_up_timeout: float = 300) -> RebuildReport:
    """Rebuild every read model from offset 0 and swap it in (module docstring)."""
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
            # 1. Build beside the live tables until a fetch comes back empty.
            while await shadow.step(conn):
                pass
            # 2. Swap in one transaction, the live projector paused at its next commit.
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(LIVE, PROJECTION),))
                live = {(t, p): o for t, p, o in conn.execute(
                    f"SELECT topic, partition, next_offset FROM {LIVE}.projection_offsets"
                    " WHERE projection = %s", (PROJECTION,))}
                deadline = time.monotonic() + catch_up_timeout
                while _behind(shadow.committed, live):
                    if time.monotonic() > deadline:
                        raise RebuildError(f"the rebuild did not reach the live offsets {live}"
                                           f" within {catch_up_timeout:.0f}s")
                    await shadow.step(conn)
                _swap(conn)
        finally:
            await shadow.close()
        offsets = shadow.committed
        conn.execute(f"DROP SCHEMA {SHADOW} CASCADE")
        conn.commit()
        conn.autocommit = True
        for table in REBUILT_TABLES:  # the DELETE left the old rows as dead tuples
            conn.execute(f"VACUUM ANALYZE {LIVE}.{table}")
        conn.execute("SELECT pg_advisory_unlock(%s)", (_REBUILD_LOCK,))
    return RebuildReport(shadow.projected, time.monotonic() - started, offsets)


def _behind(shadow: dict[tuple[str, int], int], live: dict[tuple[str, int], Any]) -> bool:
    return any(shadow.get(tp, 0) < int(offset) for tp, offset in live.items())
