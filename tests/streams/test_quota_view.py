"""QuotaView: local quota decisions from the quota-state topic, the guard decorator, the
FastAPI dependency, and the worker's `GET /quota/{tenant}/{meter}`."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from runtime import kafka
from runtime.settings import Settings
from schemas.codec import dumps
from streams.quota_fastapi import require_quota
from streams.quota_view import (
    REASON_NEW_PERIOD,
    REASON_NOT_READY,
    REASON_UNKNOWN,
    QuotaDecision,
    QuotaExceeded,
    QuotaView,
    parse_quantity,
    parse_quota_query,
    quota_guard,
)
from tests.conftest import WorkerProcess
from tests.helpers import record, usage
from tests.kafka_helpers import publish, publish_seed_catalog, wait_for

OFFLINE = Settings(kafka_bootstrap_servers="127.0.0.1:1", topic_prefix="unused.")
NOW = datetime.now(UTC)
PERIOD_START = NOW.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
PERIOD_END = PERIOD_START + timedelta(days=40)


def quota_state(tenant: str, used: str, limit: str | None = "1000", state: str = "ok",
                meter: str = "api_calls", period_end: datetime = PERIOD_END) -> bytes:
    """A quota-state record value as the worker writes it."""
    remaining = None if limit is None else str(max(D(limit) - D(used), D(0)))
    return dumps({
        "tenant_id": tenant, "meter": meter, "plan_id": "free",
        "period_start": PERIOD_START.isoformat(), "period_end": period_end.isoformat(),
        "used": used, "included": limit, "limit": limit, "remaining": remaining,
        "state": state,
    })


def loaded_view(*states: bytes, **options: Any) -> QuotaView:
    """A view that never connects, loaded through the consumer's own path (`apply`)."""
    view = QuotaView(OFFLINE, **options)
    for value in states:
        doc = json.loads(value)
        view.apply(f"{doc['tenant_id']}/{doc['meter']}", value)
    return view


# --- decisions (no broker) ----------------------------------------------------------------


@pytest.mark.parametrize(("used", "limit", "state", "quantity", "allowed", "remaining", "reason"), [
    ("0", "1000", "ok", 1, True, D(999), "within limit"),
    ("999", "1000", "warning", 1, True, D(0), "within limit"),
    ("990", "1000", "warning", 10, True, D(0), "within limit"),
    ("990", "1000", "warning", 11, False, D(10), "hard limit 1000 reached (990 used)"),
    ("990", "1000", "warning", D("10.5"), False, D(10), "hard limit 1000 reached (990 used)"),
    ("1000", "1000", "blocked", 1, False, D(0), "blocked: hard limit 1000 reached (1000 used)"),
    # The worker's verdict wins even where the arithmetic alone would allow (e.g. the limit
    # in the record was raised by a plan change the worker has not re-evaluated yet).
    ("500", "1000", "blocked", 1, False, D(500), "blocked: hard limit 1000 reached (500 used)"),
    ("10000000", None, "ok", 1, True, None, "unlimited"),
    ("10000000", None, "ok", 10**6, True, None, "unlimited"),
])
def test_check_policy_table(used: str, limit: str | None, state: str, quantity: D | int,
                            allowed: bool, remaining: D | None, reason: str) -> None:
    view = loaded_view(quota_state("t", used, limit, state))
    decision = view.check("t", "api_calls", quantity)
    assert (decision.allowed, decision.remaining, decision.reason) == (allowed, remaining, reason)
    assert decision.state is not None and decision.state.used == D(used)


@pytest.mark.parametrize(("policy", "allowed"), [("allow", True), ("deny", False)])
def test_unknown_tenant_or_meter_follows_the_configured_policy(policy: Any,
                                                               allowed: bool) -> None:
    view = loaded_view(quota_state("known", "5"), on_unknown=policy)
    view._ready.set()  # caught up: the key really has no state
    for tenant, meter in (("stranger", "api_calls"), ("known", "executions")):
        decision = view.check(tenant, meter)
        assert decision == QuotaDecision(allowed, REASON_UNKNOWN, None, None)


def test_unknown_key_before_catching_up_says_so_and_follows_the_policy() -> None:
    assert loaded_view().check("t", "api_calls") == QuotaDecision(True, REASON_NOT_READY,
                                                                  None, None)
    denied = loaded_view(on_unknown="deny").check("t", "api_calls")
    assert (denied.allowed, denied.reason) == (False, REASON_NOT_READY)


def test_a_state_whose_period_ended_is_judged_as_a_fresh_period() -> None:
    ended = NOW - timedelta(seconds=1)
    view = loaded_view(quota_state("t", "1000", state="blocked", period_end=ended))
    fresh = view.check("t", "api_calls")
    assert (fresh.allowed, fresh.reason, fresh.remaining) == (True, REASON_NEW_PERIOD, D(999))
    assert not view.check("t", "api_calls", 1001).allowed  # still bound by the limit


def test_newer_record_replaces_and_tombstone_forgets_the_key() -> None:
    view = loaded_view(quota_state("t", "10"))
    view.apply("t/api_calls", quota_state("t", "1000", state="blocked"))
    assert not view.check("t", "api_calls").allowed
    view.apply("t/api_calls", None)
    assert view.state("t", "api_calls") is None
    assert view.check("t", "api_calls").reason == REASON_NOT_READY


def test_invalid_record_is_skipped_and_the_previous_state_stays() -> None:
    view = loaded_view(quota_state("t", "1000", state="blocked"))
    view.apply("t/api_calls", b'{"tenant_id": "t", "used": "not a number"}')
    view.apply("t/api_calls", b"\xff not json")
    assert view.check("t", "api_calls").reason.startswith("blocked")
    assert view.staleness.records_applied == 1


def test_tenant_ids_with_slashes_are_keyed_by_the_record_value_not_the_key() -> None:
    view = loaded_view(quota_state("org/team", "1000", state="blocked"))
    assert not view.check("org/team", "api_calls").allowed
    view.apply("org/team/api_calls", None)
    assert view.state("org/team", "api_calls") is None


@pytest.mark.parametrize(("text", "expected"), [
    (None, D(1)), ("", D(1)), ("25", D(25)), ("0.5", D("0.5")), ("1e3", D(1000)),
    ("1E+15", D("1e15")), ("0.000000000001", D("1e-12")), ("2.500000000000000", D("2.5")),
])
def test_quantity_parameter_is_a_positive_decimal(text: str | None, expected: D) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", [
    "0", "-1", "abc", "NaN", "Infinity", "1e999999999", "1e16", "1e-20000",
    "0.0000000000001", " 5 ", "+5", "5.", ".5", "1_000", "\u0665", "\uff15", "1" * 65,
])
def test_quantity_parameter_refuses_non_positive_or_non_numbers(text: str) -> None:
    with pytest.raises(ValueError, match="quantity"):
        parse_quantity(text)


def test_quota_query_names_every_problem() -> None:
    assert parse_quota_query("t-1", "api_calls", [("quantity", "2")]) == 2
    assert parse_quota_query("t-1", "api_calls", []) == 1
    with pytest.raises(ValueError) as refused:
        parse_quota_query("bad tenant", "Bad", [("quantiy", "5"), ("quantity", "x")])
    message = str(refused.value)
    for says in ("not a tenant id", "not a meter name", "unknown query parameters 'quantiy'",
                 "positive decimal number"):
        assert says in message
    with pytest.raises(ValueError, match="more than once"):
        parse_quota_query("t-1", "api_calls", [("quantity", "1"), ("quantity", "2")])


# --- the guard decorator (no broker) ------------------------------------------------------


def test_quota_guard_runs_within_quota_and_raises_quota_exceeded_over_it() -> None:
    view = loaded_view(quota_state("ok-tenant", "10"),
                       quota_state("full-tenant", "1000", state="blocked"))
    calls: list[str] = []

    @quota_guard(view, "api_calls")
    async def handle(request_id: str, tenant: str = "ok-tenant") -> str:
        calls.append(request_id)
        return f"done {request_id}"

    assert asyncio.run(handle("r1", "ok-tenant")) == "done r1"
    assert asyncio.run(handle("r2", tenant="ok-tenant")) == "done r2"
    assert asyncio.run(handle("r3")) == "done r3"  # the argument's default tenant
    with pytest.raises(QuotaExceeded) as refused:
        asyncio.run(handle("r4", tenant="full-tenant"))
    assert calls == ["r1", "r2", "r3"]
    assert refused.value.tenant == "full-tenant" and refused.value.meter == "api_calls"
    assert refused.value.decision.reason.startswith("blocked")


def test_quota_guard_checks_the_quantity_it_was_given() -> None:
    view = loaded_view(quota_state("t", "995"))

    @quota_guard(view, "api_calls", tenant_arg="account", quantity=10)
    async def batch(account: str) -> None:
        return None

    with pytest.raises(QuotaExceeded, match="hard limit 1000 reached"):
        asyncio.run(batch("t"))


def test_quota_guard_refuses_functions_without_the_tenant_argument() -> None:
    with pytest.raises(TypeError, match="no argument 'tenant'"):
        @quota_guard(loaded_view(), "api_calls")
        async def handle(customer: str) -> None:
            return None


# --- on the real broker -------------------------------------------------------------------


def test_fastapi_dependency_answers_429_with_the_reason_over_quota(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory()
    publish(settings, settings.topics.quota_state, [
        ("ok-tenant/api_calls", quota_state("ok-tenant", "10")),
        ("full-tenant/api_calls", quota_state("full-tenant", "1000", state="blocked")),
    ])
    view = QuotaView(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with view:
            await view.wait_ready(timeout=15)
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/v1/{tenant}/calls", dependencies=[Depends(require_quota(view, "api_calls"))])
    async def call(tenant: str) -> dict[str, str]:
        return {"tenant": tenant}

    def tenant_header(request: Request) -> str:
        return request.headers["X-Tenant"]

    quota_by_header = Depends(require_quota(view, "api_calls", tenant_from=tenant_header))

    @app.get("/v2/calls")
    async def my_call(decision: QuotaDecision = quota_by_header) -> dict[str, str]:
        return {"remaining": str(decision.remaining)}

    with TestClient(app) as client:
        assert client.get("/v1/ok-tenant/calls").json() == {"tenant": "ok-tenant"}
        refused = client.get("/v1/full-tenant/calls")
        assert refused.status_code == 429
        assert refused.json() == {"detail": "blocked: hard limit 1000 reached (1000 used)"}
        assert int(refused.headers["Retry-After"]) > 0
        assert client.get("/v2/calls", headers={"X-Tenant": "ok-tenant"}).json() == {
            "remaining": "989"}
        assert client.get("/v2/calls", headers={"X-Tenant": "full-tenant"}).status_code == 429
        # A tenant with no state yet is let through (the default policy).
        assert client.get("/v1/new-tenant/calls").status_code == 200
        staleness = view.staleness
        assert (staleness.ready, staleness.keys, staleness.records_applied) == (True, 2, 2)
        assert staleness.seconds_since_fetch is not None and staleness.seconds_since_fetch < 5


async def _flip_latency(settings: Settings, tenant: str) -> tuple[float, QuotaDecision]:
    """Publish usage up to 900 of 1000 and wait until the view sees the worker's state; then
    publish the crossing record and time from its acknowledgement to `check` refusing."""
    async with QuotaView(settings) as view:
        await view.wait_ready(timeout=30)
        producer = kafka.producer(settings, linger_ms=0)
        await producer.start()
        try:
            warmup = record(*[usage(tenant, quantity="100", time=NOW) for _ in range(9)])
            await (await producer.send(settings.topics.usage, warmup, key=tenant.encode()))
            deadline = time.monotonic() + 60
            while (s := view.state(tenant, "api_calls")) is None or s.used != 900:
                assert time.monotonic() < deadline, "the view never saw the worker's state"
                await asyncio.sleep(0.01)
            assert view.check(tenant, "api_calls").allowed

            crossing = record(usage(tenant, quantity="100", time=NOW))
            await (await producer.send(settings.topics.usage, crossing, key=tenant.encode()))
            acknowledged = time.perf_counter()
            while (decision := view.check(tenant, "api_calls")).allowed:
                assert time.perf_counter() - acknowledged < 10, "never turned blocked"
                await asyncio.sleep(0.001)
            return time.perf_counter() - acknowledged, decision
        finally:
            await producer.stop()


def test_hard_limit_blocks_in_quota_view_within_one_second_of_the_crossing_event(
    catalog_worker: tuple[Settings, WorkerProcess],
) -> None:
    settings, _ = catalog_worker
    latency, decision = asyncio.run(_flip_latency(settings, "t-free"))
    assert decision.state is not None and decision.state.state == "blocked"
    assert decision.state.used == 1000 and decision.remaining == 0
    print(f"blocked visible in QuotaView {latency * 1000:.0f} ms after the crossing ack")
    assert latency < 1.0


TOKENS = {
    "tok-quota-all": {"service": "svc/api", "tenants": "*", "scopes": ["quota"]},
    "tok-quota-free": {"service": "svc/api", "tenants": ["t-free"], "scopes": ["quota"]},
    "tok-usage-only": {"service": "svc/api", "tenants": "*", "scopes": ["usage"]},
}


@pytest.fixture
def quota_worker(settings_factory: Callable[..., Settings],
                 worker_factory: Callable[[Settings], WorkerProcess],
                 tmp_path: Path) -> tuple[Settings, WorkerProcess]:
    """A running worker with the seed catalog and the tokens above (TALLY_TOKENS_FILE)."""
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps(TOKENS))
    settings = settings_factory(tokens_file=tokens_file)
    publish_seed_catalog(settings)
    return settings, worker_factory(settings)


def _get(url: str, token: str | None = "tok-quota-all") -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_worker_answers_get_quota_with_the_decision(
    quota_worker: tuple[Settings, WorkerProcess],
) -> None:
    settings, worker = quota_worker
    publish(settings, settings.topics.usage,
            [("t-free", record(*[usage("t-free", quantity="100", time=NOW) for _ in range(9)]))])
    base = f"http://127.0.0.1:{worker.web_port}/quota"

    def answer(path: str, token: str | None = "tok-quota-all") -> tuple[int, dict[str, Any]]:
        try:
            return _get(f"{base}/{path}", token)
        except OSError:
            return 0, {}  # the worker's web port is not up yet

    status, body = wait_for(lambda: answer("t-free/api_calls"),
                            lambda got: got[0] == 200 and got[1].get("used") == "900",
                            what="the worker's quota answer for t-free")
    assert body == {"allowed": True, "reason": "within limit", "remaining": "99",
                    "state": "warning", "used": "900", "limit": "1000",
                    "period_end": body["period_end"]}
    status, body = answer("t-free/api_calls?quantity=101")
    assert (status, body["allowed"], body["remaining"]) == (200, False, "100")
    # A tenant the pipeline never heard of and a meter the catalog lacks: 404, not
    # "allowed" (a typo in either must not read as permission).
    status, body = answer("nobody/api_calls")
    assert (status, body["error"]) == (404, "unknown tenant 'nobody': no usage or "
                                            "subscription of it has been counted")
    status, body = answer("t-free/no_such_meter")
    assert status == 404 and body["error"].startswith("unknown meter 'no_such_meter'")
    assert answer("t-free/api_calls", "tok-quota-free")[0] == 200

    # Bad query values: 400 with a message, never a 500 (1e999999999 overflowed the
    # arithmetic against t-free's state).
    for query in ("quantity=-1", "quantity=1e999999999", "quantity=1e-20000",
                  "quantity=%205%20", "quantity=abc", "quantity=1&quantity=2", "quantiy=5"):
        status, body = answer(f"t-free/api_calls?{query}")
        assert status == 400, (query, status, body)
        assert "quantity" in body["error"] or "quantiy" in body["error"], body
    assert answer("t-free/Not-A-Meter")[0] == 400
    assert worker.stop() == 0


def test_get_quota_needs_a_token_with_the_quota_scope_for_the_tenant(
    quota_worker: tuple[Settings, WorkerProcess],
) -> None:
    _, worker = quota_worker
    base = f"http://127.0.0.1:{worker.web_port}/quota"
    wait_for(lambda: worker.healthy(), bool, what="the worker's web port")

    status, body = _get(f"{base}/t-free/api_calls", token=None)
    assert (status, body["error"]) == (401, "missing or unknown bearer token")
    assert _get(f"{base}/t-free/api_calls", token="tok-unknown")[0] == 401
    status, body = _get(f"{base}/t-pro/api_calls", token="tok-quota-free")
    assert status == 403
    assert [p["rule"] for p in body["problems"]] == ["tenant_not_allowed"]
    status, body = _get(f"{base}/t-free/api_calls", token="tok-usage-only")
    assert status == 403
    assert [p["rule"] for p in body["problems"]] == ["scope_missing"]
    assert worker.stop() == 0
