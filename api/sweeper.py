"""The entitlement reservation sweeper: no reservation holds a limit forever, and no use
the log holds is forgotten.

`consume` reserves a use before publishing its event (api/entitlements.py). When the
publish fails (the broker is down, the process is killed between the two), the reservation
stays, and keeps its units reserved. Which reservations still stand is decided by the
truth of DESIGN.md, the Kafka log (`tally.usage`), read through the ledger where it can:

- the ledger holds the event (`usage_event_keys`): the use is counted there; the
  reservation is settled and deleted (it no longer counted anyway);
- older than the grace time (`api_reservation_grace_seconds`, since its decision or its
  last retry) and not in the ledger: the sweeper reads `tally.usage` from the
  reservation's time on. An event there is a use the pipeline will count: its reservation
  stays until the ledger has it (counting it twice or never are both ruled out). An event
  not there was never published: the use did not happen, the reservation is released
  (deleted), under the decision's advisory lock so that no consume of the key decides
  meanwhile, and only if no retry touched it since. A retry of its id after that is a new
  decision.

Each sweep counts its outcomes in `tally_api_reservations_swept_total{outcome}` (settled,
released, published: found in the log, still waiting for the ledger) and sets
`tally_api_reservations_pending`, the reservations left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from aiokafka import TopicPartition
from prometheus_client import Counter, Gauge

from api.entitlements import LOCK_SPACE, Connect
from runtime import kafka
from runtime.settings import Settings
from schemas.codec import RecordDecodeError, decode_record

log = logging.getLogger(__name__)
SWEPT = Counter("tally_api_reservations_swept_total",
                "Entitlement reservations the sweeper settled (in the ledger), released "
                "(never published) or found published and waiting for the ledger",
                ["outcome"])
PENDING = Gauge("tally_api_reservations_pending",
                "Entitlement reservations not in the ledger after the last sweep")
Key = tuple[str, str]  # tenant, event id
# The ids of `wanted` published on the usage topic since a time.
Published = Callable[[datetime, set[Key]], Awaitable[set[Key]]]


@dataclass(frozen=True)
class Sweep:
    settled: int
    released: int
    published: int
    pending: int


async def sweep(connect: Connect, published: Published, grace: timedelta) -> Sweep:
    """One sweep (module docstring)."""
    async with connect() as conn:
        cur = await conn.execute(
            "DELETE FROM tally.entitlement_reservations r USING tally.usage_event_keys k"
            " WHERE k.tenant_id = r.tenant_id AND k.event_id = r.event_id")
        settled = cur.rowcount
        cur = await conn.execute(
            "SELECT tenant_id, event_id, meter, event_time FROM tally.entitlement_reservations"
            " WHERE touched_at < now() - %s", (grace,))
        stale = await cur.fetchall()
    in_log: set[Key] = set()
    if stale:
        since = min(row[3] for row in stale) - timedelta(minutes=1)  # clocks drift
        in_log = await published(since, {(row[0], row[1]) for row in stale})
    released = 0
    for tenant, event_id, meter, _ in stale:
        if (tenant, event_id) in in_log:
            continue
        async with connect() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                               (LOCK_SPACE, f"{tenant}/{meter}"))
            cur = await conn.execute(
                "DELETE FROM tally.entitlement_reservations r"
                " WHERE tenant_id = %s AND event_id = %s AND touched_at < now() - %s"
                " AND NOT EXISTS (SELECT 1 FROM tally.usage_event_keys k"
                "   WHERE k.tenant_id = r.tenant_id AND k.event_id = r.event_id)",
                (tenant, event_id, grace))
            released += cur.rowcount
            if cur.rowcount:
                log.warning("released the reservation of %s/%s (%s): its event was never "
                            "published", tenant, event_id, meter)
    async with connect() as conn:
        cur = await conn.execute("SELECT count(*) FROM tally.entitlement_reservations")
        row = await cur.fetchone()
    done = Sweep(settled, released, len(in_log), int(row[0]) if row else 0)
    SWEPT.labels("settled").inc(done.settled)
    SWEPT.labels("released").inc(done.released)
    SWEPT.labels("published").inc(done.published)
    PENDING.set(done.pending)
    return done


async def published_on_usage_topic(settings: Settings, since: datetime, wanted: set[Key]
                                   ) -> set[Key]:
    """Which of `wanted` are events on the usage topic, reading it from `since` (by record
    time, where the broker answers that; else from the start) until a fetch comes back
    empty (the embedded broker's end offsets are not trusted: runtime.kafka.read_topic)."""
    topic = settings.topics.usage
    c = kafka.consumer(settings)
    await kafka.start(c)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        if not tps:
            return set()
        c.assign(tps)
        try:
            starts = await c.offsets_for_times(
                {tp: int(since.timestamp() * 1000) for tp in tps})
        except Exception as e:  # a broker without timestamp lookups: read it all
            log.info("offsets by time unavailable (%r): reading %s from the start", e, topic)
            starts = {}
        # A partition the broker says has nothing since `since` is skipped.
        reading = [tp for tp in tps if not (tp in starts and starts[tp] is None)]
        if not reading:
            return set()
        c.assign(reading)  # only the partitions with records since `since`
        for tp in reading:
            found = starts.get(tp)
            if found is None:
                await c.seek_to_beginning(tp)
            else:
                c.seek(tp, found.offset)
        hits: set[Key] = set()
        while batch := await c.getmany(timeout_ms=500):
            for records in batch.values():
                for record in records:
                    try:
                        events = decode_record(record.value)
                    except RecordDecodeError:
                        continue
                    for event in events:
                        if isinstance(event, dict):
                            key = (str(event.get("subject")), str(event.get("id")))
                            if key in wanted:
                                hits.add(key)
        return hits
    finally:
        await kafka.stop(c)


async def run_sweeper(settings: Settings, connect: Connect) -> None:
    """Sweep every `api_sweep_interval_seconds` until cancelled; a failed sweep is logged
    and tried again at the next interval."""
    grace = timedelta(seconds=settings.api_reservation_grace_seconds)

    async def published(since: datetime, wanted: set[Key]) -> set[Key]:
        return await published_on_usage_topic(settings, since, wanted)

    while True:
        await asyncio.sleep(settings.api_sweep_interval_seconds)
        try:
            done = await sweep(connect, published, grace)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("sweeping entitlement reservations failed, retrying: %r", e)
            continue
        if done.settled or done.released:
            log.info("reservations: %s", done)
