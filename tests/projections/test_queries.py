"""The read-model queries Tally's own tools use (the demo's report and checks)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from projections.ledger import create_month_partitions
from projections.queries import (
    MeterUsage,
    period_quantities,
    usage_event_count,
    usage_with_quota,
)
from runtime.postgres import connect, migrate

START = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2026, 12, 1, tzinfo=UTC)


def test_usage_is_read_with_its_quota_state_and_the_ledger_is_counted(database_url: str) -> None:
    migrate(database_url)
    with connect(database_url) as conn:
        assert usage_event_count(conn) == 0
        create_month_partitions(conn, [START])
        for event_id in ("e1", "e2"):
            conn.execute(
                "INSERT INTO tally.usage_events (event_id, tenant_id, meter, quantity, event_time,"
                " ingested_at, source, period_start, period_end, plan_id)"
                " VALUES (%s, 'acme', 'api_calls', 1, %s, %s, 'svc/t', %s, %s, 'free')",
                (event_id, START, START, START, END))
        conn.execute(
            "INSERT INTO tally.usage_by_period (tenant_id, meter, period_start, period_end,"
            " plan_id, quantity, event_count) VALUES"
            " ('beta', 'tokens', %(s)s, %(e)s, 'pro', 1834.5, 3),"
            " ('acme', 'api_calls', %(s)s, %(e)s, 'free', 2, 2)", {"s": START, "e": END})
        conn.execute(
            "INSERT INTO tally.quota_state (tenant_id, meter, period_start, used, \"limit\","
            " state, updated_at) VALUES ('acme', 'api_calls', %s, 2, 1000, 'ok', now())",
            (START,))

        assert usage_event_count(conn) == 2
        assert usage_with_quota(conn) == [
            MeterUsage("acme", "api_calls", Decimal(2), "free", "ok", Decimal(1000)),
            MeterUsage("beta", "tokens", Decimal("1834.5"), "pro", None, None),
        ]
        assert period_quantities(conn) == {("acme", "api_calls"): Decimal(2),
                                           ("beta", "tokens"): Decimal("1834.5")}
