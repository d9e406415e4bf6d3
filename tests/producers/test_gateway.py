"""The HTTP ingest gateway: what it accepts and publishes, and every way it refuses."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from producers import ProducerOptions, UsageProducer
from producers import metrics as gateway_metrics
from producers.gateway import MAX_REPORTED_EVENTS, create_gateway_app, serve
from runtime.credentials import Tokens
from runtime.settings import Settings
from schemas import codec
from schemas.events import SubscriptionEvent, UsageEvent
from tally.cli import main
from tests.helpers import subscription, usage
from tests.network import assert_reachable_only_on_loopback, wait_accepting
from tests.producers import all_events, consume, run

SettingsFactory = Callable[..., Settings]
TOKENS = Tokens.parse({
    "tok-api": {"service": "svc/api-gateway", "tenants": "*",
                "scopes": ["usage", "subscriptions"]},
    "tok-billing": {"service": "svc/billing", "tenants": "*", "scopes": ["subscriptions"]},
    # Usage of tenant-a only: what a service acting for one customer should hold.
    "tok-tenant-a": {"service": "svc/api-gateway", "tenants": ["tenant-a"],
                     "scopes": ["usage", "quota"]},
})
AUTH = {"Authorization": "Bearer tok-api"}
SINGLE = {"Content-Type": codec.SINGLE_CONTENT_TYPE, **AUTH}
BATCH = {"Content-Type": codec.BATCH_CONTENT_TYPE, **AUTH}
JSON = {"Content-Type": "application/json", **AUTH}


def event(tenant: str = "tenant-a", *, quantity: str = "1", **overrides: Any) -> dict[str, Any]:
    """A usage event from the service of token `tok-api`; `overrides` replace fields."""
    e = usage(tenant, quantity=quantity, source="svc/api-gateway")
    e.update(overrides)
    return e


async def with_gateway(
    settings: Settings, body: Callable[[TestClient[Any, Any]], Awaitable[Any]], *,
    start: bool = True, max_body_bytes: int = 1 << 20, spool_dir: Path | None = None,
    **options: Any,
) -> Any:
    """Run `body` against a gateway whose producer publishes to `settings`' broker.

    With start=False the producer is never started: for requests refused before
    anything is published (no broker needed).
    """
    producer = UsageProducer(settings, ProducerOptions(linger_ms=5, spool_dir=spool_dir,
                                                       **options))
    if start:
        await producer.start()
    app = create_gateway_app(producer, TOKENS, max_body_bytes)
    try:
        async with TestClient(TestServer(app)) as client:
            return await body(client)
    finally:
        await producer.close()


OFFLINE = Settings(kafka_bootstrap_servers="127.0.0.1:1", topic_prefix="unused.")


async def post(client: TestClient[Any, Any], payload: Any, headers: dict[str, str]
               ) -> tuple[int, Any]:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    response = await client.post("/v1/events", data=data, headers=headers)
    text = await response.read()
    return response.status, (orjson.loads(text) if text else None)


# -- accepted and published -----------------------------------------------------------------


def test_a_single_event_is_accepted_and_published(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    sent = event(quantity="3")

    async def scenario(client: TestClient[Any, Any]) -> tuple[int, Any, list[Any]]:
        status, body = await post(client, sent, SINGLE)
        return status, body, await consume(settings, settings.topics.usage, 1)

    status, body, received = run(with_gateway(settings, scenario))
    assert (status, body) == (202, {"accepted": 1, "rejected": 0, "errors": [],
                                    "errors_omitted": 0})
    (record,) = received
    assert record.key == "tenant-a"
    assert record.headers["content-type"] == codec.BATCH_CONTENT_TYPE.encode()
    assert UsageEvent.model_validate(record.events[0]) == UsageEvent.model_validate(sent)


def test_a_batch_is_accepted_and_each_event_goes_to_its_topic(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory()
    start = datetime(2026, 11, 1, tzinfo=UTC)
    sub = subscription("tenant-b", "created", "pro", start, start + timedelta(days=30))
    sub["source"] = "svc/api-gateway/billing-sync"  # a sub-source of the service
    batch = [event("tenant-a"), event("tenant-b"), sub, event("tenant-a")]

    async def scenario(client: TestClient[Any, Any]) -> Any:
        status, body = await post(client, batch, BATCH)
        assert (status, body["accepted"]) == (202, 4)
        return (await consume(settings, settings.topics.usage, 3),
                await consume(settings, settings.topics.subscriptions, 1))

    usage_records, sub_records = run(with_gateway(settings, scenario))
    assert sorted(e["id"] for e in all_events(usage_records)) == sorted(
        e["id"] for e in batch if e["type"] == "tally.usage.v1"
    )
    for record in usage_records:
        assert {e["subject"] for e in record.events} == {record.key}
    assert SubscriptionEvent.model_validate(all_events(sub_records)[0]).data.plan_id == "pro"


def test_plain_json_is_accepted_as_one_event_or_a_batch_by_its_first_byte(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory()

    async def scenario(client: TestClient[Any, Any]) -> list[Any]:
        assert (await post(client, b"  \n" + orjson.dumps(event()), JSON))[0] == 202
        status, body = await post(client, [event(), event()], JSON)
        assert (status, body["accepted"]) == (202, 2)
        return await consume(settings, settings.topics.usage, 3)

    assert len(all_events(run(with_gateway(settings, scenario)))) == 3


def test_an_event_without_source_gets_the_services_name(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory()
    sent = event()
    del sent["source"]

    async def scenario(client: TestClient[Any, Any]) -> list[Any]:
        assert (await post(client, sent, SINGLE))[0] == 202
        return await consume(settings, settings.topics.usage, 1)

    assert all_events(run(with_gateway(settings, scenario)))[0]["source"] == "svc/api-gateway"


def test_a_mixed_batch_publishes_the_valid_events_and_reports_the_invalid_ones_by_index(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory()
    good = [event(), event()]
    bad = event()
    bad["data"] = {"meter": "api_calls", "quantity": "-1"}
    batch = [good[0], bad, good[1], "not an event"]

    async def scenario(client: TestClient[Any, Any]) -> tuple[int, Any, list[Any]]:
        status, body = await post(client, batch, BATCH)
        return status, body, await consume(settings, settings.topics.usage, 2, linger=0.5)

    status, body, received = run(with_gateway(settings, scenario))
    assert status == 202
    assert (body["accepted"], body["rejected"]) == (2, 2)
    assert [e["index"] for e in body["errors"]] == [1, 3]
    assert body["errors"][0]["id"] == bad["id"]
    assert body["errors"][0]["problems"][0]["field"] == "data.quantity"
    assert sorted(e["id"] for e in all_events(received)) == sorted(e["id"] for e in good)


def test_a_batch_with_no_valid_event_is_refused_with_every_problem() -> None:
    wrong = [event(subject=""), event(time="2026-11-21T10:00:00"),
             event(type="tally.unknown.v1")]

    async def scenario(client: TestClient[Any, Any]) -> tuple[int, Any]:
        return await post(client, wrong, BATCH)

    status, body = run(with_gateway(OFFLINE, scenario, start=False))
    assert status == 400
    assert body["accepted"] == 0
    assert [[p["field"] for p in e["problems"]] for e in body["errors"]] == [
        ["subject"], ["time"], ["type"],
    ]


def test_a_source_outside_the_services_prefix_is_refused() -> None:
    async def scenario(client: TestClient[Any, Any]) -> tuple[int, Any]:
        return await post(client, [event(source="svc/billing"),
                                   event(source="svc/api-gatewayX")], BATCH)

    status, body = run(with_gateway(OFFLINE, scenario, start=False))
    assert status == 400
    assert {p["field"] for e in body["errors"] for p in e["problems"]} == {"source"}


# -- refused --------------------------------------------------------------------------------


def test_malformed_json_is_refused_with_400() -> None:
    async def scenario(client: TestClient[Any, Any]) -> tuple[int, Any]:
        return await post(client, b'{"specversion": "1.0", ', SINGLE)

    status, body = run(with_gateway(OFFLINE, scenario, start=False))
    assert status == 400
    assert "malformed JSON" in body["error"]


def test_a_body_of_the_wrong_shape_for_its_content_type_is_refused_with_400() -> None:
    async def scenario(client: TestClient[Any, Any]) -> list[int]:
        return [
            (await post(client, [event()], SINGLE))[0],
            (await post(client, event(), BATCH))[0],
            (await post(client, [], JSON))[0],
            (await post(client, b"42", JSON))[0],
        ]

    assert run(with_gateway(OFFLINE, scenario, start=False)) == [400, 400, 400, 400]


def test_a_wrong_content_type_is_refused_with_415() -> None:
    async def scenario(client: TestClient[Any, Any]) -> list[int]:
        return [
            (await post(client, event(), {"Content-Type": "text/plain", **AUTH}))[0],
            (await post(client, event(), {"Content-Type": "application/xml", **AUTH}))[0],
        ]

    assert run(with_gateway(OFFLINE, scenario, start=False)) == [415, 415]


def test_a_missing_or_unknown_token_is_refused_with_401() -> None:
    async def scenario(client: TestClient[Any, Any]) -> list[tuple[int, str | None]]:
        out = []
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
            response = await client.post(
                "/v1/events", data=orjson.dumps(event()),
                headers={"Content-Type": codec.SINGLE_CONTENT_TYPE, **headers},
            )
            out.append((response.status, response.headers.get("WWW-Authenticate")))
        return out

    results = run(with_gateway(OFFLINE, scenario, start=False))
    assert [status for status, _ in results] == [401, 401, 401]
    assert all(challenge and challenge.startswith("Bearer") for _, challenge in results)


def test_an_oversized_body_is_refused_with_413_with_or_without_content_length() -> None:
    big = orjson.dumps([event() for _ in range(20)])

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    async def scenario(client: TestClient[Any, Any]) -> list[int]:
        declared = (await post(client, big, BATCH))[0]
        response = await client.post("/v1/events", data=chunks(), headers=BATCH)
        return [declared, response.status]

    assert run(with_gateway(OFFLINE, scenario, start=False, max_body_bytes=2048)) == [413, 413]


def test_error_bodies_are_bounded_however_many_events_are_wrong() -> None:
    # 1 MiB of items that are not event objects: half a million problems to report.
    body = b"[" + b",".join([b"1"] * 500_000) + b"]"

    async def scenario(client: TestClient[Any, Any]) -> tuple[int, bytes]:
        response = await client.post("/v1/events", data=body, headers=BATCH)
        return response.status, await response.read()

    status, answer = run(with_gateway(OFFLINE, scenario, start=False))
    assert status == 400
    assert len(answer) < 10_000
    report = orjson.loads(answer)
    assert (report["accepted"], report["rejected"]) == (0, 500_000)
    assert [e["index"] for e in report["errors"]] == list(range(MAX_REPORTED_EVENTS))
    assert report["errors_omitted"] == 500_000 - MAX_REPORTED_EVENTS


def test_echoed_text_and_problems_per_event_are_bounded() -> None:
    huge_id = "x" * 100_000
    many_problems = event(id=huge_id, dimensions=None)
    many_problems["data"] = {"meter": "api_calls", "quantity": "1",
                             "dimensions": {f"{'k' * 1000}{i}": 1 for i in range(200)}}

    async def scenario(client: TestClient[Any, Any]) -> tuple[int, bytes]:
        response = await client.post("/v1/events", data=orjson.dumps(many_problems),
                                     headers=SINGLE)
        return response.status, await response.read()

    status, answer = run(with_gateway(OFFLINE, scenario, start=False))
    assert status == 400
    assert len(answer) < 10_000
    (report,) = orjson.loads(answer)["errors"]
    assert len(report["id"]) < 300
    assert len(report["problems"]) == 11  # 10 shown, then how many more
    assert "more problems" in report["problems"][-1]["message"]


def test_metric_labels_come_from_the_routes_not_the_paths_asked_for() -> None:
    paths = [f"/{uuid.uuid4().hex}/{i}" for i in range(300)]

    async def scenario(client: TestClient[Any, Any]) -> list[int]:
        statuses = []
        for path in paths:
            response = await client.get(path)
            statuses.append(response.status)
            response.release()
        await (await client.get("/healthz")).read()
        return statuses

    assert set(run(with_gateway(OFFLINE, scenario, start=False))) == {404}
    labels = {sample.labels["path"] for metric in gateway_metrics.GATEWAY_REQUESTS.collect()
              for sample in metric.samples}
    assert labels <= {"/v1/events", "/healthz", "/metrics", "other"}
    assert {"other", "/healthz"} <= labels


# -- tenants and scopes ---------------------------------------------------------------------


def test_a_token_publishes_for_its_tenants_only_and_a_forbidden_event_stops_the_request(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory()
    batch = [event("tenant-a"), event("tenant-b"), event("tenant-a"), event("tenant-c")]
    headers = {**BATCH, "Authorization": "Bearer tok-tenant-a"}

    async def scenario(client: TestClient[Any, Any]) -> tuple[int, Any, list[Any]]:
        status, body = await post(client, batch, headers)
        allowed = await post(client, [event("tenant-a")], headers)
        assert allowed[0] == 202
        return status, body, await consume(settings, settings.topics.usage, 1, linger=1.0)

    status, body, received = run(with_gateway(settings, scenario))
    assert status == 403
    assert "nothing was published" in body["error"]
    assert (body["accepted"], body["rejected"], body["forbidden"]) == (0, 4, 2)
    assert [e["index"] for e in body["errors"]] == [1, 3]
    problem = body["errors"][0]["problems"][0]
    assert (problem["field"], problem["rule"]) == ("subject", "tenant_not_allowed")
    assert "tenant not allowed" in problem["message"] and "'tenant-b'" in problem["message"]
    # Only the later, allowed request reached Kafka.
    assert [e["subject"] for e in all_events(received)] == ["tenant-a"]


def test_publishing_needs_the_scope_of_the_event_kind() -> None:
    start = datetime(2026, 11, 1, tzinfo=UTC)
    unlimited = subscription("tenant-a", "plan_changed", "enterprise", start,
                             start + timedelta(days=30))
    unlimited["source"] = "svc/api-gateway"

    async def scenario(client: TestClient[Any, Any]) -> list[tuple[int, Any]]:
        return [
            # a usage-only token cannot move its own tenant to another plan
            await post(client, unlimited, {**SINGLE, "Authorization": "Bearer tok-tenant-a"}),
            # a subscriptions-only token cannot publish usage
            await post(client, event(source="svc/billing"),
                       {**SINGLE, "Authorization": "Bearer tok-billing"}),
        ]

    answers = run(with_gateway(OFFLINE, scenario, start=False))
    assert [status for status, _ in answers] == [403, 403]
    rules = [(p["field"], p["rule"], p["message"]) for _, body in answers
             for p in body["errors"][0]["problems"]]
    assert [(field, rule) for field, rule, _ in rules] == [("type", "scope_missing")] * 2
    assert "scope missing: 'subscriptions'" in rules[0][2]
    assert "scope missing: 'usage'" in rules[1][2]


def test_a_forbidden_event_is_refused_even_when_it_is_also_invalid() -> None:
    bad = event("tenant-b", quantity="-1")

    async def scenario(client: TestClient[Any, Any]) -> tuple[int, Any]:
        return await post(client, [bad], {**BATCH, "Authorization": "Bearer tok-tenant-a"})

    status, body = run(with_gateway(OFFLINE, scenario, start=False))
    assert status == 403
    assert body["errors"][0]["problems"][0]["rule"] == "tenant_not_allowed"


def test_forbidden_reports_are_bounded_too() -> None:
    batch = [event(f"tenant-{i}") for i in range(1, 200)]

    async def scenario(client: TestClient[Any, Any]) -> tuple[int, Any]:
        return await post(client, batch, {**BATCH, "Authorization": "Bearer tok-tenant-a"})

    status, body = run(with_gateway(OFFLINE, scenario, start=False))
    assert status == 403
    assert len(body["errors"]) == MAX_REPORTED_EVENTS
    assert body["errors_omitted"] == 199 - MAX_REPORTED_EVENTS


def test_serve_reads_the_tokens_file_of_the_settings_or_of_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    old = tmp_path / "old.json"
    old.write_text('{"tok-secret": "svc/api-gateway"}')
    new = tmp_path / "new.json"
    new.write_text('{"tok": {"service": "svc/x", "tenants": "*", "scopes": ["usage"]}}')
    monkeypatch.setenv("TALLY_HOME", str(tmp_path))
    monkeypatch.delenv("TALLY_TOKENS_FILE", raising=False)

    assert main(["ingest", "serve"]) == 2
    assert "no tokens file" in capsys.readouterr().err
    monkeypatch.setenv("TALLY_TOKENS_FILE", str(old))
    assert main(["ingest", "serve"]) == 2
    refused = capsys.readouterr().err
    assert "old form" in refused
    assert '"<the token of svc/api-gateway>": {"service":"svc/api-gateway","tenants":"*"' in refused
    assert "tok-secret" not in refused
    monkeypatch.setenv("TALLY_TOKENS_FILE", str(new))
    assert main(["ingest", "serve", "--tokens", str(old)]) == 2  # the option wins
    assert "old form" in capsys.readouterr().err


# -- operations -----------------------------------------------------------------------------


def test_healthz_reports_the_kafka_connection_and_metrics_are_exposed(
    settings_factory: SettingsFactory, tmp_path: Path,
) -> None:
    settings = settings_factory()

    async def scenario(client: TestClient[Any, Any]) -> tuple[Any, str]:
        await post(client, event(), SINGLE)
        health = await (await client.get("/healthz")).json()
        metrics_text = await (await client.get("/metrics")).text()
        return health, metrics_text

    health, metrics_text = run(with_gateway(settings, scenario, spool_dir=tmp_path))
    assert health["status"] == "ok"
    assert health["kafka"] == "connected"
    assert health["spooled_records"] == 0
    assert "tally_gateway_requests_total" in metrics_text
    assert "tally_producer_events_sent_total" in metrics_text


def test_the_gateway_keeps_accepting_while_kafka_is_away_by_spooling(tmp_path: Path) -> None:
    offline = Settings(kafka_bootstrap_servers=f"127.0.0.1:{_closed_port()}",
                       topic_prefix="offline.")

    async def scenario(client: TestClient[Any, Any]) -> tuple[int, Any]:
        status, _ = await post(client, [event(), event("tenant-b")], BATCH)
        health = await (await client.get("/healthz")).json()
        return status, health

    status, health = run(with_gateway(offline, scenario, spool_dir=tmp_path))
    assert status == 202
    assert health["kafka"] == "spooling"
    assert health["spooled_records"] == 2


def test_a_full_spool_is_answered_503_with_retry_after_and_the_events_taken_stay(
    tmp_path: Path,
) -> None:
    offline = Settings(kafka_bootstrap_servers=f"127.0.0.1:{_closed_port()}",
                       topic_prefix="offline.")

    async def scenario(client: TestClient[Any, Any]) -> tuple[int, int, str | None, Any]:
        taken, _ = await post(client, [event(), event("tenant-b")], BATCH)  # fills it
        response = await client.post("/v1/events", data=orjson.dumps(event()), headers=SINGLE)
        body = await response.json()
        health = await (await client.get("/healthz")).json()
        return taken, response.status, response.headers.get("Retry-After"), (body, health)

    taken, refused, retry_after, (body, health) = run(
        with_gateway(offline, scenario, spool_dir=tmp_path, spool_max_bytes=1))
    assert (taken, refused, retry_after) == (202, 503, "5")
    assert "retry with the same ids" in body["error"] and "spool" in body["error"]
    assert health["spooled_records"] == 2  # both tenants' records, nothing of the refused


def test_serve_answers_until_cancelled_and_flushes_on_the_way_out(
    settings_factory: SettingsFactory, tmp_path: Path,
) -> None:
    settings = settings_factory()
    port = _closed_port()
    options = ProducerOptions(source="tally/ingest-gateway", spool_dir=tmp_path,
                              linger_ms=60_000)

    async def scenario() -> tuple[int, list[Any]]:
        task = asyncio.create_task(serve(settings, port, TOKENS, options=options))
        async with aiohttp.ClientSession() as session:
            for _ in range(100):  # until it listens
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.05)
            # Without waiting for the answer: linger is a minute, only shutdown sends it.
            post_task = asyncio.create_task(session.post(
                f"http://127.0.0.1:{port}/v1/events", data=orjson.dumps(event()), headers=SINGLE
            ))
            await asyncio.sleep(0.3)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            response = await post_task
            status = response.status
            response.release()
        return status, await consume(settings, settings.topics.usage, 1)

    status, received = run(scenario())
    assert status == 202
    assert len(all_events(received)) == 1


def test_serve_listens_where_the_setting_says_loopback_by_default(
    settings_factory: SettingsFactory, tmp_path: Path,
) -> None:
    settings = settings_factory()
    port = _closed_port()
    options = ProducerOptions(source="tally/ingest-gateway", spool_dir=tmp_path)

    async def scenario() -> None:
        task = asyncio.create_task(serve(settings, port, TOKENS, options=options))
        try:
            await asyncio.to_thread(wait_accepting, "127.0.0.1", port, 60)
            assert not task.done(), task.exception()  # the gateway, not another process
            await asyncio.to_thread(assert_reachable_only_on_loopback, port)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    assert settings.gateway_host == "127.0.0.1"
    run(scenario())


def _closed_port() -> int:
    from devtools.devstack import free_port

    return free_port()


# -- what every stage can store (schemas/validation.py; issue 17, defects 1 and 2) ----------


def test_events_no_later_stage_could_store_are_refused_with_400_naming_the_field() -> None:
    """Each of these was answered 202 and then crashed the worker (a time that overflows
    in UTC) or vanished between the worker and the ledger (NUL, a quantity of huge scale)."""
    nul_dimension = event()
    nul_dimension["data"]["dimensions"] = {"region": "eu\u0000west"}
    wrong = [
        event(time="0001-01-01T00:00:00+14:00"),
        event(time="9999-12-31T23:59:59-14:00"),
        event(time="1969-12-31T23:59:59Z"),
        event(time=(datetime.now(UTC) + timedelta(hours=1)).isoformat()),
        event(id="evt\u0000"),
        nul_dimension,
        event(quantity="1e-20000"),
        event(quantity="+5"),
        event(quantity="1_000"),
        event(quantity="\uff15"),  # a full-width 5
    ]
    fields = ["time"] * 4 + ["id", "data.dimensions.region", *["data.quantity"] * 4]

    async def scenario(client: TestClient[Any, Any]) -> tuple[int, Any]:
        return await post(client, wrong, BATCH)

    status, body = run(with_gateway(OFFLINE, scenario, start=False))
    assert status == 400
    assert body["accepted"] == 0
    assert [e["problems"][0]["field"] for e in body["errors"]] == fields
