"""Listing commands take --json: the same rows as one JSON array (`tally invoices list
--json` prints one object per invoice: tests/billing_jobs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.postgres import migrate
from tests.tally.test_errors import tally


@pytest.mark.parametrize("args", [
    ("jobs", "journal"), ("notify", "channels", "list"),
    ("notify", "dead-letters"),
])
def test_listings_print_json_with_json(args: tuple[str, ...], database_url: str,
                                       tmp_path: Path) -> None:
    migrate(database_url)
    if args[:3] == ("notify", "channels", "list"):
        added = tally("notify", "channels", "add", "acme", "email", "ops@example.com",
                      home=tmp_path, env={"DATABASE_URL": database_url})
        assert added.returncode == 0, added.stderr
    result = tally(*args, "--json", home=tmp_path, env={"DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    if args[:3] == ("notify", "channels", "list"):
        assert rows[0]["tenant_id"] == "acme" and "signing_secret" not in rows[0]
