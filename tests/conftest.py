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
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tally import devstack, kafka
from tally.settings import Settings


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
        if "KAFKA_BOOTSTRAP_SERVERS" not in env:
            address, pid = devstack.start_kafka(home)
            cleanups.append(lambda: devstack.stop_kafka(pid))
            env["KAFKA_BOOTSTRAP_SERVERS"] = address
        if "DATABASE_URL" not in env:
            url, pg_data = devstack.start_postgres(home)
            cleanups.append(lambda: devstack.stop_postgres(pg_data))
            env["DATABASE_URL"] = url
        yield env
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
