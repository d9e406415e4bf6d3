"""`tally db migrate`: idempotent, recorded, safe twice, concurrently, and across many
databases of one server (the finance role is cluster-wide)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from runtime.postgres import SQL_DIR, migrate, migration_files


def test_migrate_twice_applies_everything_once(database_url: str) -> None:
    first = migrate(database_url)
    assert first == [f"{v:03d}_{n}" for v, n, _ in migration_files()]
    assert migrate(database_url) == []


def test_concurrent_migrations_of_one_database_apply_each_version_once(
    database_url: str
) -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: migrate(database_url), range(4)))
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(f"{v:03d}_{n}" for v, n, _ in migration_files())
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT count(*), count(DISTINCT version)"
                            " FROM tally.schema_migrations").fetchone()
    assert rows == (len(migration_files()), len(migration_files()))


@pytest.fixture
def second_database(stack: dict[str, str]) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(stack["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield stack["DATABASE_URL"].rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(stack["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_two_databases_racing_to_create_the_finance_role_both_succeed(
    database_url: str, second_database: str
) -> None:
    """The real migration text, with a role name of its own so the race is fresh: the
    first transaction creates the role and holds; the second blocks on it, then finds it."""
    migrate(database_url)
    migrate(second_database)
    role = f"tally_finance_{uuid.uuid4().hex[:8]}"
    sql = (SQL_DIR / "004_finance_access.sql").read_text().replace("tally_finance", role)
    first = psycopg.connect(database_url)
    second = psycopg.connect(second_database)
    try:
        first.execute(sql)  # role created, not committed
        errors: list[BaseException] = []

        def run_second() -> None:
            try:
                second.execute(sql)
                second.commit()
            except BaseException as e:
                errors.append(e)

        racer = threading.Thread(target=run_second)
        racer.start()
        racer.join(1.0)
        assert racer.is_alive(), "the second CREATE ROLE should wait for the first"
        first.commit()
        racer.join(10)
        assert not errors, errors
        for conn in (first, second):
            granted = conn.execute("SELECT has_table_privilege(%s, 'tally.usage_by_period',"
                                   " 'SELECT')", (role,)).fetchone()
            assert granted == (True,)
    finally:
        for conn in (first, second):
            conn.rollback()
            conn.execute(f"DROP OWNED BY {role}")
            conn.commit()
            conn.close()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {role}")
