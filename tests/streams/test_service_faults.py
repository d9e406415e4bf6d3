"""The notifier and the worker through faults that are not crashes (issue 17): Postgres
going away and coming back while notifications flow, the broker going away and coming back
(empty) under a running notifier, and a broker that is not up yet when they start. Each
runs against its own Postgres or its own Tansu, never the session's."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from devtools import devstack
from devtools.child import start_tally
from runtime import kafka
from runtime.postgres import connect, migrate
from runtime.settings import Settings
from schemas.codec import dumps
from schemas.records import Notification
from streams.channels.store import add_channel
from streams.notifier import IDEMPOTENCY_HEADER, idempotency_key, render_text
from tests.kafka_helpers import publish, wait_for
from tests.projections.test_faults import Broker, own_broker
from tests.streams.notifier_support import ChatReceiver, NotifierProcess
from tests.streams.test_notifier import notification

__all__ = ["own_broker"]  # the fixture of a Tansu of one test alone


@pytest.fixture
def notifiers() -> Iterator[list[NotifierProcess]]:
    started: list[NotifierProcess] = []
    yield started
    for n in started:
        n.kill()


def test_notifier_waits_out_a_postgres_outage_and_delivers_every_notification_once(
    settings_factory: Callable[..., Settings], own_postgres: tuple[str, Path],
    chat: ChatReceiver, notifiers: list[NotifierProcess], tmp_path: Path,
) -> None:
    url, pg_data = own_postgres
    migrate(url)
    settings = settings_factory(database_url=url)
    tenants = [f"t-{i}" for i in range(4)]
    with connect(url) as conn:
        for tenant in tenants:
            add_channel(conn, tenant, "slack", chat.url(f"/{tenant}"))
    # 120 notifications, each its own identity (tenant x threshold).
    sent = [notification(t, percent=str(p)) for p in range(1, 31) for t in tenants]
    notifier = NotifierProcess(settings, tmp_path / "notifier.log")
    notifiers.append(notifier)

    def publish_all() -> None:
        for i in range(0, len(sent), 4):
            publish(settings, settings.topics.notifications,
                    [(n.tenant_id, dumps(n)) for n in sent[i:i + 4]])
            time.sleep(0.1)

    publisher = threading.Thread(target=publish_all)
    publisher.start()
    wait_for(lambda: len(chat.posts), lambda n: n >= 10, timeout=60,
             what="notifications flowing")
    wait_for(notifier.health, lambda status: status == 200, what="the notifier ready")
    # Postgres goes away while notifications flow, for longer than a restart takes: the
    # notifier must say it waits (metrics, /healthz) and neither die nor drop anything.
    devstack.stop_postgres(pg_data)
    wait_for(notifier.health, lambda status: status == 503, timeout=30,
             what="/healthz not ready while Postgres is down")
    assert notifier.metric('tally_notifier_up{dependency="postgres"}') == 0
    assert notifier.metric('tally_notifier_up{dependency="kafka"}') == 1
    publisher.join(60)
    notifier.alive()
    devstack.restart_postgres(pg_data)

    expected = {(f"/{n.tenant_id}", render_text(n)) for n in sent}
    wait_for(lambda: {(p, orjson.loads(body)["text"]) for p, _, body in chat.posts},
             lambda got: got == expected, timeout=120,
             what=f"every notification delivered\n{notifier.log()}")
    wait_for(notifier.health, lambda status: status == 200, timeout=30,
             what="/healthz ready again")
    assert notifier.metric('tally_notifier_reconnects_total{dependency="postgres"}') >= 1
    assert notifier.metric('tally_notifier_up{dependency="postgres"}') == 1
    assert notifier.stop() == 0

    # Sent twice only within the documented window (streams/channels): a delivery in
    # flight when Postgres went away, at most one per partition.
    assert len(chat.posts) - len(expected) <= settings.partitions
    with connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM tally.notification_deliveries"
                            ).fetchone() == (len(sent),)


def test_notifier_outlives_a_broker_restart_and_delivers_what_comes_after_once(
    own_broker: Broker, chat: ChatReceiver, notifiers: list[NotifierProcess], tmp_path: Path,
) -> None:
    settings = Settings(kafka_bootstrap_servers=own_broker.address, topic_prefix="restart.",
                        partitions=2)
    asyncio.run(kafka.ensure_topics(settings))
    notifier = NotifierProcess(settings, tmp_path / "notifier.log",
                               "--webhook-url", chat.url("/ops"), "--secret", "s3cret")
    notifiers.append(notifier)

    def keys() -> list[str]:
        return [headers[IDEMPOTENCY_HEADER] for _, headers, _ in chat.posts]

    def publish_each(batch: list[Notification]) -> None:
        publish(settings, settings.topics.notifications,
                [(n.tenant_id, dumps(n)) for n in batch])

    # Before: notifications of 4 tenants flowing, on both partitions, and delivered.
    before = [notification(f"t-{i}", percent=str(p)) for p in range(1, 3) for i in range(4)]
    publish_each(before)
    wait_for(lambda: set(keys()), lambda got: got >= {idempotency_key(n) for n in before},
             timeout=60, what=f"the notifications before the restart\n{notifier.log()}")
    wait_for(notifier.health, lambda status: status == 200, what="the notifier ready")

    # The broker goes away, for longer than a probe takes to notice, and comes back empty
    # (memory-only): no topics, no group offsets, every partition starting again at 0.
    own_broker.stop()
    wait_for(notifier.health, lambda status: status == 503, timeout=30,
             what="/healthz not ready while the broker is away")
    assert notifier.metric('tally_notifier_up{dependency="kafka"}') == 0
    notifier.alive()
    # The notifier is frozen while the broker comes back and the new log fills, so that
    # its first fetch finds records there (without the freeze, whether it fetches before
    # its group's rejoin resets its positions is a matter of milliseconds).
    os.kill(notifier.proc.pid, signal.SIGSTOP)
    try:
        own_broker.restart()
        asyncio.run(kafka.ensure_topics(settings))
        # More than before on every partition: a notifier fetching from its old
        # positions would skip the first ones.
        after = [notification(f"t-{i}", percent=str(p)) for p in range(50, 65)
                 for i in range(4)]
        publish_each(after)
    finally:
        os.kill(notifier.proc.pid, signal.SIGCONT)

    wanted = {idempotency_key(n) for n in after}
    wait_for(lambda: wanted - set(keys()), lambda missing: not missing, timeout=90,
             what=f"every notification after the restart delivered\n{notifier.log()}")
    wait_for(notifier.health, lambda status: status == 200, timeout=30,
             what="/healthz ready again")
    notifier.alive()
    assert notifier.metric('tally_notifier_reconnects_total{dependency="kafka"}') >= 1
    assert notifier.stop() == 0
    delivered = keys()
    assert {key: delivered.count(key) for key in wanted} == dict.fromkeys(wanted, 1)


def test_notifier_started_before_the_broker_waits_for_it_and_then_delivers(
    tmp_path: Path, notifiers: list[NotifierProcess],
) -> None:
    port = devstack.restartable_port()
    settings = Settings(kafka_bootstrap_servers=f"127.0.0.1:{port}", topic_prefix="late.",
                        partitions=2)
    received: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(request.headers[IDEMPOTENCY_HEADER])
        return web.Response(status=204)

    async def scenario() -> None:
        app = web.Application()
        app.router.add_post("/hook", hook)
        async with TestServer(app, host="127.0.0.1") as server:
            notifier = NotifierProcess(settings, tmp_path / "notifier.log",
                                       "--webhook-url", str(server.make_url("/hook")),
                                       "--secret", "s3cret")
            notifiers.append(notifier)
            await _until(lambda: notifier.metric('tally_notifier_up{dependency="kafka"}') == 0
                         and notifier.health() == 503, "the notifier waiting for the broker")
            await asyncio.sleep(2)
            notifier.alive()
            home = tmp_path / "tansu"
            home.mkdir()
            _, pid = devstack.start_kafka(home, port)
            try:
                await kafka.ensure_topics(settings)
                await asyncio.to_thread(publish, settings, settings.topics.notifications,
                                        [("t-1", dumps(notification("t-1")))])
                await _until(lambda: len(received) >= 1, f"delivered\n{notifier.log()}")
                await _until(lambda: notifier.health() == 200, "ready")
                assert notifier.metric('tally_notifier_reconnects_total{dependency="kafka"}') == 1
                assert notifier.stop() == 0
            finally:
                devstack.stop_kafka(pid)

    asyncio.run(scenario())


async def _until(condition: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


def test_worker_started_before_the_broker_waits_for_it_instead_of_failing(
    tmp_path: Path,
) -> None:
    port = devstack.restartable_port()  # nothing listens there (nor can a client take it)
    settings = Settings(kafka_bootstrap_servers=f"127.0.0.1:{port}", topic_prefix="late.")
    log_path = tmp_path / "worker.log"
    proc = start_tally(settings, ["worker", "--web-port", str(devstack.free_port())], log_path)
    try:
        wait_for(lambda: log_path.read_text().count("the worker waits for the broker"),
                 lambda n: n >= 2, timeout=60, what="the worker retrying")
        assert proc.poll() is None, log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
