"""The API as an operator runs it: `tally api serve` as a child process over the session's
real broker and a fresh migrated database, with the seed catalog published."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.child import start_tally, wait_healthy
from devtools.devstack import free_port
from runtime.plans import publish_catalog
from runtime.postgres import migrate
from runtime.settings import Settings
from schemas.plans import Catalog, default_catalog_path, load_catalog

TOKENS = {
    "tok-admin": {"service": "ops/admin", "tenants": "*",
                  "scopes": ["admin", "read", "usage", "quota", "subscriptions"]},
    "tok-acme": {"service": "svc/acme", "tenants": ["acme"],
                 "scopes": ["read", "usage", "quota", "subscriptions"]},
    "tok-globex": {"service": "svc/globex", "tenants": ["globex"], "scopes": ["read"]},
    "tok-usage-only": {"service": "svc/usage", "tenants": "*", "scopes": ["usage"]},
}


@dataclass
class ApiServer:
    settings: Settings
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def headers(self, token: str = "tok-admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def api_catalog() -> Catalog:
    """The plan catalog the API's topics get: the seed's (a test module may override)."""
    return load_catalog(default_catalog_path())


@pytest.fixture
def api_settings(settings_factory: Callable[..., Settings], database_url: str,
                 tmp_path: Path, api_catalog: Catalog) -> Settings:
    """Fresh topics with the catalog above, a migrated database, the tokens above."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    settings = settings_factory(database_url=database_url, tokens_file=tokens)
    migrate(database_url)
    asyncio.run(publish_catalog(settings, api_catalog))
    return settings


@pytest.fixture
def api_factory(tmp_path: Path) -> Iterator[Callable[[Settings], ApiServer]]:
    """Start `tally api serve` processes; every one still running at the end is stopped."""
    started: list[ApiServer] = []

    def make(settings: Settings) -> ApiServer:
        port = free_port()
        log = tmp_path / f"api-{len(started)}.log"
        proc = start_tally(settings, ["api", "serve", "--port", str(port)], log)
        server = ApiServer(settings, f"http://127.0.0.1:{port}", proc, log)
        started.append(server)
        try:
            wait_healthy(port, timeout=60)
        except RuntimeError:
            raise AssertionError(log.read_text()[-3000:]) from None
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def api(api_settings: Settings, api_factory: Callable[[Settings], ApiServer]) -> ApiServer:
    return api_factory(api_settings)


@pytest.fixture
def stripe_double_url() -> Iterator[str]:
    """The Stripe double (checkout and portal sessions); no request may break Stripe's
    OpenAPI document."""
    from stripe_testkit import StripeDouble

    with StripeDouble() as double:
        yield double.url
        assert double.inspect().invalid_requests == ()
