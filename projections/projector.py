"""The projector: Kafka topics -> Postgres read models, exactly once.

Loop, per fetched batch:
1. decode the records of every topic it projects;
2. in ONE transaction: write the rows (ledger + rollups, subscriptions, quota states) and
   upsert `projection_offsets` to the next offset of every partition in the batch;
3. commit. A crash before 3 leaves neither rows nor offsets; on restart the consumer seeks
   to the stored offsets, so every record is applied exactly once.
Kafka consumer-group offsets are not used at all; Postgres holds the only offsets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from pydantic import TypeAdapter, ValidationError

from projections import metrics
from projections.ledger import ensure_month_partitions, write_accepted
from projections.migrations import connect, migrate
from schemas.codec import RecordDecodeError, decode_record, loads
from schemas.events import SubscriptionEvent
from schemas.records import AcceptedEvent, QuotaState
from tally import kafka
from tally.settings import Settings

log = logging.getLogger(__name__)

PROJECTION = "read_models"
_ACCEPTED = TypeAdapter(list[AcceptedEvent])
_SUBSCRIPTION = TypeAdapter(SubscriptionEvent)
_STATUS = {
    "tally.subscription.created.v1": "active",
    "tally.subscription.plan_changed.v1": "active",
    "tally.subscription.renewed.v1": "active",
    "tally.subscription.canceled.v1": "canceled",
}

Conn = psycopg.Connection[tuple[Any, ...]]
Records = list[ConsumerRecord[bytes, bytes]]


class Projector:
    """Projects accepted usage, subscriptions and quota states into schema `tally`."""

    def __init__(self, settings: Settings, max_records: int = 20000) -> None:
        self.settings = settings
        self.max_records = max_records
        t = settings.topics
        self.handlers: dict[str, Callable[[Conn, Records], None]] = {
            t.usage_accepted: self._project_accepted,
            t.subscriptions: self._project_subscriptions,
            t.quota_state: self._project_quota_states,
        }
        self._months: set[datetime] = set()
        self.stopping = asyncio.Event()
        self.projected = 0

    async def run(self) -> None:
        """Project until `stop()` is called; the batch in progress is finished first."""
        database_url = self.settings.require_database()
        migrate(database_url)
        consumer = kafka.consumer(self.settings)
        await consumer.start()
        try:
            with connect(database_url) as conn:
                await self._assign(consumer, conn)
                while not self.stopping.is_set():
                    batch = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
                    if batch:
                        self._apply(conn, batch)
        finally:
            await consumer.stop()

    def stop(self) -> None:
        self.stopping.set()

    async def _assign(self, consumer: Any, conn: Conn) -> None:
        stored = {
            (topic, partition): offset
            for topic, partition, offset in conn.execute(
                "SELECT topic, partition, next_offset FROM tally.projection_offsets"
                " WHERE projection = %s", (PROJECTION,),
            )
        }
        conn.commit()
        tps = []
        for topic in self.handlers:
            for p in sorted(consumer.partitions_for_topic(topic) or ()):
                tps.append(TopicPartition(topic, p))
        consumer.assign(tps)
        for tp in tps:
            if (tp.topic, tp.partition) in stored:
                consumer.seek(tp, stored[(tp.topic, tp.partition)])
            else:
                await consumer.seek_to_beginning(tp)

    def _apply(self, conn: Conn, batch: dict[TopicPartition, Records]) -> None:
        started = time.perf_counter()
        by_topic: dict[str, Records] = defaultdict(list)
        for tp, records in batch.items():
            by_topic[tp.topic].extend(records)
        with conn.transaction():
            for topic, records in by_topic.items():
                self.handlers[topic](conn, records)
                metrics.RECORDS.labels(topic).inc(len(records))
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO tally.projection_offsets (projection, topic, partition,"
                    " next_offset) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (projection, topic, partition)"
                    " DO UPDATE SET next_offset = excluded.next_offset",
                    [(PROJECTION, tp.topic, tp.partition, records[-1].offset + 1)
                     for tp, records in batch.items() if records],
                )
        count = sum(len(r) for r in batch.values())
        self.projected += count
        metrics.BATCH_RECORDS.observe(count)
        metrics.WRITE_SECONDS.observe(time.perf_counter() - started)
        for topic, records in by_topic.items():
            metrics.LAG_SECONDS.labels(topic).set(
                max(time.time() - records[-1].timestamp / 1000, 0.0)
            )

    # --- handlers: each runs inside the batch transaction ------------------------------

    def _project_accepted(self, conn: Conn, records: Records) -> None:
        events: list[AcceptedEvent] = []
        for r in records:
            try:
                events.extend(_ACCEPTED.validate_python(decode_record(r.value)))
            except (RecordDecodeError, ValidationError) as e:
                # The worker wrote it, so this is a bug, not bad input: say so loudly,
                # but do not block the partition behind it.
                log.error("skipping unreadable accepted record %s/%s@%s: %s",
                          r.topic, r.partition, r.offset, e)
        ensure_month_partitions(conn, events, self._months)
        metrics.ROWS.inc(write_accepted(conn, events))

    def _project_subscriptions(self, conn: Conn, records: Records) -> None:
        rows = []
        for r in records:
            try:
                items = decode_record(r.value)
            except RecordDecodeError:
                continue  # the worker dead-letters it; nothing to project
            for item in items:
                try:
                    e = _SUBSCRIPTION.validate_python(item)
                except ValidationError:
                    continue
                rows.append((e.subject, e.data.plan_id, _STATUS[e.type], e.data.period_start,
                             e.data.period_end, e.data.stripe_customer_id,
                             e.data.stripe_subscription_id, e.time))
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO tally.subscriptions AS s (tenant_id, plan_id, status,"
                " current_period_start, current_period_end, stripe_customer_id,"
                " stripe_subscription_id, updated_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)"
                " ON CONFLICT (tenant_id) DO UPDATE SET plan_id = excluded.plan_id,"
                " status = excluded.status,"
                " current_period_start = excluded.current_period_start,"
                " current_period_end = excluded.current_period_end,"
                " stripe_customer_id = coalesce(excluded.stripe_customer_id, s.stripe_customer_id),"
                " stripe_subscription_id = coalesce(excluded.stripe_subscription_id,"
                " s.stripe_subscription_id), updated_at = excluded.updated_at",
                rows,
            )

    def _project_quota_states(self, conn: Conn, records: Records) -> None:
        latest: dict[tuple[str, str], tuple[QuotaState, datetime]] = {}
        for r in records:
            if r.value is None:
                continue
            q = QuotaState.model_validate(loads(r.value))
            latest[(q.tenant_id, q.meter)] = (q, datetime.fromtimestamp(r.timestamp / 1000, UTC))
        with conn.cursor() as cur:
            cur.executemany(
                'INSERT INTO tally.quota_state (tenant_id, meter, period_start, used, "limit",'
                " state, updated_at) VALUES (%s,%s,%s,%s,%s,%s,%s)"
                " ON CONFLICT (tenant_id, meter) DO UPDATE SET"
                ' period_start = excluded.period_start, used = excluded.used,'
                ' "limit" = excluded."limit", state = excluded.state,'
                " updated_at = excluded.updated_at",
                [(q.tenant_id, q.meter, q.period_start, q.used, q.limit, q.state, at)
                 for q, at in latest.values()],
            )
