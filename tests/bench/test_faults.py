"""The fault table's harness (`make faults`, bench/faults.py) on one scenario at a tiny
rate, through the same code path: SIGKILL of the projector while the SDK and the gateway
send. Its books must balance, and they must catch a loss: events deleted from the ledger
afterwards show up as lost, and the row fails."""

from __future__ import annotations

import psycopg
import pytest

from bench.faults import account, run_scenario
from bench.pipeline import pipeline

pytestmark = pytest.mark.e2e


def test_fault_harness_balances_the_books_of_a_projector_kill_and_catches_a_loss() -> None:
    with pipeline() as pipe:
        row, run = run_scenario(pipe, "SIGKILL projector", rate=100, seconds=11)
        assert row.passed, row
        assert row.published > 500 and row.duplicates > 0  # both entrances and re-sends
        assert (row.lost, row.dead_letters, row.stripe_duplicates) == (0, 0, 0)
        assert row.published == row.ledger + row.duplicates
        assert row.recovery_s is not None and any("SIGKILL projector" in n for n in row.notes)

        with psycopg.connect(pipe.settings.require_database(), autocommit=True) as conn:
            conn.execute("DELETE FROM tally.usage_events WHERE (tenant_id, event_id) IN"
                         " (SELECT tenant_id, event_id FROM tally.usage_events"
                         "  WHERE tenant_id = ANY(%s) LIMIT 7)", (run.tenants,))
        again = account(pipe, run, row.scenario, set())
        assert (again.lost, again.ledger) == (7, row.ledger - 7)
        assert any("7 accepted events not in the ledger" in n for n in again.notes)
