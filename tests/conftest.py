"""Shared fixtures: one real broker and one real Postgres per test session.

Order of preference: `KAFKA_BOOTSTRAP_SERVERS` / `DATABASE_URL` from the environment;
else a Docker engine through testcontainers; else the embedded stack (Tansu + embedded
Postgres), started here exactly as `tally dev up` starts it. Every test gets its own topic
prefix and its own database, so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from devtools import devstack
from devtools.child import healthy, start_tally
from runtime import kafka
from runtime.settings import Settings


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def stack() -> Iterator[dict[str, str]]:
    """Addresses of the session's broker and Postgres server."""
    env = {k: os.environ[k] for k in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL") if k in os.environ}
    cleanups: list[Callable[[], None]] = []
    home = Path(tempfile.mkdtemp(prefix="tally-test-"))
    try:
        if len(env) < 2 and _docker_answers():  # pragma: no cover - no Docker on CI here
            from testcontainers.kafka import KafkaContainer
            from testcontainers.postgres import PostgresContainer

            if "KAFKA_BOOTSTRAP_SERVERS" not in env:
                k = KafkaContainer().with_kraft().start()
                cleanups.append(k.stop)
                env["KAFKA_BOOTSTRAP_SERVERS"] = k.get_bootstrap_server()
            if "DATABASE_URL" not in env:
                pg = PostgresContainer("postgres:17", driver=None).start()
                cleanups.append(pg.stop)
                env["DATABASE_URL"] = pg.get_connection_url()
        with devstack.embedded_where_missing(home, env) as complete:
            yield complete
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def database_url(stack: dict[str, str]) -> Iterator[str]:
    """A fresh, empty database for this test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin_url = stack["DATABASE_URL"]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, query = admin_url.partition("?")
    url = base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")
    yield url
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Postgres server of this test alone, to stop and restart (same port):
    `devstack.stop_postgres(pg_data)`, `devstack.restart_postgres(pg_data)`."""
    home = tmp_path / "pg"
    home.mkdir()
    url, pg_data = devstack.start_postgres(home)
    yield url, pg_data
    devstack.stop_postgres(pg_data)


@pytest.fixture
def settings_factory(stack: dict[str, str]) -> Callable[..., Settings]:
    """Settings with a fresh topic prefix (topics created), over the session's stack."""

    def make(database_url: str | None = None, partitions: int = 2, **overrides: object) -> Settings:
        tag = uuid.uuid4().hex[:10]
        settings = Settings(
            kafka_bootstrap_servers=stack["KAFKA_BOOTSTRAP_SERVERS"],
            database_url=database_url,
            topic_prefix=f"t{tag}.",
            worker_id=f"tally-worker-{tag}",
            partitions=partitions,
            **overrides,  # type: ignore[arg-type]
        )
        asyncio.run(kafka.ensure_topics(settings))
        return settings

    return make


class WorkerProcess:
    """`tally worker` as a child process, as an operator runs it."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.web_port = devstack.free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.proc = start_tally(
            self.settings, ["worker", "--web-port", str(self.web_port), "--loglevel", "warning"],
            self.log_path)
        return self

    def kill(self) -> None:
        """SIGKILL: no flush, no commit, as in a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"worker did not stop on SIGTERM\n{self.log()}") from None
        return int(self.proc.returncode)

    def log(self) -> str:
        return self.log_path.read_text()[-5000:] if self.log_path.exists() else ""

    def healthy(self) -> bool:
        """Up, with the plan catalog loaded (GET /healthz answers 200)."""
        return healthy(self.web_port)

    def counted(self) -> float:
        """Events the worker has counted so far (its Prometheus counter); 0 while down."""
        return self.metric('tally_worker_events_total{outcome="counted"}')

    def metric(self, sample: str) -> float:
        """The value of one sample of /metrics (name and labels as printed); 0 while down
        or not yet reported."""
        try:
            text = self.metrics()
        except OSError:
            return 0.0
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/metrics", timeout=2) as r:
            return str(r.read().decode())


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[[Settings], WorkerProcess]]:
    """Start workers for a test; every one still running at the end is stopped."""
    started: list[WorkerProcess] = []

    def make(settings: Settings) -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"worker-{len(started)}.log").start()
        started.append(w)
        return w

    yield make
    for w in started:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


@pytest.fixture
def catalog_worker(
    settings_factory: Callable[..., Settings],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> tuple[Settings, WorkerProcess]:
    """A running worker over fresh topics, with the seed plan catalog published."""
    from tests.kafka_helpers import publish_seed_catalog

    settings = settings_factory()
    publish_seed_catalog(settings)
    return settings, worker_factory(settings)
