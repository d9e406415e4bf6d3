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
- on the log, but every record of it there dead-lettered by the worker (`tally.usage.dlq`:
  a meter the catalog no longer defines, say): the ledger will never have it, so the use
  did not happen either; released the same way. Matched by the event's position on
  `tally.usage` (partition, offset, index in a batch record), which the worker's dead
  letter names, not by its id: another record carrying the same id (a malformed copy, a
  retry) says nothing about the one the worker may still count.

The projector's refusals (`tally.projection_errors`, and dead letters whose source topic
is `tally.usage.accepted`) are not looked for: the worker accepts only what every later
stage can store (schemas/validation.py, README "What Tally accepts"), so an event the
worker accepted from `consume` reaches the ledger; the projector refuses only records the
current worker did not write (an older worker's, another producer's).

Each sweep counts its outcomes in `tally_api_reservations_swept_total{outcome}` (settled,
released: never published, dead_lettered: released because the worker refused its
event, published: found in the log, still waiting for the ledger) and sets
`tally_api_reservations_pending`, the reservations left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from api.entitlements import LOCK_SPACE, Connect
from runtime import kafka
from runtime.settings import Settings
from schemas.codec import RecordDecodeError, decode_record, is_batch_value
from schemas.records import DeadLetter

log = logging.getLogger(__name__)
SWEPT = Counter("tally_api_reservations_swept_total",
                "Entitlement reservations the sweeper settled (in the ledger), released "
                "(never published), released because the worker dead-lettered their "
                "event, or found published and waiting for the ledger",
                ["outcome"])
OUTCOMES = ("settled", "released", "dead_lettered", "published")
for _outcome in OUTCOMES:  # a fixed label set, every series present from the start
    SWEPT.labels(_outcome)
PENDING = Gauge("tally_api_reservations_pending",
                "Entitlement reservations not in the ledger after the last sweep")
Key = tuple[str, str]  # tenant, event id
# Where an event is on the usage topic: partition, offset, and its index in a batch record
# (None: the record is that one event). A dead letter names the same, or (partition,
# offset, None) for a whole record it could not read.
Position = tuple[int, int, int | None]


@dataclass(frozen=True)
class OnLog:
    """What the log says of the keys a sweep looked for: where each one found on the usage
    topic is, and which positions of the usage topic the worker dead-lettered."""

    positions: dict[Key, set[Position]]
    dead: set[Position]

    def dead_lettered(self) -> set[Key]:
        """The keys every record of which, on the usage topic, was dead-lettered: the
        ledger will never count them."""
        return {key for key, where in self.positions.items()
                if where and all(self._is_dead(p) for p in where)}

    def _is_dead(self, position: Position) -> bool:
        partition, offset, _ = position
        return position in self.dead or (partition, offset, None) in self.dead


# What the log says of `wanted` since a time.
Published = Callable[[datetime, set[Key]], Awaitable[OnLog]]


@dataclass(frozen=True)
class Sweep:
    settled: int
    released: int
    dead_lettered: int
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
    on_log = OnLog({}, set())
    if stale:
        since = min(row[3] for row in stale) - timedelta(minutes=1)  # clocks drift
        on_log = await published(since, {(row[0], row[1]) for row in stale})
    refused = on_log.dead_lettered()
    waiting = on_log.positions.keys() - refused  # on the log, the ledger may count them
    released = dead_lettered = 0
    for tenant, event_id, meter, _ in stale:
        if (tenant, event_id) in waiting:
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
            if not cur.rowcount:
                continue
            if (tenant, event_id) in refused:
                dead_lettered += 1
                log.warning("released the reservation of %s/%s (%s): the worker "
                            "dead-lettered its event", tenant, event_id, meter)
            else:
                released += 1
                log.warning("released the reservation of %s/%s (%s): its event was never "
                            "published", tenant, event_id, meter)
    async with connect() as conn:
        cur = await conn.execute("SELECT count(*) FROM tally.entitlement_reservations")
        row = await cur.fetchone()
    done = Sweep(settled, released, dead_lettered, len(waiting), int(row[0]) if row else 0)
    SWEPT.labels("settled").inc(done.settled)
    SWEPT.labels("released").inc(done.released)
    SWEPT.labels("dead_lettered").inc(done.dead_lettered)
    SWEPT.labels("published").inc(done.published)
    PENDING.set(done.pending)
    return done


async def published_on_usage_topic(settings: Settings, since: datetime, wanted: set[Key]
                                   ) -> OnLog:
    """Where `wanted` are on the usage topic, and, if any is there, which positions of it
    the worker dead-lettered; both topics read from `since` (a dead letter is written after
    the record it names)."""
    usage = settings.topics.usage
    positions: dict[Key, set[Position]] = {}
    for record in await _records_since(settings, usage, since):
        try:
            events = decode_record(record.value)
        except RecordDecodeError:
            continue
        batch = is_batch_value(record.value)
        for index, event in enumerate(events):
            if isinstance(event, dict):
                key = (str(event.get("subject")), str(event.get("id")))
                if key in wanted:
                    positions.setdefault(key, set()).add(
                        (record.partition, record.offset, index if batch else None))
    dead: set[Position] = set()
    if positions:
        for record in await _records_since(settings, settings.topics.usage_dlq, since):
            try:
                letter = DeadLetter.model_validate_json(record.value)
            except ValidationError:
                continue
            if letter.source_topic == usage:  # not the projector's (usage.accepted)
                dead.add((letter.source_partition, letter.source_offset, letter.index))
    return OnLog(positions, dead)


async def _records_since(settings: Settings, topic: str, since: datetime) -> list[Any]:
    """The records of `topic` from `since` (by record time, where the broker answers that;
    else from the start) until a fetch comes back empty (the embedded broker's end offsets
    are not trusted: runtime.kafka.read_topic)."""
    c = kafka.consumer(settings)
    await kafka.start(c)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        c.assign(tps)
        reading = await _seek_to_time(c, tps, since)
        if not reading:
            return []
        records: list[Any] = []
        while batch := await c.getmany(*reading, timeout_ms=500):
            for part in batch.values():
                records.extend(part)
        return records
    finally:
        await kafka.stop(c)


async def _seek_to_time(c: AIOKafkaConsumer, tps: list[TopicPartition], since: datetime
                        ) -> list[TopicPartition]:
    """Position `c` on the first record of each partition at or after `since`; return the
    partitions to read (a partition the broker says has nothing since then is left out)."""
    try:
        starts = await c.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
    except Exception as e:  # a broker without timestamp lookups: read it all
        log.info("offsets by time unavailable (%r): reading %s from the start", e,
                 tps[0].topic)
        starts = {}
    reading = [tp for tp in tps if not (tp in starts and starts[tp] is None)]
    if reading:
        c.assign(reading)
    for tp in reading:
        found = starts.get(tp)
        if found is None:
            await c.seek_to_beginning(tp)
        else:
            c.seek(tp, found.offset)
    return reading


async def run_sweeper(settings: Settings, connect: Connect) -> None:
    """Sweep every `api_sweep_interval_seconds` until cancelled; a failed sweep is logged
    and tried again at the next interval."""
    grace = timedelta(seconds=settings.api_reservation_grace_seconds)

    async def published(since: datetime, wanted: set[Key]) -> OnLog:
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
        if done.settled or done.released or done.dead_lettered:
            log.info("reservations: %s", done)
