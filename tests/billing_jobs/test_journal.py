"""Reading the journal back (`tally jobs journal`): what failed or waits, newest first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from billing_jobs import journal
from runtime.postgres import connect
from tests.billing_jobs.conftest import sql


def _seed(db: str) -> None:
    sql(db, "INSERT INTO tally.stripe_pushes (idempotency_key, kind, tenant_id, request_summary,"
            " status, attempts, stripe_object_id, last_error, updated_at) VALUES"
            " ('k-old', 'meter_event', 'acme', '{}', 'failed', 6, NULL, 'boom',"
            "  now() - interval '2 hours'),"
            " ('k-new', 'invoice', 'beta', '{}', 'pending', 1, NULL, NULL,"
            "  now() - interval '1 hour'),"
            " ('k-done', 'customer', 'acme', '{}', 'succeeded', 1, 'cus_1', NULL, now())")


def test_journal_entries_list_the_chosen_statuses_newest_first_with_their_detail(db: str) -> None:
    _seed(db)
    with connect(db) as conn:
        open_calls = journal.entries(conn, ["failed", "pending"], limit=50)
        everything = journal.entries(conn, ["failed", "pending", "succeeded"], limit=50)
        latest = journal.entries(conn, ["failed", "pending", "succeeded"], limit=1)

    assert [(e.idempotency_key, e.status, e.kind, e.tenant_id, e.attempts, e.detail)
            for e in open_calls] == [("k-new", "pending", "invoice", "beta", 1, ""),
                                     ("k-old", "failed", "meter_event", "acme", 6, "boom")]
    assert [e.idempotency_key for e in everything] == ["k-done", "k-new", "k-old"]
    assert everything[0].detail == "cus_1"
    assert [e.idempotency_key for e in latest] == ["k-done"]


def test_tally_jobs_journal_prints_one_line_per_call_and_exits_1_when_one_failed(
    db: str, tmp_path: Path,
) -> None:
    _seed(db)
    result = subprocess.run(
        [sys.executable, "-m", "tally.cli", "jobs", "journal"], capture_output=True, text=True,
        env={**os.environ, "TALLY_HOME": str(tmp_path), "DATABASE_URL": db}, timeout=60,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[2:] == ["pending", "invoice", "beta", "k-new", "(attempts", "1)"]
    assert lines[1].split()[2:] == ["failed", "meter_event", "acme", "k-old", "(attempts", "6)",
                                    "boom"]
