"""The notifier: signed, retried, at-least-once webhook delivery of tally.notifications."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka.partitioner import DefaultPartitioner

from runtime.settings import Settings
from schemas.codec import dumps
from schemas.records import Notification
from streams.notifier import (
    ATTEMPT_HEADER,
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    Notifier,
    NotifierOptions,
    backoff_delay,
    idempotency_key,
    payload,
    sign,
    verify_signature,
)
from tests.kafka_helpers import publish

SECRET = "whsec_test"
PERIOD = datetime(2026, 11, 1, tzinfo=UTC)


def notification(tenant: str = "t-1", kind: Any = "soft_limit", percent: str | None = "80",
                 used: str = "800", **overrides: Any) -> Notification:
    fields: dict[str, Any] = {
        "tenant_id": tenant, "meter": "api_calls", "plan_id": "free", "period_start": PERIOD,
        "kind": kind, "threshold_percent": None if percent is None else D(percent),
        "used": D(used), "limit": D(1000), **overrides,
    }
    return Notification(**fields)


# --- pure parts ---------------------------------------------------------------------------


def test_signature_verifies_with_the_shared_secret_only() -> None:
    body = payload(notification())
    header = sign(SECRET, body, timestamp=1_800_000_000)
    assert header.startswith("t=1800000000,v1=")
    assert verify_signature(SECRET, body, header, now=1_800_000_030)
    assert not verify_signature("other-secret", body, header, now=1_800_000_030)
    assert not verify_signature(SECRET, body + b" ", header, now=1_800_000_030)
    assert not verify_signature(SECRET, body, "v1=deadbeef", now=1_800_000_030)


def test_signature_older_than_the_tolerance_is_refused_as_a_replay() -> None:
    body = b'{"text": "hi"}'
    header = sign(SECRET, body, timestamp=1_800_000_000)
    assert verify_signature(SECRET, body, header, now=1_800_000_300)
    assert not verify_signature(SECRET, body, header, now=1_800_000_301)


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    body = b'{"a":1}'
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, body, 1_700_000_000) == f"t=1700000000,v1={expected}"


def test_idempotency_key_depends_on_the_identity_only() -> None:
    key = idempotency_key(notification())
    # Same identity: usage figures and encodings do not matter.
    assert idempotency_key(notification(used="950")) == key
    assert idempotency_key(notification(percent="80.0")) == key
    assert idempotency_key(notification(
        period_start=PERIOD.astimezone(timezone(timedelta(hours=2))))) == key
    # Any identity field changes it.
    others = [notification(tenant="t-2"), notification(percent="100"),
              notification(meter="executions"), notification(kind="exceeded", percent=None),
              notification(period_start=PERIOD + timedelta(days=30))]
    assert len({key, *(idempotency_key(n) for n in others)}) == 1 + len(others)
    assert key.startswith("ntf_") and key.isascii()


def test_payload_is_slack_compatible_and_carries_every_field() -> None:
    body = orjson.loads(payload(notification(kind="blocked", percent=None, used="1000")))
    assert body["text"] == ("Tenant t-1 (plan free) reached the hard limit of 1000 api_calls; "
                            "further usage is blocked until the period ends.")
    assert body["idempotency_key"] == idempotency_key(notification(kind="blocked", percent=None))
    assert body["kind"] == "blocked" and body["used"] == "1000" and body["limit"] == "1000"
    assert body["period_start"].startswith("2026-11-01T00:00:00")


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (8, 30.0), (30, 30.0)]:
        delay = backoff_delay(attempt, base=0.5, cap=30.0, rng=rng)
        assert ceiling / 2 <= delay <= ceiling


def test_the_notifier_never_follows_a_redirect() -> None:
    internal_requests: list[str] = []

    async def internal(request: web.Request) -> web.Response:
        internal_requests.append(request.path)
        return web.Response(status=204)

    async def scenario() -> Notifier:
        inside = web.Application()
        inside.router.add_route("*", "/{tail:.*}", internal)
        async with TestServer(inside, host="127.0.0.1") as target:
            hook = web.Application()

            async def redirect(request: web.Request) -> web.Response:
                # 307 keeps the method and body: the signed POST would go on as it is.
                raise web.HTTPTemporaryRedirect(str(target.make_url("/admin/reset")))

            hook.router.add_post("/hook", redirect)
            async with TestServer(hook, host="127.0.0.1") as receiver:
                offline = Settings(kafka_bootstrap_servers="127.0.0.1:1", topic_prefix="x.")
                notifier = Notifier(offline, NotifierOptions(
                    str(receiver.make_url("/hook")), SECRET, max_attempts=2,
                    backoff_base=0.01))
                async with aiohttp.ClientSession() as http:
                    assert await notifier.deliver(http, notification()) is True  # given up
                return notifier

    notifier = asyncio.run(scenario())
    assert internal_requests == []
    assert notifier.delivered == 0
    assert notifier.last_error is not None and "http 307" in notifier.last_error


# --- on the real broker -------------------------------------------------------------------


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 that fails the first `failures` requests."""

    failures: int = 0
    refused_tenants: set[str] = field(default_factory=set)  # always answered 503
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    delivered: dict[str, bytes] = field(default_factory=dict)  # deduped by idempotency key

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if (len(self.requests) <= self.failures
                or orjson.loads(body)["tenant_id"] in self.refused_tenants):
            return web.Response(status=503)
        if not verify_signature(SECRET, body, request.headers[SIGNATURE_HEADER]):
            return web.Response(status=401)
        self.delivered.setdefault(request.headers[IDEMPOTENCY_HEADER], body)
        return web.Response(status=204)


async def _deliver(settings: Settings, receiver: Receiver, expected: int,
                   options: dict[str, Any]) -> Notifier:
    """Run a notifier against `receiver` until it has delivered `expected` notifications."""
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        notifier = Notifier(settings, NotifierOptions(
            str(server.make_url("/hook")), SECRET, **options))
        task = asyncio.create_task(notifier.run())
        deadline = time.monotonic() + 30
        while notifier.delivered < expected and not task.done():
            assert time.monotonic() < deadline, f"delivered {notifier.delivered}/{expected}"
            await asyncio.sleep(0.05)
        notifier.stop()
        await task
    return notifier


def test_notifier_retries_a_failing_receiver_and_delivers_each_notification_signed(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory()
    sent = [notification("t-1"), notification("t-2", kind="blocked", percent=None)]
    publish(settings, settings.topics.notifications,
            [(n.tenant_id, dumps(n)) for n in sent] + [("t-3", b"not a notification")])
    receiver = Receiver(failures=2)

    asyncio.run(_deliver(settings, receiver, expected=2, options={"backoff_base": 0.05}))

    assert set(receiver.delivered) == {idempotency_key(n) for n in sent}
    for n in sent:
        assert orjson.loads(receiver.delivered[idempotency_key(n)])["tenant_id"] == n.tenant_id
    # Two failed attempts, retried: every attempt at a notification carries its key, and
    # the attempts count up.
    assert len(receiver.requests) == len(sent) + 2
    for n in sent:
        attempts = [h[ATTEMPT_HEADER] for h, _ in receiver.requests
                    if h[IDEMPOTENCY_HEADER] == idempotency_key(n)]
        assert attempts == [str(a) for a in range(1, len(attempts) + 1)]
    assert all(verify_signature(SECRET, body, h[SIGNATURE_HEADER])
               for h, body in receiver.requests)


def _tenants_on_different_partitions(partitions: int) -> tuple[str, str]:
    def partition(tenant: str) -> int:
        every = list(range(partitions))
        return int(DefaultPartitioner()(tenant.encode(), every, every))
    first = "t-1"
    other = next(t for t in (f"t-{i}" for i in range(2, 100))
                 if partition(t) != partition(first))
    return first, other


def test_a_notification_that_cannot_get_through_holds_up_only_its_partition(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory()
    stuck, other = _tenants_on_different_partitions(settings.partitions)
    publish(settings, settings.topics.notifications,
            [(stuck, dumps(notification(stuck))), (other, dumps(notification(other)))])
    receiver = Receiver(refused_tenants={stuck})

    asyncio.run(_deliver(settings, receiver, expected=1, options={"backoff_base": 0.05}))

    assert list(receiver.delivered) == [idempotency_key(notification(other))]
    assert any(h[IDEMPOTENCY_HEADER] == idempotency_key(notification(stuck))
               for h, _ in receiver.requests)


def test_delivered_notifications_are_committed_and_not_sent_again_after_a_restart(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory()
    publish(settings, settings.topics.notifications, [("t-1", dumps(notification("t-1")))])
    asyncio.run(_deliver(settings, Receiver(), expected=1, options={}))
    publish(settings, settings.topics.notifications, [("t-2", dumps(notification("t-2")))])
    after_restart = Receiver()
    asyncio.run(_deliver(settings, after_restart, expected=1, options={}))
    assert list(after_restart.delivered) == [idempotency_key(notification("t-2"))]
    assert len(after_restart.requests) == 1


def test_a_notification_that_never_gets_through_is_given_up_after_max_attempts(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory()
    publish(settings, settings.topics.notifications,
            [("t-1", dumps(notification("t-1"))), ("t-1", dumps(notification("t-1", "exceeded",
                                                                              None)))])
    receiver = Receiver(failures=3)  # the first notification's three attempts all fail
    notifier = asyncio.run(_deliver(settings, receiver, expected=1,
                                    options={"backoff_base": 0.01, "max_attempts": 3}))
    assert list(receiver.delivered) == [idempotency_key(notification("t-1", "exceeded", None))]
    assert notifier.last_error is not None and "http 503" in notifier.last_error


def test_notify_serve_stops_cleanly_on_sigterm(
    settings_factory: Callable[..., Settings], tmp_path: Path,
) -> None:
    settings = settings_factory()
    env = {**os.environ, **settings.to_env(), "TALLY_HOME": str(tmp_path),
           "TALLY_WEBHOOK_SECRET": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tally.cli", "notify", "serve",
         "--webhook-url", "http://127.0.0.1:9/unused", "--web-port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(3)  # started and joining its consumer group
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_notify_serve_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TALLY_WEBHOOK_SECRET"}
    done = subprocess.run(
        [sys.executable, "-m", "tally.cli", "notify", "serve", "--webhook-url", "http://x/"],
        env={**env, "TALLY_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == ("tally: error: no webhook secret: pass --secret or set "
                                   "TALLY_WEBHOOK_SECRET")
