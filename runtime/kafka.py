"""Kafka adapter: client factories with the settings every Tally client shares, and topics.

Guarantee 1 of DESIGN.md does not lean on Kafka transactions or idempotent producers (the
embedded broker has neither); producers here use acks=all and the effects downstream are
idempotent by key instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import weakref
from functools import lru_cache
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient, ConnectionGroup
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import murmur2
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.protocol.produce import ProduceRequest

from runtime.settings import Settings
from schemas import topics as topic_specs
from schemas.errors import TallyError


class KafkaUnavailable(TallyError):
    """The broker could not be reached or refused an admin request."""


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the settings' security protocol; None when it has no TLS."""
    if not settings.kafka_security_protocol.endswith("SSL"):
        return None
    context: ssl.SSLContext = create_ssl_context(cafile=settings.kafka_ssl_cafile,
                                                 certfile=settings.kafka_ssl_certfile,
                                                 keyfile=settings.kafka_ssl_keyfile)
    return context


def connection(settings: Settings) -> dict[str, Any]:
    """Where the brokers are and how to authenticate: the options every client shares."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.require_kafka(),
        "security_protocol": settings.kafka_security_protocol,
        "ssl_context": ssl_context(settings),
    }
    if settings.kafka_security_protocol.startswith("SASL_"):
        options.update(sasl_mechanism=settings.kafka_sasl_mechanism,
                       sasl_plain_username=settings.kafka_sasl_username,
                       sasl_plain_password=settings.kafka_sasl_password)
    return options


@lru_cache(maxsize=1 << 16)  # tenants repeat: a batch hashes each key once, not per record
def owner_partition(key: bytes, partitions: int) -> int:
    """The partition that owns a tenant's state in the worker (docs/architecture.md,
    "Partition ownership"): the Java and aiokafka default partitioner's choice for the key
    (murmur2 of the key bytes, sign bit cleared, modulo the partition count).

    Tally decides it, whatever partitioner a producer used: the pre-batching stage writes
    every record of a tenant to this partition of `tally.usage.batched`. For producers with
    that default partitioner (Tally's SDK) it is the partition the record came from.
    """
    hashed: int = murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions


def producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        **connection(settings),
        "acks": "all",
        "enable_idempotence": settings.kafka_idempotence,
        "linger_ms": 5,
        "max_batch_size": 1 << 20,
        "max_request_size": 4 << 20,
        "request_timeout_ms": 30000,
        "compression_type": (None if settings.kafka_compression == "none"
                             else settings.kafka_compression),
    }
    options.update(overrides)
    made = AIOKafkaProducer(**options)
    _WritesOnlyToListedTopics(made.client)
    return made


class TopicNotListedError(KafkaError):  # type: ignore[misc]
    """The broker behind this connection does not list a topic a write is for (yet).

    aiokafka retries it after `retry_backoff_ms`, without a metadata refresh, until the
    topic exists or the batch expires (the caller then sees a timeout: the SDK spools)."""

    retriable = True
    invalid_metadata = False


class _WritesOnlyToListedTopics:
    """A producer's writes go only to topics the broker lists, checked once per
    connection and topic (issue 17).

    A broker that comes back empty on the same address (Tansu keeps its log in memory) is
    reached again by every producer that was running, with the metadata it cached:
    aiokafka retries what was in flight. Tansu acknowledges such writes into a topic it
    has not created, and once the topic is created it gives their offsets out again, so
    records acknowledged just after the creation sit inside batches stored before it and
    are never read (docs/architecture.md, "Limits"). A broker lists only the topics it
    has created, so no write is sent on a connection before that connection's broker
    has listed its topic; a new broker is a new connection. Costs one metadata request
    per connection and topic.
    """

    def __init__(self, client: AIOKafkaClient) -> None:
        self.client = client
        self.send_unchecked = client.send
        self.listed: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        client.send = self.send

    async def send(self, node_id: Any, request: Any, *,
                   group: ConnectionGroup = ConnectionGroup.DEFAULT) -> Any:
        if isinstance(request, ProduceRequest):
            await self._check(node_id, group, {topic for topic, _ in request._topics})
        return await self.send_unchecked(node_id, request, group=group)

    async def _check(self, node_id: Any, group: ConnectionGroup, topics: set[str]) -> None:
        # Connected first, so the connection checked is the one the write then goes on.
        if not await self.client.ready(node_id, group=group):
            return  # the send below raises NodeNotReadyError, which aiokafka retries
        conn = self.client._conns[(node_id, group)]
        listed = self.listed.get(conn)
        if listed is not None and topics <= listed:
            return
        answer = await self.send_unchecked(node_id, MetadataRequest(None), group=group)
        cluster = ClusterMetadata()
        cluster.update_metadata(answer)
        now_listed = cluster.topics(exclude_internal_topics=False)
        if self.client._conns.get((node_id, group)) is conn:
            self.listed[conn] = set(now_listed)
        missing = topics - now_listed
        if missing:
            raise TopicNotListedError(
                f"the broker does not list {', '.join(sorted(missing))}: not created yet "
                "(a broker that lost its log: the topic job creates them)")


class _Consumer(AIOKafkaConsumer):  # type: ignore[misc]
    """aiokafka's consumer, safe to stop as soon as it has started.

    aiokafka 0.14.0: a consumer without a group starts a background task at the end of
    `start()`; `stop()` cancels it and awaits it, and a task cancelled before its first
    step raises `CancelledError` into the caller, which looks like the caller being
    cancelled. A check that found nothing to read (every topic gone after the broker
    restarted empty) stopped its consumer that soon, and the worker's log watch ended
    silently with it (tests/streams/test_log_loss.py). One step of the loop after
    `start()` lets the task begin, so `stop()` ends it normally."""

    async def start(self) -> None:
        await super().start()
        await asyncio.sleep(0)


def consumer(settings: Settings, *topic_names: str, **overrides: Any) -> AIOKafkaConsumer:
    options: dict[str, Any] = {
        **connection(settings),
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 8 << 20,
        # Tansu holds a fetch for its whole wait even when data is there (see
        # streams/faust_transport.py): keep it short, or latency is half the wait.
        "fetch_max_wait_ms": 50,
        "fetch_max_bytes": 32 << 20,
    }
    options.update(overrides)
    return _Consumer(*topic_names, **options)


async def ensure_topics(settings: Settings) -> list[str]:
    """Create every Tally topic that is missing, with its cleanup policy; return those created."""
    admin = AIOKafkaAdminClient(**connection(settings))
    try:
        await admin.start()
    except KafkaError as e:
        address = settings.kafka_bootstrap_servers
        raise KafkaUnavailable(
            f"cannot reach Kafka at {address}: start the dev stack with `tally dev up`, or "
            f"point KAFKA_BOOTSTRAP_SERVERS at a running broker ({e})") from e
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                name=spec.name(settings.topic_prefix),
                num_partitions=settings.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=spec.configs(),
            )
            for spec in topic_specs.ALL
            if spec.name(settings.topic_prefix) not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
            await _wait_for_metadata(admin, [t.name for t in wanted])
        return [t.name for t in wanted]
    finally:
        await admin.close()


async def read_topic(settings: Settings, topic: str, idle_ms: int = 500) -> list[Any]:
    """Every record of every partition of `topic`, oldest first per partition.

    The embedded broker's end offsets are not trusted (DESIGN.md): the read ends at the
    first fetch that comes back empty. A topic still being written is read until its
    writes pause.
    """
    c = consumer(settings)
    await start(c)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        records: list[Any] = []
        while batch := await c.getmany(timeout_ms=idle_ms):
            for part in batch.values():
                records.extend(part)
        return records
    finally:
        await stop(c)


async def start(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Start a client; on failure close it (no "Unclosed" warning) and let the error go."""
    try:
        await client.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.stop()
        raise


async def stop(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Stop a client. A consumer stopped right after it started (a topic found empty or
    missing) has aiokafka cancel its coordinator's first task, and that CancelledError
    escapes `stop()` although nobody cancelled the caller: swallow that one only."""
    try:
        await client.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def _wait_for_metadata(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    for _ in range(100):
        if set(names) <= set(await admin.list_topics()):
            return
        await asyncio.sleep(0.1)
    raise KafkaUnavailable(f"topics not visible after creation: {names}")
