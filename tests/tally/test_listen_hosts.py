"""Every stage's HTTP server (metrics, health) listens where its setting says, loopback
unless told otherwise. 127.0.0.2 stands for "another address": it is loopback on Linux
but not 127.0.0.1, so a server bound to 127.0.0.1 does not answer there, and vice versa."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.child import start_tally
from devtools.devstack import free_port
from runtime.postgres import migrate
from runtime.settings import Settings
from streams.notifier import NotifierOptions, NotifierService

OTHER = "127.0.0.2"


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes] | None = None,
                   timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not answers(host, port):
        assert proc is None or proc.poll() is None, "the process ended"
        assert time.monotonic() < deadline, f"nothing listening on {host}:{port}"
        time.sleep(0.1)


def test_every_stage_listens_on_loopback_by_default() -> None:
    s = Settings()
    assert {s.gateway_host, s.worker_web_host, s.notifier_web_host, s.projector_metrics_host,
            s.scheduler_metrics_host, s.webhooks_host} == {"127.0.0.1"}


def test_the_worker_binds_its_web_server_to_its_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streams.app import create_app

    monkeypatch.setenv("TALLY_HOME", str(tmp_path))
    app = create_app(Settings(kafka_bootstrap_servers="127.0.0.1:1", worker_web_host=OTHER))
    # Faust listens on web_bind; left alone, it binds 0.0.0.0.
    assert app.conf.web_bind == OTHER


def test_the_notifier_listens_where_its_setting_says(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(notifier_web_host=OTHER)
    port = free_port()

    async def scenario() -> tuple[bool, bool]:
        service = NotifierService(settings, NotifierOptions("http://127.0.0.1:9/", "s"), port)
        task = asyncio.create_task(service.run())
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(answers, OTHER, port):
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.1)
        seen = (await asyncio.to_thread(answers, OTHER, port),
                await asyncio.to_thread(answers, "127.0.0.1", port))
        service.stop()
        await task
        return seen

    assert asyncio.run(scenario()) == (True, False)


@pytest.mark.parametrize(("command", "setting"), [
    (["project", "--metrics-port"], "projector_metrics_host"),
    (["jobs", "schedule", "--catalog-every", "600", "--push-every", "600", "--invoice-every",
      "600", "--reconcile-every", "600", "--metrics-port"], "scheduler_metrics_host"),
])
def test_metrics_servers_listen_where_their_setting_says(
    command: list[str], setting: str, settings_factory: Callable[..., Settings],
    database_url: str, tmp_path: Path,
) -> None:
    migrate(database_url)
    settings = settings_factory(database_url=database_url, **{setting: OTHER})
    port = free_port()
    proc = start_tally(settings, [*command, str(port)], tmp_path / "stage.log")
    try:
        wait_listening(OTHER, port, proc)
        assert not answers("127.0.0.1", port)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
