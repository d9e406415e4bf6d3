"""The Faust worker: the adapter around `PartitionProcessor`.

Usage and subscription records reach the Faust agent as frames written by the
pre-batching stage (streams/prebatch.py) to the partition that owns their tenant, each
carrying many source records with their source partitions, original offsets and
timestamps, most usage records already checked into compact rows. The agent consumes
`tally.usage.batched` only: one processor per partition of it holds every tenant that
partition owns (docs/architecture.md, "Partition ownership").

Per micro-batch (`stream.noack_take`), in this order:
1. restore the state of every newly assigned partition from `tally.worker-state`
   (read until a fetch returns nothing: end offsets are not trusted, see DESIGN.md);
2. fold every record into its partition's processor (pure decisions);
3. encode the effects — changelog, accepted events, counters, quota states, DLQ,
   notifications — and send them, after the previous batch's, to the same partition
   number as the source;
4. ack the batch's events to Faust (whose offsets it commits later) only once the broker
   has acknowledged every effect of this batch and of the batches before it.
Sending (3) and acking (4) go on in the background: the next batch is processed while the
broker takes the effects of the previous ones (at most MAX_BATCHES_IN_FLIGHT batches).
A crash anywhere before 4 replays the records; the applied offsets kept in the state make
the replay change nothing that was already counted (see streams/processor.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Iterable
from typing import Any

import faust
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runtime import kafka
from runtime.credentials import Tokens, authorize, load_tokens
from runtime.gc_tuning import tune_gc
from runtime.plans import CatalogFollower
from runtime.settings import Settings, state_dir
from schemas.codec import BATCH_CONTENT_TYPE, CONTENT_TYPE_HEADER, dumps, join_arrays, loads
from schemas.plans import Catalog
from streams import frames, metrics, prebatch
from streams.errors import StateRecoveryError
from streams.faust_transport import App
from streams.faust_transport import Worker as FaustWorker
from streams.log_watch import LogWatch
from streams.prebatch import PreBatchExitedError
from streams.processor import Effects, PartitionProcessor, ProcessorConfig, counter_key
from streams.quota_view import QuotaView, parse_quota_query
from streams.restart import count_carried_restarts, restart_in_place

log = logging.getLogger(__name__)

# A frame holds up to 512 KiB of source records (streams/prebatch.py): 64 frames bound a
# batch's memory to 32 MiB, and let batches grow when the worker falls behind, which is
# what lets it catch up (its costs per batch are mostly per tenant, not per event).
MAX_BATCH_FRAMES = 64
BATCH_WITHIN_SECONDS = 0.02
MAX_BATCHES_IN_FLIGHT = 2
# Accepted events are written in records of about this many bytes (an array the processor
# encoded is not split: it holds at most MAX_ACCEPTED_PER_ARRAY events).
ACCEPTED_RECORD_BYTES = 512 << 10


_COUNTED = metrics.EVENTS.labels("counted")
Send = tuple[str, str, bytes | None, list[tuple[str, bytes]] | None]  # topic, key, value, headers


class Worker:
    """Holds the processors of the partitions this worker owns and persists their effects."""

    def __init__(self, app: faust.App, settings: Settings, config: ProcessorConfig) -> None:
        self.app = app
        self.settings = settings
        self.config = config
        self.topics = settings.topics
        self.processors: dict[int, PartitionProcessor] = {}
        self.catalog_follower = CatalogFollower(settings, self._on_catalog)
        # Effects go through a plain aiokafka producer (started on first use, inside the
        # event loop): Faust's wrapper costs several times more per record, and a batch
        # writes a few records per tenant it touched. Its acknowledgements are awaited
        # before the batch is acked, so Faust's flush-before-commit is not needed for them.
        self.producer: AIOKafkaProducer | None = None
        self._sending: asyncio.Future[list[asyncio.Future[Any]]] | None = None
        # The next offset of each partition held to process (the log watch's measure of
        # progress, streams/log_watch.py).
        self.positions: dict[int, int] = {}

    def _on_catalog(self, catalog: Catalog) -> None:
        metrics.CATALOG_PLANS.set(len(catalog.plans))
        for processor in self.processors.values():
            processor.use_catalog(catalog)

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop the state of revoked partitions; it is restored if they come back."""
        for p in partitions:
            self.processors.pop(p, None)
            self.positions.pop(p, None)

    def progress(self) -> dict[int, int]:
        """The positions of the partitions held, once there is a catalog to count with (a
        worker waiting for one is not stalled)."""
        if not self.catalog_follower.ready.is_set():
            return {}
        return {p: o for p, o in self.positions.items() if p in self.processors}

    async def handle(
        self, events: list[Any],
    ) -> tuple[list[Any], asyncio.Future[list[asyncio.Future[Any]]]]:
        """Process one micro-batch of Faust events and start sending its effects; return
        the events whose effects are being sent, and the sending, which gives the broker
        acknowledgements to wait for before those events may be acked."""
        started = time.perf_counter()
        await self.catalog_follower.ready.wait()
        assignment = self.app.consumer.assignment()
        # Revoked while buffered: their new owner processes them.
        events = [e for e in events if e.message.tp in assignment]
        # Every partition assigned is restored at once, not when its first record comes:
        # each restore pauses processing for at least two empty changelog fetches.
        await self._restore({tp.partition for tp in assignment
                             if tp.topic == self.topics.usage_batched} - set(self.processors))
        # A rebalance at any await below may revoke partitions: their records are then
        # left to the new owner, and neither written nor acked (were the partition given
        # back, an ack would commit records whose effects were never written).
        processors = dict(self.processors)
        touched: dict[int, PartitionProcessor] = {}
        for event in events:
            message = event.message
            processor = processors.get(message.partition)
            if processor is None:  # revoked during the restore
                continue
            touched[message.partition] = processor
            self.positions[message.partition] = message.offset + 1
            metrics.RECORDS.labels(message.topic).inc()
            counted_before = processor.counted_since_drain
            for offset, timestamp_ms, key, value, kind, source in frames.decode(
                    message.value, message.partition):
                if kind == frames.SUBSCRIPTION:
                    processor.process_subscription(self.topics.subscriptions, offset, key,
                                                   value, source)
                else:
                    processor.process_usage(self.topics.usage, offset, key, value,
                                            timestamp_ms, kind == frames.CHECKED, source)
            _COUNTED.inc(processor.counted_since_drain - counted_before)
            # A batch can take a second: /metrics, /healthz, /quota and the acks of
            # earlier batches are served between its frames.
            await asyncio.sleep(0)
        records: list[tuple[int, Send]] = []
        for p, processor in sorted(touched.items()):
            if self.processors.get(p) is not processor:
                del touched[p]  # revoked meanwhile
                continue
            records += ((p, r) for r in self._records(p, processor.drain()))
            metrics.DEDUP_IDS.labels(str(p)).set(processor.dedup.size)
        # Sending waits for the broker to take each request: it goes on in the background,
        # after the previous batch's sends, while the next batch is processed.
        self._sending = asyncio.ensure_future(self._send(records, self._sending))
        metrics.BATCH_RECORDS.observe(len(events))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        return [e for e in events if e.message.partition in touched], self._sending

    def _records(self, p: int, fx: Effects) -> list[Send]:
        """Every effect of one partition as a record to send, encoded now (the processor
        goes on changing its counters)."""
        t = self.topics
        sends: list[Send] = []
        for key, state in fx.changelog:
            sends.append((t.worker_state, key, None if state is None else dumps(state), None))
        batch_header = [(CONTENT_TYPE_HEADER, BATCH_CONTENT_TYPE.encode())]
        for tenant, arrays in fx.accepted.items():
            for value in join_arrays(arrays, ACCEPTED_RECORD_BYTES):
                sends.append((t.usage_accepted, tenant, value, batch_header))
        for c in fx.counters:
            sends.append((t.counters, counter_key(c.tenant_id, c.meter, c.period_start),
                          dumps(_counter_record(c, p)), None))
        for q in fx.quota_states:
            sends.append((t.quota_state, f"{q.tenant_id}/{q.meter}", dumps(q), None))
        for d in fx.dead_letters:
            sends.append((t.usage_dlq, d.key or "", dumps(d), d.headers()))
            metrics.DEAD_LETTERS.labels(d.reason).inc()
        for n in fx.notifications:
            sends.append((t.notifications, n.tenant_id, dumps(n), None))
        metrics.EVENTS.labels("duplicate").inc(fx.duplicates)
        metrics.EVENTS.labels("dead").inc(len(fx.dead_letters))
        return sends

    async def _send(self, records: list[tuple[int, Send]],
                    previous: Awaitable[Any] | None) -> list[asyncio.Future[Any]]:
        """Send a batch's records once the previous batch's are sent (so every topic
        partition gets them in order); return the delivery futures."""
        if previous is not None:
            await previous
        if self.producer is None:
            self.producer = kafka.producer(self.settings, linger_ms=2)
            await self.producer.start()
        send = self.producer.send
        return [await send(topic, value, key.encode(), partition=p, headers=headers)
                for p, (topic, key, value, headers) in records]

    async def close(self) -> None:
        """Stop the effects producer (a restarted agent starts a new one)."""
        sending, self._sending = self._sending, None
        if sending is not None and not sending.done():  # failing: nothing will be acked
            sending.cancel()
        producer, self.producer = self.producer, None
        if producer is not None:
            await producer.stop()

    async def _restore(self, partitions: set[int]) -> None:
        """Give each partition a processor restored from its changelog, all in one read.

        The changelog is read to its true end: Tansu under-reports end offsets, so the
        read stops after consecutive empty fetches instead (DESIGN.md).
        """
        if not partitions:
            return
        started = time.perf_counter()
        catalog = self.catalog_follower.catalog
        assert catalog is not None
        restoring = {p: PartitionProcessor(p, catalog, self.config) for p in partitions}
        tps = [TopicPartition(self.topics.worker_state, p) for p in sorted(partitions)]
        consumer = kafka.consumer(self.settings)
        count = 0
        try:
            await consumer.start()
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            empty_fetches = 0
            while empty_fetches < 2:
                batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = (
                    await consumer.getmany(*tps, timeout_ms=200)
                )
                empty_fetches = 0 if batch else empty_fetches + 1
                for tp, records in batch.items():
                    processor = restoring[tp.partition]
                    for r in records:
                        processor.restore(r.key.decode(), loads(r.value) if r.value else None)
                    count += len(records)
        except Exception as e:
            raise StateRecoveryError(f"cannot restore partitions {sorted(partitions)}: {e}") from e
        finally:
            await consumer.stop()
        for processor in restoring.values():
            processor.finish_restore()
        self.processors.update(restoring)
        metrics.RECOVERY_SECONDS.observe(time.perf_counter() - started)
        log.info("restored partitions %s from %d changelog records", sorted(partitions), count)


async def _ack_when_durable(stream: Any, events: list[Any],
                            sending: Awaitable[list[asyncio.Future[Any]]],
                            previous: asyncio.Future[None] | None) -> None:
    """Ack a batch's events once its effects are stored and the batch before it is acked
    (acks in log order keep the committed offsets behind every durable effect)."""
    if previous is not None:
        await previous
    await asyncio.gather(*await sending)
    for event in events:
        await stream.ack(event)


# Broker trouble (the broker restarting, a leader moving, a request timing out, the
# pre-batching child dying of it): a restart in place after this backoff, which replays
# whatever was not acked. Anything else is a defect: the worker exits.
BROKER_TROUBLE = (KafkaError, OSError, TimeoutError, PreBatchExitedError, StateRecoveryError)
RESTART_DELAY_SECONDS = 2.0
# A held partition whose log goes on while the worker's position stays this long is
# stalled: far longer than a batch or a restore takes.
STALL_SECONDS = 60.0


async def _fail(app: faust.App, error: Exception) -> None:
    """Restart in place on broker trouble; otherwise crash the whole worker (exit code 1)
    rather than live on with a dead agent.

    Nothing was acknowledged for the failed batch, so the worker started again (in place,
    or by the supervisor) processes it again.
    """
    if isinstance(error, BROKER_TROUBLE) and not app.should_stop:  # not when stopping
        log.error("worker: broker trouble, restarting in place: %r", error)
        restart_in_place("broker_error", RESTART_DELAY_SECONDS)
    log.critical("worker failed, exiting: %r", error, exc_info=error)
    await app.crash(error)
    raise error


async def _log_lost(reason: str, why: str) -> None:
    """Policy for a log the broker lost, or a partition stalled (streams/log_watch.py):
    count it, say it once and start again in place. The new image holds no state,
    restores from the changelog what the broker has now (nothing, after an empty restart)
    and reads the logs from the group offsets the broker has (none: from their start)."""
    if reason == "log_lost":
        metrics.OFFSETS_OUTSIDE_LOG.inc()
        log.error("worker: the broker lost a log this worker had read (%s); dropping every"
                  " state and position and starting again from what the broker holds now", why)
    else:
        log.error("worker: stalled (%s); starting again from what the broker holds", why)
    restart_in_place(reason, 0)


def _refuse_quota(tokens: Tokens, authorization: str | None, tenant: str
                  ) -> tuple[int, dict[str, Any], dict[str, str]] | None:
    """The answer refusing a quota request (status, body, headers); None when allowed:
    401 without a known bearer token, 403 when it lacks the `quota` scope or the tenant."""
    credential = tokens.authenticate(authorization)
    if credential is None:
        return (401, {"error": "missing or unknown bearer token"},
                {"WWW-Authenticate": 'Bearer realm="tally"'})
    denials = authorize(credential, tenant, "quota")
    if denials:
        return 403, {"error": "forbidden", "problems": [d.to_json() for d in denials]}, {}
    return None


def _unknown_quota_subject(worker: Worker, view: QuotaView, tenant: str, meter: str
                           ) -> str | None:
    """Why /quota cannot answer for this tenant and meter (404), or None.

    A meter is known when the plan catalog in force defines it. A tenant is known when the
    pipeline has heard of it: a quota state of any meter (it has used something), or a
    subscription held by this worker's partitions. Limit: with several workers, a tenant
    that has a subscription but has never used anything is known only to the worker that
    owns it (`owner_partition`); the others answer 404 until its first usage is counted.
    Until the catalog and the quota states are loaded nothing is judged unknown (the
    answer is then the view's "not caught up", 503).
    """
    catalog = worker.catalog_follower.catalog
    if catalog is not None and meter not in catalog.meters:
        return (f"unknown meter {meter!r}: the plan catalog defines "
                f"{', '.join(sorted(catalog.meters))}")
    if not view.ready or view.knows_tenant(tenant):
        return None
    if any(tenant in p.subscriptions for p in worker.processors.values()):
        return None
    return f"unknown tenant {tenant!r}: no usage or subscription of it has been counted"


def _counter_record(c: Any, p: int) -> dict[str, Any]:
    return {
        "tenant_id": c.tenant_id, "meter": c.meter,
        "period_start": c.period_start.isoformat(), "period_end": c.period_end.isoformat(),
        "aggregation": c.aggregation, "value": str(c.value), "event_count": c.event_count,
        "partition": p, "applied_offset": c.applied_offset,
    }


def _broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """The settings' TLS and SASL in Faust's terms (its clients take no aiokafka options)."""
    context = kafka.ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL_"):
        return faust.SASLCredentials(username=settings.kafka_sasl_username,
                                     password=settings.kafka_sasl_password,
                                     ssl_context=context,
                                     mechanism=settings.kafka_sasl_mechanism)
    return faust.SSLCredentials(context) if context is not None else None


def create_app(settings: Settings, web_port: int = 6066,
               config: ProcessorConfig | None = None) -> faust.App:
    """The Faust app of `tally worker`.

    Its web server listens on the setting `worker_web_host` (loopback unless set) and
    serves only /healthz, /metrics and /quota, the last to bearer tokens with the `quota`
    scope for the tenant asked about (the tokens file of the setting `tokens_file`;
    without one, /quota answers no one). Faust's own pages (/router, /table, statistics)
    are off: they would answer anyone.
    """
    count_carried_restarts()
    tokens = load_tokens(settings.tokens_file)
    if not len(tokens):
        log.warning("no tokens (TALLY_TOKENS_FILE): GET /quota refuses every request")
    # Faust makes a directory for table files even with the memory store: under the state
    # directory, not in whatever directory the worker was started from.
    datadir = state_dir() / "faust" / settings.worker_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = App(
        settings.worker_id,
        broker=f"kafka://{settings.require_kafka()}",
        broker_credentials=_broker_credentials(settings),
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
        # Faust listens on web_bind (its default 0.0.0.0); web_host is only the name it
        # gives itself in URLs. Both are the setting `worker_web_host` (loopback unless set).
        web_bind=settings.worker_web_host,
        web_host=settings.worker_web_host,
        web_in_thread=False,
        web_router_enabled=False,
        web_tables_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_metrics_enabled=False,
        store="memory://",
        datadir=str(datadir),
    )
    worker = Worker(app, settings, config or ProcessorConfig(max_future=settings.max_future))
    app.tally_worker = worker  # type: ignore[attr-defined]
    # Usage arrives through the pre-batching stage (streams/prebatch.py): one Faust event
    # per frame of many records, so Faust's per-record cost does not bound throughput.
    # Subscriptions come the same way, to the partition owning their tenant: the agent
    # reads one topic.
    source = app.topic(settings.topics.usage_batched)

    @app.agent(source)
    async def process(stream: Any) -> None:
        in_flight: deque[asyncio.Future[None]] = deque()
        try:
            async for taken in stream.noack_take(MAX_BATCH_FRAMES, BATCH_WITHIN_SECONDS):
                events, sending = await worker.handle(list(taken))
                previous = in_flight[-1] if in_flight else None
                in_flight.append(asyncio.ensure_future(
                    _ack_when_durable(stream, events, sending, previous)))
                while len(in_flight) > MAX_BATCHES_IN_FLIGHT or (in_flight and in_flight[0].done()):
                    await in_flight.popleft()
            while in_flight:  # stopping: let the last batches become durable and acked
                await in_flight.popleft()
        except Exception as e:
            await _fail(app, e)
        finally:
            await worker.close()

    @app.task  # type: ignore[untyped-decorator]
    async def prebatch_stage() -> None:
        try:
            await prebatch.run_child(settings)  # in a child process: another core
        except Exception as e:
            await _fail(app, e)

    @app.task  # type: ignore[untyped-decorator]
    async def follow_catalog() -> None:
        try:
            await worker.catalog_follower.run()
        except Exception as e:
            await _fail(app, e)

    @app.task  # type: ignore[untyped-decorator]
    async def watch_logs() -> None:
        t = settings.topics
        watch = LogWatch(settings, [t.usage, t.subscriptions, t.usage_batched, t.worker_state],
                         settings.worker_log_check_seconds, _log_lost, t.usage_batched,
                         worker.progress, STALL_SECONDS)
        try:
            await watch.run()
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
        refused = _refuse_quota(tokens, request.headers.get("Authorization"), tenant)
        if refused is not None:
            status, refusal, headers = refused
            return web.bytes(dumps(refusal), content_type="application/json", status=status,
                             headers=headers)
        try:
            quantity = parse_quota_query(tenant, meter, request.query.items())
        except ValueError as e:
            return web.bytes(dumps({"error": str(e)}), content_type="application/json",
                             status=400)
        unknown = _unknown_quota_subject(worker, quota_view, tenant, meter)
        if unknown is not None:
            return web.bytes(dumps({"error": unknown}), content_type="application/json",
                             status=404)
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
    tune_gc()
    worker = FaustWorker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
