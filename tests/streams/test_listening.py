"""The worker's and the notifier's web servers listen where their settings say, and answer
nothing but what they document (DESIGN.md guarantee 6, least privilege)."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable

from devtools.devstack import free_port
from runtime.settings import Settings
from streams.notifier import NotifierOptions, NotifierService
from tests.conftest import WorkerProcess
from tests.kafka_helpers import publish_seed_catalog
from tests.network import (
    accepts,
    assert_reachable_only_on_loopback,
    non_loopback_address,
    wait_accepting,
)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_the_worker_listens_on_loopback_only_by_default_and_serves_no_faust_pages(
    catalog_worker: tuple[Settings, WorkerProcess],
) -> None:
    settings, worker = catalog_worker
    assert settings.worker_web_host == "127.0.0.1"
    wait_accepting("127.0.0.1", worker.web_port)

    assert_reachable_only_on_loopback(worker.web_port)
    base = f"http://127.0.0.1:{worker.web_port}"
    # Faust's own pages would answer anyone with the worker's tables and topology.
    for path in ("/router/", "/router/topics", "/table/", "/graph/", "/stats/"):
        assert _status(base + path) == 404, path
    assert worker.stop() == 0


def test_the_worker_listens_where_its_setting_says(
    settings_factory: Callable[..., Settings],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    address = non_loopback_address()
    settings = settings_factory(worker_web_host=address)
    publish_seed_catalog(settings)
    worker = worker_factory(settings)

    wait_accepting(address, worker.web_port)
    assert not accepts("127.0.0.1", worker.web_port)
    assert worker.stop() == 0


def test_the_notifier_web_port_listens_where_its_setting_says() -> None:
    address = non_loopback_address()

    async def listening_on(settings: Settings, port: int) -> tuple[bool, bool]:
        service = NotifierService(settings, NotifierOptions("http://127.0.0.1:1/", "s"), port)
        runner = await service.start_web()
        try:
            return (await asyncio.to_thread(accepts, "127.0.0.1", port),
                    await asyncio.to_thread(accepts, address, port))
        finally:
            await runner.cleanup()

    offline = Settings(kafka_bootstrap_servers="127.0.0.1:1", topic_prefix="unused.")
    assert asyncio.run(listening_on(offline, free_port())) == (True, False)
    elsewhere = offline.model_copy(update={"notifier_web_host": address})
    assert asyncio.run(listening_on(elsewhere, free_port())) == (False, True)

