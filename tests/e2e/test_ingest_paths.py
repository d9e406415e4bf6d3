"""Every way of publishing usage is counted the same: the producer SDK, the HTTP gateway,
and a plain Kafka client writing the documented wire format."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from producers import ProducerOptions, UsageProducer
from producers.gateway import create_gateway_app
from runtime.credentials import Tokens
from runtime.settings import Settings
from schemas import codec
from tests.conftest import WorkerProcess
from tests.helpers import record, usage
from tests.kafka_helpers import publish, read_compacted, wait_for

pytestmark = pytest.mark.e2e
NOW = datetime.now(UTC)
QUANTITIES = [str(i % 9 + 1) for i in range(300)]
EXPECTED = sum((Decimal(q) for q in QUANTITIES), Decimal(0))


def events(tenant: str) -> list[dict[str, Any]]:
    return [usage(tenant, quantity=q, event_id=f"{tenant}-{i}", time=NOW,
                  source="svc/api-gateway") for i, q in enumerate(QUANTITIES)]


async def through_sdk(settings: Settings, tenant: str) -> None:
    async with UsageProducer(settings, ProducerOptions(source="svc/api-gateway")) as p:
        for e in events(tenant) + events(tenant)[:50]:  # a retry: same ids again
            await p.record(tenant, "api_calls", e["data"]["quantity"], event_id=e["id"],
                           time=NOW)


async def through_gateway(settings: Settings, tenant: str) -> None:
    producer = UsageProducer(settings, ProducerOptions(linger_ms=5))
    await producer.start()
    tokens = Tokens.parse({"tok": {"service": "svc/api-gateway", "tenants": [tenant],
                                   "scopes": ["usage"]}})
    app = create_gateway_app(producer, tokens)
    headers = {"Authorization": "Bearer tok", "Content-Type": codec.BATCH_CONTENT_TYPE}
    try:
        async with TestClient(TestServer(app)) as client:
            batch = events(tenant)
            for i in range(0, len(batch), 100):
                response = await client.post("/v1/events", data=orjson.dumps(batch[i:i + 100]),
                                             headers=headers)
                assert response.status == 202, await response.text()
    finally:
        await producer.close()


def test_sdk_gateway_and_plain_kafka_are_counted_the_same_way(
    catalog_worker: tuple[Settings, WorkerProcess],
) -> None:
    settings, _ = catalog_worker
    asyncio.run(through_sdk(settings, "via-sdk"))
    asyncio.run(through_gateway(settings, "via-gateway"))
    plain = events("via-kafka")
    publish(settings, settings.topics.usage,
            [("via-kafka", record(*plain[i:i + 60])) for i in range(0, len(plain), 60)]
            + [("via-kafka", record(e)) for e in plain[:20]])  # redeliveries

    def totals() -> dict[str, Decimal]:
        return {v["tenant_id"]: Decimal(v["value"])
                for v in read_compacted(settings, settings.topics.counters).values()}

    got = wait_for(totals, lambda t: len(t) == 3 and all(v == EXPECTED for v in t.values()),
                   what="equal totals for every path")
    assert got == {"via-sdk": EXPECTED, "via-gateway": EXPECTED, "via-kafka": EXPECTED}
