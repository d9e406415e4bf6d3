"""The Faust worker: the adapter around `PartitionProcessor`.

Usage records reach the Faust agent as frames written by the pre-batching stage
(streams/prebatch.py), each carrying many `tally.usage` records with their original
offsets and timestamps; subscription records arrive directly.

Per micro-batch (`stream.take_events`), in this order:
1. restore the state of any partition seen for the first time from `tally.worker-state`
   (read until a fetch returns nothing: end offsets are not trusted, see DESIGN.md);
2. fold every record into its partition's processor (pure decisions);
3. write the effects — changelog, accepted events, counters, quota states, DLQ,
   notifications — to the same partition number as the source, and wait until the broker
   has acknowledged every one of them;
4. only then return to Faust, which acks the records; their offsets are committed later.
A crash anywhere before 4 replays the records; the applied offsets kept in the state make
the replay change nothing that was already counted (see streams/processor.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable
from typing import Any

import faust
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from schemas.codec import BATCH_CONTENT_TYPE, CONTENT_TYPE_HEADER, dumps, loads
from schemas.plans import Catalog
from streams import frames, metrics
from streams.catalog_follower import CatalogFollower
from streams.errors import StateRecoveryError
from streams.prebatch import PreBatcher
from streams.processor import Effects, PartitionProcessor, ProcessorConfig, counter_key
from streams.quota_view import QuotaView, parse_quantity
from tally import kafka
from tally.settings import Settings

log = logging.getLogger(__name__)

MAX_BATCH_RECORDS = 2000
BATCH_WITHIN_SECONDS = 0.02
# Accepted events per output record: keeps each record far below the broker's size limit.
ACCEPTED_PER_RECORD = 1000


class Worker:
    """Holds the processors of the partitions this worker owns and persists their effects."""

    def __init__(self, app: faust.App, settings: Settings, config: ProcessorConfig) -> None:
        self.app = app
        self.settings = settings
        self.config = config
        self.topics = settings.topics
        self.processors: dict[int, PartitionProcessor] = {}
        self.catalog_follower = CatalogFollower(settings, self._on_catalog)

    def _on_catalog(self, catalog: Catalog) -> None:
        metrics.CATALOG_PLANS.set(len(catalog.plans))
        for processor in self.processors.values():
            processor.use_catalog(catalog)

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop the state of revoked partitions; it is restored if they come back."""
        for p in partitions:
            self.processors.pop(p, None)

    async def handle(self, events: list[Any]) -> None:
        """Process one micro-batch of Faust events; return once its effects are durable."""
        started = time.perf_counter()
        await self.catalog_follower.ready.wait()
        assignment = self.app.consumer.assignment()
        touched: set[int] = set()
        for event in events:
            message = event.message
            if message.tp not in assignment:
                continue  # revoked while buffered: its new owner processes it
            processor = await self._processor(message.partition)
            touched.add(message.partition)
            metrics.RECORDS.labels(message.topic).inc()
            if message.topic == self.topics.usage_batched:
                for offset, timestamp_ms, key, value in frames.decode(message.value):
                    processor.process_usage(self.topics.usage, offset, key, value, timestamp_ms)
            else:
                processor.process_subscription(
                    message.topic, message.offset, message.key, message.value
                )
        pending: list[Awaitable[Any]] = []
        for p in sorted(touched):
            processor = self.processors[p]
            effects = processor.drain()
            pending += await self._write(p, effects)
            metrics.DEDUP_IDS.labels(str(p)).set(processor.dedup.size)
        if pending:
            await asyncio.gather(*pending)
        metrics.BATCH_RECORDS.observe(len(events))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    async def _write(self, p: int, fx: Effects) -> list[Awaitable[Any]]:
        """Send every effect of one partition; return the delivery futures."""
        t = self.topics
        sends: list[tuple[str, str, bytes | None, list[tuple[str, bytes]] | None]] = []
        for key, state in fx.changelog:
            sends.append((t.worker_state, key, None if state is None else dumps(state), None))
        batch_header = [(CONTENT_TYPE_HEADER, BATCH_CONTENT_TYPE.encode())]
        for tenant, accepted in fx.accepted.items():
            for i in range(0, len(accepted), ACCEPTED_PER_RECORD):
                chunk = accepted[i:i + ACCEPTED_PER_RECORD]
                sends.append((t.usage_accepted, tenant, dumps(chunk), batch_header))
        for c in fx.counters:
            sends.append((t.counters, counter_key(c.tenant_id, c.meter, c.period_start),
                          dumps(_counter_record(c, p)), None))
        for q in fx.quota_states:
            sends.append((t.quota_state, f"{q.tenant_id}/{q.meter}", dumps(q), None))
        for d in fx.dead_letters:
            dlq_headers = [("tally-dlq-reason", d.reason.encode()),
                           ("tally-dlq-detail", d.detail[:1000].encode())]
            sends.append((t.usage_dlq, d.key or "", dumps(d), dlq_headers))
            metrics.DEAD_LETTERS.labels(d.reason).inc()
        for n in fx.notifications:
            sends.append((t.notifications, n.tenant_id, dumps(n), None))
        metrics.EVENTS.labels("counted").inc(fx.counted)
        metrics.EVENTS.labels("duplicate").inc(fx.duplicates)
        metrics.EVENTS.labels("dead").inc(len(fx.dead_letters))
        producer = self.app.producer
        futures: list[Awaitable[Any]] = []
        for topic, key, payload, headers in sends:
            fut = await producer.send(
                topic, key.encode(), payload, partition=p, timestamp=None, headers=headers,
            )
            futures.append(fut)
        return futures

    async def _processor(self, p: int) -> PartitionProcessor:
        processor = self.processors.get(p)
        if processor is None:
            assert self.catalog_follower.catalog is not None
            processor = PartitionProcessor(p, self.catalog_follower.catalog, self.config)
            await self._restore(processor)
            self.processors[p] = processor
        return processor

    async def _restore(self, processor: PartitionProcessor) -> None:
        """Read the partition's changelog to its true end into a fresh processor."""
        started = time.perf_counter()
        tp = TopicPartition(self.topics.worker_state, processor.partition)
        consumer = kafka.consumer(self.settings)
        try:
            await consumer.start()
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            empty_fetches = 0
            count = 0
            # Tansu under-reports end offsets: stop on consecutive empty fetches instead.
            while empty_fetches < 2:
                batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = (
                    await consumer.getmany(tp, timeout_ms=200)
                )
                records = batch.get(tp, [])
                empty_fetches = 0 if records else empty_fetches + 1
                for r in records:
                    processor.restore(r.key.decode(), loads(r.value) if r.value else None)
                    count += 1
        except Exception as e:
            raise StateRecoveryError(f"cannot restore partition {processor.partition}: {e}") from e
        finally:
            await consumer.stop()
        metrics.RECOVERY_SECONDS.observe(time.perf_counter() - started)
        log.info("restored partition %d from %d changelog records", processor.partition, count)


async def _fail(app: faust.App, error: Exception) -> None:
    """Crash the whole worker (exit code 1) rather than live on with a dead agent.

    Nothing was acknowledged for the failed batch, so a restarted worker (the supervisor's
    job) processes it again.
    """
    log.critical("worker failed, exiting: %r", error, exc_info=error)
    await app.crash(error)
    raise error


def _counter_record(c: Any, p: int) -> dict[str, Any]:
    return {
        "tenant_id": c.tenant_id, "meter": c.meter,
        "period_start": c.period_start.isoformat(), "period_end": c.period_end.isoformat(),
        "aggregation": c.aggregation, "value": str(c.value), "event_count": c.event_count,
        "partition": p, "applied_offset": c.applied_offset,
    }


def create_app(settings: Settings, web_port: int = 6066,
               config: ProcessorConfig | None = None) -> faust.App:
    """The Faust app of `tally worker`."""
    app = faust.App(
        settings.worker_id,
        broker=f"kafka://{settings.require_kafka()}",
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_session_timeout=4,
        broker_heartbeat_interval=0.5,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger_ms=2,
        producer_max_request_size=4 << 20,
        web_port=web_port,
        web_host="127.0.0.1",
        web_in_thread=False,
        store="memory://",
    )
    worker = Worker(app, settings, config or ProcessorConfig())
    app.tally_worker = worker  # type: ignore[attr-defined]
    # Usage arrives through the pre-batching stage (streams/prebatch.py): one Faust event
    # per frame of many records, so Faust's per-record cost does not bound throughput.
    source = app.topic(settings.topics.usage_batched, settings.topics.subscriptions)
    prebatcher = PreBatcher(settings)

    @app.agent(source)
    async def process(stream: Any) -> None:
        try:
            async for events in stream.take_events(MAX_BATCH_RECORDS, BATCH_WITHIN_SECONDS):
                await worker.handle(list(events))
        except Exception as e:
            await _fail(app, e)

    @app.task  # type: ignore[untyped-decorator]
    async def prebatch() -> None:
        try:
            await prebatcher.run()
        except Exception as e:
            await _fail(app, e)

    @app.task  # type: ignore[untyped-decorator]
    async def follow_catalog() -> None:
        try:
            await worker.catalog_follower.run()
        except Exception as e:
            await _fail(app, e)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(app: faust.App, revoked: set[Any], **_: Any) -> None:
        worker.forget(tp.partition for tp in revoked)

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    # For services that cannot embed a QuotaView: the same answer over HTTP.
    quota_view = QuotaView(settings)

    @app.task  # type: ignore[untyped-decorator]
    async def follow_quota_state() -> None:
        await quota_view.run()  # reconnects by itself; ends only when cancelled

    @app.page("/quota/{tenant}/{meter}")
    async def quota_page(web: Any, request: Any, tenant: str, meter: str) -> Any:
        try:
            quantity = parse_quantity(request.query.get("quantity"))
        except ValueError as e:
            return web.bytes(dumps({"error": str(e)}), content_type="application/json",
                             status=400)
        body = dumps(quota_view.check(tenant, meter, quantity).to_json())
        return web.bytes(body, content_type="application/json",
                         status=200 if quota_view.ready else 503)

    @app.page("/healthz")
    async def health(web: Any, request: Any) -> Any:
        ready = worker.catalog_follower.ready.is_set()
        return web.json({"ok": ready, "partitions": sorted(worker.processors)},
                        status=200 if ready else 503)

    return app


def run_worker(settings: Settings, web_port: int, loglevel: str = "info") -> None:
    """Run the worker until SIGTERM/SIGINT (Faust stops agents, flushes and commits)."""
    app = create_app(settings, web_port)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
