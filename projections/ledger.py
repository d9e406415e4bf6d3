"""Writes accepted events into the ledger and its rollups, in the caller's transaction.

Exactly once: a row enters `usage_events` only if its (tenant_id, event_id) enters
`usage_event_keys` in the same statement, and the rollups are folded from exactly the rows
that entered. A redelivered event changes nothing. The caller commits the consumer offsets
in the same transaction (projections/projector.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import psycopg

from schemas.codec import dumps
from schemas.records import AcceptedEvent

_COLUMNS = (
    "seq, event_id, tenant_id, meter, aggregation, quantity, event_time, ingested_at, source,"
    " dimensions, period_start, period_end, plan_id, late, adjustment"
)

# Rollups fold a batch per meter aggregation: `max` meters (gauges such as storage) keep
# the greatest value, every other meter adds up (`count` meters add their event count).
_FOLD = "CASE WHEN aggregation = 'count' THEN count(*)::numeric ELSE sum(quantity) END"


def _rollups(kind: str, where: str, fold: str, merge: str) -> str:
    """The daily and per-period upserts for the new rows matching `where`."""
    return f"""
, daily_{kind} AS (
    INSERT INTO tally.usage_daily AS d (tenant_id, meter, day, quantity, event_count)
    SELECT tenant_id, meter, (event_time AT TIME ZONE 'UTC')::date, {fold}, count(*)
    FROM new_rows WHERE {where}
    GROUP BY tenant_id, meter, (event_time AT TIME ZONE 'UTC')::date, aggregation
    ON CONFLICT (tenant_id, meter, day) DO UPDATE SET
        quantity = {merge.format(t="d")},
        event_count = d.event_count + excluded.event_count
), periods_{kind} AS (
    INSERT INTO tally.usage_by_period AS p
        (tenant_id, meter, period_start, period_end, plan_id, quantity, event_count)
    SELECT tenant_id, meter, period_start, max(period_end), max(plan_id), {fold}, count(*)
    FROM new_rows WHERE {where}
    GROUP BY tenant_id, meter, period_start, aggregation
    ON CONFLICT (tenant_id, meter, period_start) DO UPDATE SET
        quantity = {merge.format(t="p")},
        event_count = p.event_count + excluded.event_count,
        plan_id = excluded.plan_id
)"""


_WRITE = (
    """
WITH fresh AS (
    SELECT DISTINCT ON (tenant_id, event_id) *
    FROM incoming ORDER BY tenant_id, event_id, seq
), new_keys AS (
    INSERT INTO tally.usage_event_keys (tenant_id, event_id)
    SELECT tenant_id, event_id FROM fresh
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, event_id
), new_rows AS (
    SELECT f.* FROM fresh f JOIN new_keys k USING (tenant_id, event_id)
), ledger AS (
    INSERT INTO tally.usage_events (event_id, tenant_id, meter, quantity, event_time,
        ingested_at, source, dimensions, period_start, period_end, plan_id, late, adjustment)
    SELECT event_id, tenant_id, meter, quantity, event_time, ingested_at, source, dimensions,
        period_start, period_end, plan_id, late, adjustment
    FROM new_rows
)"""
    + _rollups("add", "aggregation <> 'max'", _FOLD, "{t}.quantity + excluded.quantity")
    + _rollups("max", "aggregation = 'max'", "max(quantity)",
               "greatest({t}.quantity, excluded.quantity)")
    + "\nSELECT count(*) FROM new_rows"
)


def _month_start(moment: datetime) -> datetime:
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _next_month(moment: datetime) -> datetime:
    return moment.replace(year=moment.year + moment.month // 12, month=moment.month % 12 + 1)


def ensure_month_partitions(
    conn: psycopg.Connection[tuple[object, ...]], events: Sequence[AcceptedEvent],
    known: set[datetime],
) -> None:
    """Create the monthly ledger partitions the events need (`known` caches them)."""
    for start in sorted({_month_start(e.event_time) for e in events} - known):
        name = f"usage_events_y{start.year:04d}m{start.month:02d}"
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS tally.{name} PARTITION OF tally.usage_events "
            f"FOR VALUES FROM ('{start.isoformat()}') TO ('{_next_month(start).isoformat()}')"
        )
        known.add(start)


def write_accepted(
    conn: psycopg.Connection[tuple[object, ...]], events: Sequence[AcceptedEvent]
) -> int:
    """Insert the events not yet in the ledger and fold them into the rollups.

    Returns how many were new. Must run inside the caller's transaction.
    """
    if not events:
        return 0
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS incoming (seq bigint, event_id text, tenant_id text,"
        " meter text, aggregation text, quantity numeric, event_time timestamptz,"
        " ingested_at timestamptz, source text, dimensions jsonb, period_start timestamptz,"
        " period_end timestamptz, plan_id text, late boolean, adjustment boolean)"
        " ON COMMIT DELETE ROWS"
    )
    with conn.cursor().copy(f"COPY incoming ({_COLUMNS}) FROM STDIN") as copy:
        for seq, e in enumerate(events):
            copy.write_row((
                seq, e.event_id, e.tenant_id, e.meter, e.aggregation, e.quantity, e.event_time,
                e.ingested_at, e.source, dumps(e.dimensions).decode(), e.period_start,
                e.period_end, e.plan_id, e.late, e.adjustment,
            ))
    row = conn.execute(_WRITE).fetchone()
    return int(row[0]) if row else 0  # type: ignore[call-overload]
