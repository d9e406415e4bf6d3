"""`tally plans publish FILE`: validate a catalog file and write it to `tally.plans`."""

from __future__ import annotations

from pathlib import Path

from schemas.plans import Catalog, load_catalog
from streams.catalog_follower import catalog_records
from tally import kafka
from tally.settings import Settings


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
