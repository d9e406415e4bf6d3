"""The worker's web server listens where its setting says, and answers nothing but what it
documents (DESIGN.md guarantee 6, least privilege). Seen from this machine's non-loopback
address, as a client elsewhere would (tests/tally/test_listen_hosts.py covers the other
stages with a second loopback address)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable

from runtime.settings import Settings
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
