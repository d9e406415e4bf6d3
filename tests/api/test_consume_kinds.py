"""Consume for every meter kind: what passes a hard limit is the value the use would leave,
as the meter's kind defines it (domain/meters.py `after_use`, with the reserved uses folded
by `pending_sql`), and concurrent consumers never pass it for a non-additive kind either."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from domain.periods import calendar_month
from runtime.plans import publish_catalog
from runtime.postgres import migrate
from runtime.settings import Settings
from schemas.plans import Catalog, default_catalog_path, load_catalog
from tests.api.conftest import TOKENS, ApiServer

EXTRA_METERS: dict[str, dict[str, Any]] = {
    "runs": ({"aggregation": "count"}, 3),
    "peak_mb": ({"aggregation": "max"}, 100),
    "seats": ({"aggregation": "latest"}, 10),
    "active_users": ({"aggregation": "unique_count", "unique_dimension": "user"}, 2),
    "raced_users": ({"aggregation": "unique_count", "unique_dimension": "user"}, 50),
}


def kinds_catalog() -> Catalog:
    """The seed catalog, with a meter of each kind, hard-limited on the default plan."""
    doc = load_catalog(default_catalog_path()).model_dump(mode="json")
    default = doc["default_plan"]
    for meter, (spec, limit) in EXTRA_METERS.items():
        doc["meters"][meter] = spec
        doc["plans"][default]["meters"][meter] = {"included": limit, "hard_limit": limit}
    return Catalog.model_validate(doc)


@pytest.fixture
def kinds_api(settings_factory: Callable[..., Settings], database_url: str, tmp_path: Path,
              api_factory: Callable[[Settings], ApiServer]) -> ApiServer:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    settings = settings_factory(database_url=database_url, tokens_file=tokens)
    migrate(database_url)
    asyncio.run(publish_catalog(settings, kinds_catalog()))
    return api_factory(settings)


def consume(client: httpx.Client, meter: str, quantity: str, event_id: str,
            tenant: str = "acme", **dimensions: str) -> tuple[int, dict[str, Any]]:
    answer = client.post("/v1/entitlements/consume", json={
        "tenant": tenant, "meter": meter, "quantity": quantity, "id": event_id,
        "dimensions": dimensions})
    return answer.status_code, answer.json()


def test_each_kind_passes_its_limit_by_the_value_a_use_would_leave(kinds_api: ApiServer
                                                                   ) -> None:
    client = httpx.Client(base_url=kinds_api.url, timeout=10,
                          headers=kinds_api.headers("tok-acme"))
    # count: a use is one event, whatever its quantity (limit 3).
    assert [consume(client, "runs", "10", f"r{i}")[0] for i in range(4)] == [
        200, 200, 200, 402]
    # max: a new peak above the limit is refused, a lower reading is not (limit 100).
    assert consume(client, "peak_mb", "50", "p1")[0] == 200
    assert consume(client, "peak_mb", "100", "p2")[0] == 200
    status, body = consume(client, "peak_mb", "101", "p3")
    assert (status, body["used"]) == (402, "100")
    assert consume(client, "peak_mb", "80", "p4")[0] == 200
    # latest: the reading replaces the value; only a reading above the limit is refused.
    assert consume(client, "seats", "8", "s1")[0] == 200
    assert consume(client, "seats", "11", "s2")[0] == 402
    status, body = consume(client, "seats", "3", "s3")
    assert (status, body["used"], body["remaining"]) == (200, "8", "7")
    assert consume(client, "seats", "10", "s4")[1]["used"] == "3"
    # unique_count: a new value adds one, a value seen before is free (limit 2).
    assert consume(client, "active_users", "1", "u1", user="ann")[0] == 200
    status, body = consume(client, "active_users", "1", "u2", user="ann")
    assert (status, body["used"]) == (200, "1")
    assert consume(client, "active_users", "1", "u3", user="bob")[0] == 200
    status, body = consume(client, "active_users", "1", "u4", user="cid")
    assert (status, body["used"]) == (402, "2")
    assert consume(client, "active_users", "1", "u5", user="bob")[0] == 200
    status, body = consume(client, "active_users", "1", "u6")
    assert status == 422 and "'user'" in body["error"]


def test_unique_values_already_in_the_ledger_are_free(kinds_api: ApiServer) -> None:
    # The ledger (as the projector writes it) counted "zoe" this period: zoe is free,
    # one more value reaches the limit of 2, a third is refused.
    period = calendar_month(datetime.now(UTC))
    url = kinds_api.settings.database_url
    assert url is not None
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO tally.usage_by_period (tenant_id, meter, period_start, period_end,"
            " plan_id, quantity, event_count, aggregation) VALUES"
            " ('acme', 'active_users', %s, %s, 'free', 1, 1, 'unique_count')",
            (period.start, period.end))
        conn.execute("INSERT INTO tally.usage_period_uniques VALUES"
                     " ('acme', 'active_users', %s, 'zoe')", (period.start,))
    client = httpx.Client(base_url=kinds_api.url, timeout=10,
                          headers=kinds_api.headers("tok-acme"))
    status, body = consume(client, "active_users", "1", "z1", user="zoe")
    assert (status, body["used"], body["remaining"]) == (200, "1", "1")
    assert consume(client, "active_users", "1", "y1", user="yan")[0] == 200
    status, body = consume(client, "active_users", "1", "x1", user="xia")
    assert (status, body["used"]) == (402, "2")


async def race_unique(url: str, consumers: int) -> tuple[int, int, list[int]]:
    """Each consumer consumes new users of `raced_users` until refused; every tenth use
    repeats a user it was allowed (free): (new users allowed, refused, other statuses)."""
    allowed = refused = 0
    others: list[int] = []
    headers = {"Authorization": "Bearer tok-acme"}

    async def consumer(n: int, client: httpx.AsyncClient) -> None:
        nonlocal allowed, refused
        for i in range(1000):
            user = f"u{n}-0" if i % 10 == 9 and allowed else f"u{n}-{i}"
            answer = await client.post("/v1/entitlements/consume", headers=headers, json={
                "tenant": "acme", "meter": "raced_users", "id": f"c{n}-{i}",
                "dimensions": {"user": user}})
            if answer.status_code == 402:
                refused += 1
                return
            if answer.status_code != 200:
                others.append(answer.status_code)
                return
            allowed += answer.json()["used"] != "0" or i == 0

    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=consumers)) as client:
        await asyncio.gather(*(consumer(n, client) for n in range(consumers)))
    return allowed, refused, others


def test_concurrent_consumers_of_a_unique_count_meter_never_pass_its_limit(
        kinds_api: ApiServer) -> None:
    _, refused, others = asyncio.run(race_unique(kinds_api.url, 32))
    assert others == [] and refused == 32
    url = kinds_api.settings.database_url
    assert url is not None
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(DISTINCT unique_value) FROM"
                           " tally.entitlement_reservations WHERE meter = 'raced_users'"
                           ).fetchone()
    assert row is not None and row[0] == 50  # exactly the limit of distinct users
