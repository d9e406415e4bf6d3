"""The hostile corpus through the real pipeline (worker and projector on the real broker
and Postgres): nothing crashes a stage and nothing disappears. For every record published,
ledger rows + dead letters + counted duplicates = published (issue 17)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from runtime import kafka
from runtime.settings import Settings
from schemas.codec import loads
from tests.conftest import WorkerProcess
from tests.helpers import record, usage
from tests.hostile import load_corpus, units
from tests.kafka_helpers import publish_seed_catalog, read_records, wait_for
from tests.projections.support import query
from tests.services import ProjectorThread

pytestmark = pytest.mark.e2e


async def _publish(settings: Settings, records: list[tuple[bytes | None, bytes | None,
                                                           int | None]]) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        sent = [await producer.send(settings.topics.usage, value, key, timestamp_ms=stamp)
                for key, value, stamp in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def test_every_hostile_record_is_counted_dead_lettered_or_a_duplicate(
    settings_factory: Callable[..., Settings],
    worker_factory: Callable[[Settings], WorkerProcess],
    database_url: str,
) -> None:
    settings = settings_factory(database_url=database_url)
    publish_seed_catalog(settings)
    worker = worker_factory(settings)
    projector = ProjectorThread(settings)

    corpus = load_corpus()
    # Plain traffic around it: the hostile records must not disturb it either.
    plain = [(b"plain", record(*[usage("plain", event_id=f"p-{r}-{i}") for i in range(50)]),
              None) for r in range(4)]
    published = plain + [(r.key, r.value, r.timestamp_ms) for r in corpus]
    asyncio.run(_publish(settings, published))
    total = sum(units(key, value, stamp) for key, value, stamp in published)
    expected_ledger = 200 + sum(r.counted for r in corpus)

    def accounted() -> tuple[int, int, int]:
        ledger = int(query(database_url, "SELECT count(*) FROM tally.usage_events")[0][0])
        positions = {(v["source_topic"], v["source_partition"], v["source_offset"], v["index"])
                     for v in (loads(r.value) for r in
                               read_records(settings, settings.topics.usage_dlq))}
        duplicates = int(worker.metric('tally_worker_events_total{outcome="duplicate"}'))
        return ledger, len(positions), duplicates

    ledger, dead, duplicates = wait_for(
        accounted, lambda got: sum(got) >= total and got[0] >= expected_ledger, timeout=90,
        what=f"{total} published units accounted for")
    projector.stop()
    assert worker.stop() == 0  # it never crashed: a crash-looping worker exits non-zero
    lost = total - ledger - dead - duplicates
    assert (ledger, lost) == (expected_ledger, 0), (ledger, dead, duplicates)
