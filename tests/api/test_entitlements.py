"""Entitlements: check records nothing; consume checks and records as one step, idempotent
by id, and concurrent consumers never pass a hard limit, in one API process or several."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

from devtools.metrics import sample_sum
from domain.periods import Period, add_months, anniversary_period, calendar_month
from runtime import kafka
from runtime.postgres import migrate
from runtime.settings import Settings
from schemas.codec import decode_record
from tests.api.conftest import TOKENS, ApiServer
from tests.kafka_helpers import publish_seed_catalog

HARD_LIMIT = 1000  # api_calls on the seed catalog's free plan, the default plan


def reserved(settings: Settings) -> int:
    assert settings.database_url is not None
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM tally.entitlement_reservations").fetchone()
    assert row is not None
    return int(row[0])


def published_ids(settings: Settings) -> list[str]:
    records = asyncio.run(kafka.read_topic(settings, settings.topics.usage))
    return [event["id"] for r in records for event in decode_record(r.value)]


async def race(urls: list[str], consumers: int) -> tuple[int, int, list[int]]:
    """`consumers` tasks, spread over the API processes at `urls`, each consuming one
    api_call at a time until refused: (allowed, refused, other statuses)."""
    allowed = refused = 0
    others: list[int] = []
    headers = {"Authorization": "Bearer tok-acme"}

    async def consumer(n: int, client: httpx.AsyncClient) -> None:
        nonlocal allowed, refused
        i = 0
        while True:
            i += 1
            answer = await client.post("/v1/entitlements/consume", headers=headers, json={
                "tenant": "acme", "meter": "api_calls", "id": f"c{n}-{i}"})
            if answer.status_code == 200:
                allowed += 1
            elif answer.status_code == 402:
                refused += 1
                body = answer.json()
                assert body["allowed"] is False and body["limit"] == str(HARD_LIMIT)
                return
            else:
                others.append(answer.status_code)
                return

    clients = [httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=consumers))
               for url in urls]
    try:
        await asyncio.gather(*(consumer(n, clients[n % len(clients)])
                               for n in range(consumers)))
    finally:
        for client in clients:
            await client.aclose()
    return allowed, refused, others


def test_64_concurrent_consumers_racing_for_a_hard_limit_of_1000_record_exactly_1000(
        api_settings: Settings, api_factory: Callable[[Settings], ApiServer]) -> None:
    # Two API processes on one database: the advisory lock, not only the in-process lock,
    # must keep them to one decision at a time.
    servers = [api_factory(api_settings), api_factory(api_settings)]
    allowed, refused, others = asyncio.run(race([s.url for s in servers], 64))
    assert others == []
    assert (allowed, refused) == (HARD_LIMIT, 64)
    assert reserved(api_settings) == HARD_LIMIT
    ids = published_ids(api_settings)
    assert len(set(ids)) == HARD_LIMIT  # every allowed use was published, once per id


def test_consume_is_idempotent_by_id_and_check_records_nothing(api: ApiServer) -> None:
    client = httpx.Client(base_url=api.url, timeout=10, headers=api.headers("tok-acme"))
    use = {"tenant": "acme", "meter": "api_calls", "quantity": "400", "id": "order-1"}
    first = client.post("/v1/entitlements/consume", json=use)
    assert first.status_code == 200 and first.json()["duplicate"] is False
    again = client.post("/v1/entitlements/consume", json=use)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["used"] == "400"  # counted once
    check = client.post("/v1/entitlements/check",
                        json={"tenant": "acme", "meter": "api_calls", "quantity": "601"})
    assert check.status_code == 200
    assert (check.json()["allowed"], check.json()["used"]) == (False, "400")
    over = client.post("/v1/entitlements/consume", json={**use, "id": "order-2",
                                                          "quantity": "601"})
    assert over.status_code == 402
    assert over.json() | {"period_start": None, "period_end": None} == {
        "tenant": "acme", "meter": "api_calls", "quantity": "601", "allowed": False,
        "reason": "hard limit 1000 reached (400 used, 1001 with this use)", "used": "400",
        "limit": "1000",
        "remaining": "600", "plan_id": "free", "period_start": None, "period_end": None,
        "id": "order-2", "duplicate": False}
    assert reserved(api.settings) == 1


def test_consume_reads_usage_in_the_subscription_period_not_the_calendar_month(
        api: ApiServer) -> None:
    # A consume first reads the usage of the calendar month (or of the key's last period),
    # then the plan reads: for a subscribed tenant the period is the subscription's
    # anniversary period, and the usage must be read again for it. A reservation of 1000
    # (the free plan's hard limit) lies in one of the two periods and not the other.
    now = datetime.now(UTC)
    month = calendar_month(now)
    anchor_start = month.start - timedelta(days=1)
    anchor = Period(anchor_start, add_months(anchor_start, 1))
    period = anniversary_period(anchor, now)
    assert period != month
    inside_period_only = period.start < month.start
    reserved_at = (period.start if inside_period_only else month.start) + timedelta(seconds=1)
    with psycopg.connect(database_url_of(api), autocommit=True) as conn:
        conn.execute("INSERT INTO tally.subscriptions VALUES ('acme', 'free', 'active', %s, %s,"
                     " NULL, NULL, now())", (anchor.start, anchor.end))
        conn.execute("INSERT INTO tally.entitlement_reservations (tenant_id, event_id, meter,"
                     " event_time, quantity) VALUES ('acme', 'earlier', 'api_calls', %s, 1000)",
                     (reserved_at,))
    client = httpx.Client(base_url=api.url, timeout=10, headers=api.headers("tok-acme"))
    for i in range(2):  # the second consume starts from the period the first one found
        answer = client.post("/v1/entitlements/consume", json={
            "tenant": "acme", "meter": "api_calls", "id": f"now-{i}"})
        body = answer.json()
        assert body["period_start"] == period.start.isoformat().replace("+00:00", "Z")
        if inside_period_only:  # the limit is reached in the subscription's period
            assert (answer.status_code, body["used"]) == (402, "1000")
        else:  # the reservation is in the calendar month only: nothing used in the period
            assert (answer.status_code, body["used"]) == (200, str(i))


def test_consume_before_the_database_is_migrated_answers_503_then_works_once_it_is(
        settings_factory: Callable[..., Settings], database_url: str, tmp_path: Path,
        api_factory: Callable[[Settings], ApiServer]) -> None:
    # A consume prepares its statements in the session of its pooled connection first:
    # on a database without the tables, some are prepared and the rest fail. That
    # connection must not be used again as if none were (PREPARE would then find its
    # first statement already there).
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    settings = settings_factory(database_url=database_url, tokens_file=tokens)
    publish_seed_catalog(settings)
    api = api_factory(settings)
    client = httpx.Client(base_url=api.url, timeout=10, headers=api.headers("tok-acme"))
    use = {"tenant": "acme", "meter": "api_calls", "id": "early"}
    before = client.post("/v1/entitlements/consume", json=use)
    assert before.status_code == 503 and "migrate" in before.json()["error"]
    migrate(database_url)
    after = client.post("/v1/entitlements/consume", json=use)
    assert (after.status_code, after.json()["used"]) == (200, "0")


def database_url_of(api: ApiServer) -> str:
    assert api.settings.database_url is not None
    return api.settings.database_url


def batched_uses(api: ApiServer) -> tuple[float, float]:
    """(uses, batches) decided so far, from the API's /metrics."""
    text = httpx.get(f"{api.url}/metrics", timeout=10).text
    return (sample_sum(text, "tally_api_consume_batch_uses_sum"),
            sample_sum(text, "tally_api_consume_batch_uses_count"))


def test_consumes_of_many_tenants_decided_together_each_stop_exactly_at_the_limit(
        api: ApiServer) -> None:
    # 8 tenants x 8 consumers at once: the uses of different tenants share batches (one
    # transaction, every key's lock), and still each tenant records exactly its limit.
    tenants = [f"batch-{n}" for n in range(8)]
    statuses: dict[str, list[int]] = {t: [] for t in tenants}

    async def consumer(tenant: str, n: int, client: httpx.AsyncClient) -> None:
        for i in range(HARD_LIMIT):
            answer = await client.post("/v1/entitlements/consume", json={
                "tenant": tenant, "meter": "api_calls", "quantity": "25",
                "id": f"{tenant}-{n}-{i}"})
            statuses[tenant].append(answer.status_code)
            if answer.status_code != 200:
                return

    async def race_all() -> None:
        async with httpx.AsyncClient(base_url=api.url, timeout=60,
                                     headers=api.headers("tok-usage-only"),
                                     limits=httpx.Limits(max_connections=64)) as client:
            await asyncio.gather(*(consumer(t, n, client) for t in tenants for n in range(8)))

    asyncio.run(race_all())
    for tenant in tenants:  # 40 uses of 25 reach 1,000; each consumer's next one is refused
        assert sorted(statuses[tenant]) == [200] * 40 + [402] * 8, tenant
    with psycopg.connect(database_url_of(api)) as conn:
        rows = conn.execute("SELECT tenant_id, sum(quantity) FROM tally.entitlement_reservations"
                            " WHERE tenant_id LIKE 'batch-%' GROUP BY tenant_id").fetchall()
    assert {t: int(q) for t, q in rows} == dict.fromkeys(tenants, HARD_LIMIT)
    uses, batches = batched_uses(api)
    assert uses == 8 * 48 and batches < uses  # some uses were decided together


def test_one_id_consumed_on_two_meters_at_once_is_one_use(api: ApiServer) -> None:
    # The two uses of an id must not share a batch: neither would see the other's
    # reservation, and the second insert of the id would fail the whole batch.
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=api.url, timeout=60,
                                     headers=api.headers("tok-acme"),
                                     limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(
                client.post("/v1/entitlements/consume", json={
                    "tenant": "acme", "meter": meter, "id": f"same-{i}"})
                for i in range(16) for meter in ("api_calls", "executions")))

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200] * 32
    # each id: one use recorded, the other answered as its duplicate
    assert sorted(a.json()["duplicate"] for a in answers) == [False] * 16 + [True] * 16
    assert reserved(api.settings) == 16
