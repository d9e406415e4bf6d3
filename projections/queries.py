"""Reads of the read models for Tally's own tools (the demo's report and checks, the
benches). Finance's queries are the cookbook's (`projections.cookbook`)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from runtime.postgres import Connection, fetch_rows, fetch_value


@dataclass(frozen=True)
class MeterUsage:
    """A tenant's usage of a meter in a period (`usage_by_period`), with the plan it counted
    under and the meter's quota state, if one was projected (`quota_state`)."""

    tenant_id: str
    meter: str
    quantity: Decimal
    plan_id: str
    state: str | None
    limit: Decimal | None  # None: unlimited, or no quota state


def usage_event_count(conn: Connection) -> int:
    """Events in the ledger (`usage_events`)."""
    return int(fetch_value(conn, "SELECT count(*) FROM tally.usage_events"))


def usage_with_quota(conn: Connection) -> list[MeterUsage]:
    """Every row of `usage_by_period` with its quota state, by tenant and meter."""
    return fetch_rows(
        conn, MeterUsage,
        "SELECT u.tenant_id, u.meter, u.quantity, u.plan_id, q.state, q.\"limit\""
        " FROM tally.usage_by_period u LEFT JOIN tally.quota_state q"
        " USING (tenant_id, meter) ORDER BY 1, 2",
    )


def period_quantities(conn: Connection) -> dict[tuple[str, str], Decimal]:
    """(tenant, meter) -> quantity, from `usage_by_period` (meant for a single period)."""
    return {(t, m): q for t, m, q in conn.execute(
        "SELECT tenant_id, meter, quantity FROM tally.usage_by_period")}
