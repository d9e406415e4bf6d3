"""Every failure a user can cause is one line saying what to do, and exit code 2.

Each case runs `tally` as a user does (a child process) against the session's real broker
and Postgres, or against an address where nothing listens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.devstack import free_port
from runtime.settings import Settings
from tests.kafka_helpers import publish_seed_catalog


def tally(*args: str, home: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "STRIPE_API_KEY",
                         "STRIPE_API_BASE")}
    return subprocess.run(
        [sys.executable, "-m", "tally.cli", *args], capture_output=True, text=True,
        env={**base, "TALLY_HOME": str(home), **env}, timeout=90,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one `tally: error:` line of a failed command, checked to be its only one, with
    exit code 2 and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tally: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def env_of(settings: Settings) -> dict[str, str]:
    return settings.to_env()


@pytest.fixture
def fresh(settings_factory: Callable[..., Settings], database_url: str) -> dict[str, str]:
    """A broker with empty topics and an empty (unmigrated) database."""
    return env_of(settings_factory(database_url=database_url))


@pytest.mark.parametrize(("args", "says"), [
    (("jobs", "invoice", "--now", "yesterday"), "is not an ISO 8601 time"),
    (("jobs", "reconcile", "--now", "2026-13-45"), "is not an ISO 8601 time"),
    (("jobs", "journal", "--limit", "-3"), "is not a whole number of at least 1"),
    (("jobs", "push-usage", "--now", "soon"), "is not an ISO 8601 time"),
    (("ingest", "serve", "--port", "70000"), "is not a port number"),
    (("api", "serve", "--port", "-1"), "is not a port number"),
    (("report", "--format", "xml"), "invalid choice: 'xml'"),
    (("report", "--cycle", "last-tuesday"), "--cycle"),
])
def test_bad_option_values_say_what_is_expected(args: tuple[str, ...], says: str,
                                                tmp_path: Path) -> None:
    assert says in one_error_line(tally(*args, home=tmp_path, env={}))


def test_invoicing_before_a_catalog_is_published_says_to_publish_one(
        fresh: dict[str, str], tmp_path: Path) -> None:
    line = one_error_line(tally("jobs", "invoice", home=tmp_path, env=fresh))
    assert "no plan catalog" in line and "tally plans publish" in line


def test_the_journal_before_migrating_says_to_migrate(fresh: dict[str, str],
                                                      tmp_path: Path) -> None:
    line = one_error_line(tally("jobs", "journal", home=tmp_path, env=fresh))
    assert "run `tally db migrate`" in line


@pytest.mark.parametrize("args", [
    ("plans", "publish", "tally/catalog/plans.toml"),
    ("jobs", "invoice"),
    ("stripe", "sync-catalog"),
])
def test_an_unreachable_kafka_says_how_to_get_one(args: tuple[str, ...], tmp_path: Path,
                                                  database_url: str) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    line = one_error_line(tally(*args, home=tmp_path, env={
        "KAFKA_BOOTSTRAP_SERVERS": nowhere, "DATABASE_URL": database_url}))
    assert f"cannot reach Kafka at {nowhere}" in line and "tally dev up" in line


@pytest.mark.parametrize("args", [
    ("db", "migrate"), ("jobs", "journal"), ("invoices", "list"), ("report",),
])
def test_an_unreachable_postgres_says_how_to_get_one(args: tuple[str, ...], tmp_path: Path,
                                                     stack: dict[str, str]) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    line = one_error_line(tally(*args, home=tmp_path, env={
        "KAFKA_BOOTSTRAP_SERVERS": stack["KAFKA_BOOTSTRAP_SERVERS"], "DATABASE_URL": nowhere}))
    assert "cannot connect to Postgres" in line and "DATABASE_URL" in line


@pytest.mark.parametrize("args", [
    ("jobs", "push-usage"), ("jobs", "reconcile"), ("stripe", "sync-catalog"),
])
def test_stripe_jobs_without_a_key_say_to_set_one(
        args: tuple[str, ...], settings_factory: Callable[..., Settings], database_url: str,
        tmp_path: Path) -> None:
    settings = settings_factory(database_url=database_url)
    publish_seed_catalog(settings)
    migrated = tally("db", "migrate", home=tmp_path, env=env_of(settings))
    assert migrated.returncode == 0, migrated.stderr
    line = one_error_line(tally(*args, home=tmp_path, env=env_of(settings)))
    assert "set STRIPE_API_KEY" in line
