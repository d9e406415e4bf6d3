"""The projector: Kafka topics -> Postgres read models, exactly once.

Loop, per fetched batch:
1. decode and validate the records of every topic it projects; a record, or an event of a
   batch record, that cannot be applied becomes a `Problem` (reason + log position);
2. in ONE transaction:
   a. take the projection's advisory lock and check that the stored offsets are the ones
      this projector last committed. If they moved (a `tally projections rebuild` swap, or
      a second projector of the same name), discard the batch and re-seek to them;
   b. write the rows (ledger + rollups, subscriptions, quota states, plan catalog). An
      event that still breaks a constraint is retried alone under a savepoint and becomes
      a Problem, so the good rows of the batch land and the partition is never blocked;
   c. write the Problems to `projection_errors` (keyed by log position: replays add none);
   d. publish each Problem as a dead letter to `tally.usage.dlq` and wait until the
      broker has it (see "Nothing disappears" below);
   e. upsert `projection_offsets` to the next offset of every partition in the batch;
3. commit; then log the Problems and count them in metrics. A crash before the commit
   leaves neither rows nor offsets; on restart the consumer seeks to the stored offsets,
   so every record is applied exactly once.

Nothing disappears (DESIGN guarantee 3): an event the worker accepted but Postgres cannot
store, and any other record the projector cannot apply, is not only a row of
`projection_errors` (which finance reads) but also a dead letter on the same topic as the
worker's, with `source_topic` naming where it was read: whoever accounts for every
published event finds it where the worker's rejects are. The dead letters of a batch are
acknowledged by the broker before its transaction commits, so a crash in between writes
them again on restart, with the same source position (at least once: count dead letters
by position, as `schemas.records.DeadLetter` says).
Kafka consumer-group offsets are not used at all; Postgres holds the only offsets.

Step 1 of the next batch overlaps step 2 of this one (`Projector.project`): the batch's
big ledger statement is waited for in a thread while the event loop fetches, decodes and
stages the next batch, so Python and Postgres each keep a core busy. Transactions still
run one at a time, in log order.

Every handler is also safe to re-apply to a suffix of the log in order (ledger by unique
key, the rest last-write-wins by key), which is what lets a rebuild hand over to the live
projector with offsets that differ from its own (projections/rebuild.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from functools import partial
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import TypeAdapter, ValidationError

from projections import metrics
from projections.batch import REJECTED, Batch, Problem, Record, Records
from projections.current_state import project_plans, project_quota_states, project_subscriptions
from projections.fast_accepted import from_model, read_accepted
from projections.history import ingested_through, write_watermarks
from projections.ledger import (
    Accepted,
    accepted_problems,
    ensure_month_partitions,
    fold_staged,
    load_staged,
    write_accepted,
)
from runtime import kafka
from runtime.postgres import Connection, connect, migrate
from runtime.settings import Settings
from schemas.codec import RecordDecodeError, decode_record, dumps
from schemas.plans import format_validation_error
from schemas.records import AcceptedEvent

log = logging.getLogger(__name__)

PROJECTION = "read_models"
_ACCEPTED = TypeAdapter(AcceptedEvent)


def lock_key(schema: str, projection: str) -> int:
    """The advisory lock serialising the transactions of one projection in one schema."""
    digest = hashlib.blake2b(f"{schema}/{projection}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _Fenced(Exception):
    """The stored offsets are not the ones this projector committed last."""


# The end of a `Projector.project` input (an empty batch, so that it types as one).
_END = Batch({})


class Projector:
    """Projects accepted usage, subscriptions, quota states and the plan catalog.

    `schema` / `projection` let a second instance build the read models beside the live
    ones (a rebuild); the default is the live read models of DESIGN.md.
    """

    def __init__(self, settings: Settings, max_records: int = 20000, *,
                 schema: str = "tally", projection: str = PROJECTION) -> None:
        self.settings = settings
        self.max_records = max_records
        self.schema = schema
        self.projection = projection
        t = settings.topics
        self.accepted_topic = t.usage_accepted
        # The accepted events have their own path (`_project_accepted`).
        self.handlers: dict[str, Callable[[Connection, Batch, Records], None]] = {
            t.subscriptions: partial(project_subscriptions, schema=schema),
            t.quota_state: partial(project_quota_states, schema=schema),
            t.plans: partial(project_plans, schema=schema),
        }
        self.topics = [self.accepted_topic, *self.handlers]
        self._months: set[datetime] = set()
        self._committed: dict[tuple[str, int], int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None  # dead letters; started when needed
        self.stopping = asyncio.Event()
        self.projected = 0

    async def run(self) -> None:
        """Project until `stop()` is called; the batch in progress is finished first."""
        database_url = self.settings.require_database()
        migrate(database_url)
        with connect(database_url) as conn:
            await self.open(conn)
            try:
                await self.project(conn, self._fetched())
            finally:
                await self.close()

    async def project(self, conn: Connection, batches: AsyncIterator[Batch | None]) -> None:
        """Commit the batches in order (None: nothing fetched this time).

        The next batch is fetched, decoded and staged by a task of this event loop, which
        runs while a transaction waits for its big statement (`_project_accepted`): Python
        and Postgres then each keep a core busy. Exactly once still holds: one transaction
        at a time, in log order, each with the offsets of its own records. If one is
        fenced, the batch read past it is dropped and the consumer re-seeks to the stored
        offsets.
        """
        upcoming = asyncio.ensure_future(anext(batches, _END))
        try:
            while (batch := await upcoming) is not _END:
                upcoming = asyncio.ensure_future(anext(batches, _END))
                if batch is not None and not await self.commit(conn, batch):
                    await upcoming  # read past the fenced batch (or None): dropped
                    await self._assign(conn)
                    upcoming = asyncio.ensure_future(anext(batches, _END))
        finally:
            upcoming.cancel()

    def stop(self) -> None:
        self.stopping.set()

    async def open(self, conn: Connection) -> None:
        """Start the consumer at the stored offsets of this projection."""
        self._consumer = kafka.consumer(self.settings)
        await self._consumer.start()
        await self._assign(conn)

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    @property
    def committed(self) -> dict[tuple[str, int], int]:
        """Next offset per (topic, partition), as last committed by this projector."""
        return dict(self._committed)

    async def step(self, conn: Connection) -> int:
        """Fetch and apply one batch; return how many records it held (0: caught up)."""
        fetched = await self._fetch()
        if not fetched:
            return 0
        if not await self.commit(conn, self.prepare(fetched)):
            await self._assign(conn)
            return 0
        return sum(len(r) for r in fetched.values())

    async def _fetched(self) -> AsyncIterator[Batch | None]:
        """The consumer's batches, prepared, until `stop()`. An empty fetch gives None
        rather than waiting for data: `project` may be waiting to re-seek."""
        while not self.stopping.is_set():
            fetched = await self._fetch()
            yield self.prepare(fetched) if fetched else None

    async def _fetch(self) -> dict[TopicPartition, Records]:
        assert self._consumer is not None, "open() first"
        fetched: dict[TopicPartition, Records] = await self._consumer.getmany(
            timeout_ms=200, max_records=self.max_records)
        if fetched:
            self._observe_lag(fetched)
        else:
            self._observe_caught_up()
        return fetched

    async def _assign(self, conn: Connection) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        with conn.transaction():
            self._committed = self._stored_offsets(conn)
        tps = []
        for topic in self.topics:
            for p in sorted(consumer.partitions_for_topic(topic) or ()):
                tps.append(TopicPartition(topic, p))
        consumer.assign(tps)
        for tp in tps:
            if (tp.topic, tp.partition) in self._committed:
                consumer.seek(tp, self._committed[(tp.topic, tp.partition)])
            else:
                await consumer.seek_to_beginning(tp)

    def _stored_offsets(self, conn: Connection) -> dict[tuple[str, int], int]:
        return {
            (topic, partition): offset
            for topic, partition, offset in conn.execute(
                f"SELECT topic, partition, next_offset FROM {self.schema}.projection_offsets"
                " WHERE projection = %s", (self.projection,),
            )
        }

    def prepare(self, fetched: dict[TopicPartition, Records]) -> Batch:
        """Step 1 of the module docstring, for the accepted events (the other topics are
        small, and decoded in their handlers); needs no connection."""
        batch = Batch(fetched)
        if accepted := batch.by_topic.get(self.accepted_topic):
            batch.stage([(r, pairs) for r in accepted
                         if (pairs := self._decode_accepted(batch, r))])
        return batch

    async def commit(self, conn: Connection, batch: Batch) -> bool:
        """Apply a prepared batch in one transaction (steps 2-3 of the module docstring).

        Returns False when fenced: nothing was written and the caller re-seeks.
        """
        started = time.perf_counter()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)",
                             (lock_key(self.schema, self.projection),))
                if self._stored_offsets(conn) != self._committed:
                    raise _Fenced
                if batch.staged.rows:
                    await self._project_accepted(conn, batch)
                    write_watermarks(conn, self.projection, ingested_through(
                        (r.topic, r.partition, (e for _, e in pairs))
                        for r, pairs in batch.accepted), self.schema)
                for topic, records in batch.by_topic.items():
                    if topic != self.accepted_topic:
                        self.handlers[topic](conn, batch, records)
                self._write_problems(conn, batch.problems)
                await self._publish_dead_letters(batch.problems)
                with conn.cursor() as cur:
                    cur.executemany(
                        f"INSERT INTO {self.schema}.projection_offsets (projection, topic,"
                        " partition, next_offset) VALUES (%s, %s, %s, %s)"
                        " ON CONFLICT (projection, topic, partition)"
                        " DO UPDATE SET next_offset = excluded.next_offset",
                        [(self.projection, t, p, o) for (t, p), o in batch.offsets.items()],
                    )
        except _Fenced:
            self._months.clear()  # partitions created in the rolled-back transaction
            metrics.FENCED.inc()
            log.warning("projection %s.%s: stored offsets moved (rebuild swap or another"
                        " projector); re-seeking", self.schema, self.projection)
            return False
        except BaseException:
            self._months.clear()
            raise
        self._committed.update(batch.offsets)
        self.projected += batch.records
        for topic, records in batch.by_topic.items():
            metrics.RECORDS.labels(topic).inc(len(records))
        metrics.ROWS.inc(batch.new_rows)
        metrics.BATCH_RECORDS.observe(batch.records)
        metrics.BATCH_EVENTS.observe(batch.events)
        metrics.WRITE_SECONDS.observe(time.perf_counter() - started)
        for p in batch.problems:
            metrics.ERRORS.labels(p.topic, p.reason).inc()
            log.error("projection error %s/%s@%s item %s: %s: %s",
                      p.topic, p.partition, p.offset, p.item, p.reason, p.detail)
        return True

    def _observe_lag(self, batch: dict[TopicPartition, Records]) -> None:
        assert self._consumer is not None
        now = time.time()
        for tp, records in batch.items():
            if not records:
                continue
            end = self._consumer.highwater(tp)
            if end is not None:
                behind = max(end - (records[-1].offset + 1), 0)
                metrics.LAG_RECORDS.labels(tp.topic, str(tp.partition)).set(behind)
            metrics.LAG_SECONDS.labels(tp.topic).set(max(now - records[-1].timestamp / 1000, 0))

    def _observe_caught_up(self) -> None:
        """An empty fetch: nothing is waiting on any assigned partition."""
        assert self._consumer is not None
        for tp in self._consumer.assignment():
            metrics.LAG_RECORDS.labels(tp.topic, str(tp.partition)).set(0)
        for topic in self.topics:
            metrics.LAG_SECONDS.labels(topic).set(0)

    # --- problems ----------------------------------------------------------------------

    async def _publish_dead_letters(self, problems: list[Problem]) -> None:
        """Step 2d: every problem as a dead letter, acknowledged by the broker."""
        if not problems:
            return
        if self._producer is None:
            self._producer = kafka.producer(self.settings)
            await self._producer.start()
        topic = self.settings.topics.usage_dlq
        sent = []
        for p in problems:
            letter = p.dead_letter()
            sent.append(await self._producer.send(
                topic, dumps(letter), (p.key or "").encode(), headers=letter.headers()))
        await asyncio.gather(*sent)

    def _write_problems(self, conn: Connection, problems: list[Problem]) -> None:
        if not problems:
            return
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {self.schema}.projection_errors (topic, partition, \"offset\","
                " item, reason, detail, record_timestamp) VALUES (%s,%s,%s,%s,%s,%s,%s)"
                " ON CONFLICT DO NOTHING",
                [(p.topic, p.partition, p.offset, p.item, p.reason, p.detail,
                  p.record_timestamp) for p in problems],
            )

    # --- handlers: each runs inside the batch transaction ------------------------------

    def _decode_accepted(self, batch: Batch, r: Record) -> list[tuple[int, Accepted]]:
        """The applicable events of one record; every other one is reported (runs in
        `prepare`, before the transaction). Nearly every event takes the fast path; the
        model judges the rest."""
        try:
            items = decode_record(r.value)
        except RecordDecodeError as e:
            batch.report(r, -1, "unreadable_record", str(e))
            return []
        good = []
        for index, item in enumerate(items):
            event = read_accepted(item)
            if event is None:
                event = self._checked_accepted(batch, r, index, item)
                if event is None:
                    continue
            good.append((index, event))
        return good

    @staticmethod
    def _checked_accepted(batch: Batch, r: Record, index: int, item: Any) -> Accepted | None:
        """The model's verdict on an event the fast path declined: the event, or None after
        reporting what is wrong with it."""
        try:
            event = from_model(_ACCEPTED.validate_python(item))
        except ValidationError as e:
            batch.report(r, index, "invalid_event", format_validation_error(e), item)
            return None
        if problems := accepted_problems(event):
            batch.report(r, index, "constraint_violation", "; ".join(problems), item)
            return None
        return event

    async def _project_accepted(self, conn: Connection, batch: Batch) -> None:
        """The ledger and rollups, from the accepted events `prepare` decoded and staged."""
        ensure_month_partitions(conn, batch.staged, self._months, self.schema)
        try:
            with conn.transaction():  # a savepoint: the fallback below starts clean
                load_staged(conn, batch.staged)
                # Most of the transaction's time: waited for in a thread, so that this
                # event loop prepares the next batch meanwhile (`project`). Nothing else
                # uses the connection until it returns.
                batch.new_rows += await asyncio.to_thread(
                    fold_staged, conn, batch.staged, self.schema)
        except psycopg.errors.UniqueViolation:
            # A ledger key written by another transaction meanwhile (see ledger.py): not
            # the data's fault. Restarting from the stored offsets applies the batch once.
            raise
        except REJECTED:
            self._write_accepted_one_by_one(conn, batch)

    def _write_accepted_one_by_one(self, conn: Connection, batch: Batch) -> None:
        """The slow path after the database refused the batch: a savepoint per record,
        then per event of a refused record, in log order; refused events are reported."""
        for r, pairs in batch.accepted:
            try:
                with conn.transaction():
                    batch.new_rows += write_accepted(conn, [(r.offset, pairs)], self.schema)
                continue
            except REJECTED:
                pass
            for index, event in pairs:
                try:
                    with conn.transaction():
                        batch.new_rows += write_accepted(conn, [(r.offset, [(index, event)])],
                                                         self.schema)
                except REJECTED as e:
                    batch.report(r, index, "rejected_by_database", str(e).splitlines()[0],
                                 event._asdict())
