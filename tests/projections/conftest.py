"""Module-scoped variants of the session fixtures, for tests that share one data set."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from runtime import kafka
from runtime.settings import Settings


@pytest.fixture(scope="module")
def module_database_url(stack: dict[str, str]) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin_url = stack["DATABASE_URL"]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, query = admin_url.partition("?")
    yield base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def settings_factory_module(stack: dict[str, str]) -> Callable[..., Settings]:
    def make(database_url: str | None = None, partitions: int = 2) -> Settings:
        tag = uuid.uuid4().hex[:10]
        settings = Settings(kafka_bootstrap_servers=stack["KAFKA_BOOTSTRAP_SERVERS"],
                            database_url=database_url, topic_prefix=f"t{tag}.",
                            worker_id=f"tally-worker-{tag}", partitions=partitions)
        asyncio.run(kafka.ensure_topics(settings))
        return settings

    return make
