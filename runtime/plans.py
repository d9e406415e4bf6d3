"""The plan catalog on Kafka: publish it to the compacted `tally.plans` topic, read it back,
and follow it (the current catalog kept in memory).

Records: key = plan id, value = the plan; key `_meters`, value = {default_plan, meters}.
A catalog is assembled once both kinds are present and validates as a whole; an invalid
update is logged and the previous catalog stays in force.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import TopicPartition

from runtime import kafka
from runtime.settings import Settings
from schemas.codec import dumps, loads
from schemas.errors import CatalogError
from schemas.plans import Catalog, load_catalog, parse_catalog

log = logging.getLogger(__name__)

METERS_KEY = "_meters"


def catalog_records(catalog: Catalog) -> list[tuple[str, bytes]]:
    """The (key, value) records that publish a catalog to `tally.plans`."""
    doc = catalog.model_dump(mode="json")
    records = [(METERS_KEY, dumps({"default_plan": doc["default_plan"], "meters": doc["meters"]}))]
    records += [(plan_id, dumps(plan)) for plan_id, plan in doc["plans"].items()]
    return records


def assemble(records: dict[str, Any]) -> Catalog | None:
    """A catalog from the latest value of every key, or None if incomplete."""
    meters = records.get(METERS_KEY)
    plans = {k: v for k, v in records.items() if k != METERS_KEY and v is not None}
    if meters is None or not plans:
        return None
    return parse_catalog({**meters, "plans": plans})


class CatalogFollower:
    """Reads every partition of the plans topic from the start and keeps following it."""

    def __init__(self, settings: Settings, on_change: Callable[[Catalog], None]) -> None:
        self.settings = settings
        self.on_change = on_change
        self.catalog: Catalog | None = None
        self.ready = asyncio.Event()
        self._records: dict[str, Any] = {}

    async def run(self) -> None:
        topic = self.settings.topics.plans
        consumer = kafka.consumer(self.settings)
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(topic) or {0}
            consumer.assign([TopicPartition(topic, p) for p in partitions])
            await consumer.seek_to_beginning()
            waited = 0.0
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                changed = False
                for records in batches.values():
                    for r in records:
                        key = r.key.decode() if r.key else ""
                        self._records[key] = loads(r.value) if r.value else None
                        changed = True
                if changed:
                    self._assemble()
                elif self.catalog is None:
                    waited += 0.5
                    if waited % 10 == 0:
                        log.warning("no plan catalog on %s yet: run `tally plans publish`", topic)
        finally:
            await consumer.stop()

    def _assemble(self) -> None:
        try:
            catalog = assemble(self._records)
        except CatalogError as e:
            log.error("ignoring invalid plan catalog update: %s", e)
            return
        if catalog is None or catalog == self.catalog:
            return
        self.catalog = catalog
        self.on_change(catalog)
        self.ready.set()


async def read_catalog(settings: Settings) -> Catalog | None:
    """The catalog as currently published (None if there is none), for one-shot jobs."""
    records: dict[str, Any] = {}
    for r in await kafka.read_topic(settings, settings.topics.plans):
        records[r.key.decode() if r.key else ""] = loads(r.value) if r.value else None
    return assemble(records)


async def publish_catalog(settings: Settings, catalog: Catalog) -> int:
    """Write every record of the catalog; return how many were written."""
    await kafka.ensure_topics(settings)
    producer = kafka.producer(settings)
    await producer.start()
    try:
        records = catalog_records(catalog)
        futures = [
            await producer.send(settings.topics.plans, key=key.encode(), value=value)
            for key, value in records
        ]
        for f in futures:
            await f
        return len(records)
    finally:
        await producer.stop()


async def publish_file(settings: Settings, path: Path) -> int:
    return await publish_catalog(settings, load_catalog(path))


async def restore_catalog(settings: Settings) -> int:
    """Publish the catalog's Postgres copy (tally.plans + tally.catalog_settings, written
    by the projector) when the broker has no catalog: a broker that lost its topics leaves
    the worker waiting for one forever. Returns the records published (0: the broker had a
    catalog, there is no database, or Postgres holds no complete catalog either)."""
    if settings.database_url is None or await read_catalog(settings) is not None:
        return 0
    from runtime.postgres import DatabaseUnavailable, connect

    try:
        with connect(settings.database_url) as conn:
            records: dict[str, Any] = {
                plan_id: document for plan_id, document in conn.execute(
                    "SELECT plan_id, document FROM tally.plans")}
            for key, document in conn.execute(
                    "SELECT key, document FROM tally.catalog_settings WHERE key = %s",
                    (METERS_KEY,)):
                records[key] = document
    except psycopg.errors.UndefinedTable:
        return 0  # not migrated yet: nothing was ever projected
    except (DatabaseUnavailable, psycopg.Error) as e:
        log.warning("no plan catalog on %s and its Postgres copy is out of reach: %s",
                    settings.topics.plans, e)
        return 0
    try:
        catalog = assemble(records)
    except CatalogError as e:
        log.error("the plan catalog in Postgres is invalid, not restored: %s", e)
        return 0
    if catalog is None:
        log.warning("no plan catalog on %s nor in Postgres: run `tally plans publish`",
                    settings.topics.plans)
        return 0
    written = await publish_catalog(settings, catalog)
    log.warning("the broker had no plan catalog on %s: restored %d plans from Postgres",
                settings.topics.plans, len(catalog.plans))
    return written
