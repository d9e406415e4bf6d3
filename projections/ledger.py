"""Writes accepted events into the ledger and its rollups, in the caller's transaction.

Exactly once: a row enters `usage_events` only if its (tenant_id, event_id) enters
`usage_event_keys` in the same statement, and the rollups are folded from exactly the rows
that entered. A redelivered event changes nothing. The caller commits the consumer offsets
in the same transaction (projections/projector.py).

Replayable (DESIGN guarantee 2): every rollup value is a function of the ledger rows and
their order in the log, never of how the log was cut into batches, so a rebuild from
offset 0 with other batch sizes gives the same rows. Per aggregation, like the worker's
counters (streams/aggregation.py):
- sum: quantities add up; count: events add up;
- max: the greatest quantity;
- unique_count: distinct `unique_value`s, kept in `usage_{daily,period}_uniques`; a value
  adds 1 only when its helper row is new (same rule as the ledger keys);
- latest: the quantity of the event with the greatest event time; on a tie the later one
  in the log wins (within a batch by position, across batches the later batch: a tenant's
  events are all on one partition, keyed by tenant, so batches arrive in log order).
`plan_id` of a period is the plan of its last event in the log; `period_end` the greatest.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache

import psycopg

from schemas.codec import dumps
from schemas.records import AcceptedEvent

AGGREGATIONS = frozenset({"sum", "count", "max", "unique_count", "latest"})

_COLUMNS = (
    "seq, event_id, tenant_id, meter, aggregation, quantity, event_us, ingested_us, source,"
    " dimensions, period_start, period_end, plan_id, late, adjustment, unique_value"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

# The batch's contribution of one rollup group, by aggregation (g: the group, u: its new
# distinct values, l: its latest event).
_CONTRIBUTION = """CASE g.aggregation
        WHEN 'count' THEN g.event_count::numeric
        WHEN 'max' THEN g.peak
        WHEN 'unique_count' THEN coalesce(u.n, 0)::numeric
        WHEN 'latest' THEN l.quantity
        ELSE g.total END"""

# How a stored rollup value {t} and the batch's contribution merge.
_MERGE = """CASE excluded.aggregation
            WHEN 'max' THEN greatest({t}.quantity, excluded.quantity)
            WHEN 'latest' THEN CASE WHEN {t}.value_time IS NULL
                OR excluded.value_time >= {t}.value_time
                THEN excluded.quantity ELSE {t}.quantity END
            ELSE {t}.quantity + excluded.quantity END"""


def _rollup(s: str, table: str, key: str, uniques: str, extra_aggs: str = "",
            extra_cols: str = "", extra_vals: str = "", extra_sets: str = "") -> str:
    """The upsert of one rollup table (`key`: day or period_start) from `new_rows`."""
    t = "r"  # the stored rollup row
    return f"""
, {table}_new_uniques AS (
    INSERT INTO {s}.{uniques} (tenant_id, meter, {key}, unique_value)
    SELECT DISTINCT tenant_id, meter, {key}, unique_value FROM new_rows
    WHERE aggregation = 'unique_count' AND unique_value IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, meter, {key}
), {table}_unique_counts AS (
    SELECT tenant_id, meter, {key}, count(*) AS n FROM {table}_new_uniques
    GROUP BY tenant_id, meter, {key}
), {table}_latest AS (
    SELECT DISTINCT ON (tenant_id, meter, {key}) tenant_id, meter, {key}, quantity, event_time
    FROM new_rows WHERE aggregation = 'latest'
    ORDER BY tenant_id, meter, {key}, event_time DESC, seq DESC
), {table}_groups AS (
    SELECT tenant_id, meter, {key}, min(aggregation) AS aggregation,
        count(*) AS event_count, sum(quantity) AS total, max(quantity) AS peak{extra_aggs}
    FROM new_rows GROUP BY tenant_id, meter, {key}
), {table}_upsert AS (
    INSERT INTO {s}.{table} AS {t}
        (tenant_id, meter, {key}{extra_cols}, aggregation, quantity, event_count, value_time)
    SELECT g.tenant_id, g.meter, g.{key}{extra_vals}, g.aggregation, {_CONTRIBUTION},
        g.event_count, l.event_time
    FROM {table}_groups g
    LEFT JOIN {table}_unique_counts u USING (tenant_id, meter, {key})
    LEFT JOIN {table}_latest l USING (tenant_id, meter, {key})
    ON CONFLICT (tenant_id, meter, {key}) DO UPDATE SET
        quantity = {_MERGE.format(t=t)},
        value_time = greatest({t}.value_time, excluded.value_time),
        event_count = {t}.event_count + excluded.event_count,
        aggregation = excluded.aggregation{extra_sets}
)"""


@cache
def _write_statement(s: str) -> str:
    """The one statement that writes a batch into schema `s` (see the module docstring)."""
    return (
        f"""
WITH fresh AS (  -- one row per (tenant, event id): deduplicated in Python
    SELECT seq, event_id, tenant_id, meter, aggregation, unique_value, quantity,
        timestamptz 'epoch' + event_us * interval '1 microsecond' AS event_time,
        timestamptz 'epoch' + ingested_us * interval '1 microsecond' AS ingested_at,
        source, dimensions, period_start, period_end, plan_id, late, adjustment
    FROM tally_incoming
), new_keys AS (
    INSERT INTO {s}.usage_event_keys (tenant_id, event_id)
    SELECT tenant_id, event_id FROM fresh
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, event_id
), new_rows AS MATERIALIZED (
    SELECT f.*, (f.event_time AT TIME ZONE 'UTC')::date AS day
    FROM fresh f JOIN new_keys k USING (tenant_id, event_id)
), ledger AS (
    INSERT INTO {s}.usage_events (event_id, tenant_id, meter, quantity, event_time,
        ingested_at, source, dimensions, period_start, period_end, plan_id, late, adjustment,
        aggregation, unique_value)
    SELECT event_id, tenant_id, meter, quantity, event_time, ingested_at, source, dimensions,
        period_start, period_end, plan_id, late, adjustment, aggregation, unique_value
    FROM new_rows
)"""
        + _rollup(s, "usage_daily", "day", "usage_daily_uniques")
        + _rollup(
            s, "usage_by_period", "period_start", "usage_period_uniques",
            ",\n        max(period_end) AS period_end,"
            " (array_agg(plan_id ORDER BY seq DESC))[1] AS plan_id",
            ", period_end, plan_id", ", g.period_end, g.plan_id",
            ",\n        period_end = greatest(r.period_end, excluded.period_end),"
            "\n        plan_id = excluded.plan_id",
        )
        + "\nSELECT count(*) FROM new_rows"
    )


def accepted_problems(e: AcceptedEvent) -> list[str]:
    """Every reason the ledger would refuse this event (checked before COPY, so one bad
    event is reported on its own instead of failing the batch's statement)."""
    problems = []
    if not e.quantity.is_finite():
        problems.append(f"quantity {e.quantity} is not a finite number")
    elif e.quantity < Decimal(0):
        problems.append(f"quantity {e.quantity} is negative")
    if e.aggregation not in AGGREGATIONS:
        problems.append(f"unknown aggregation {e.aggregation!r}")
    texts = [e.tenant_id, e.event_id, e.meter, e.source, e.plan_id, e.unique_value or "",
             *e.dimensions, *e.dimensions.values()]
    if any("\x00" in text for text in texts):
        problems.append("text contains a NUL character (Postgres text cannot hold it)")
    if e.period_end <= e.period_start:
        problems.append("period_end is not after period_start")
    return problems


def _next_month(moment: datetime) -> datetime:
    return moment.replace(year=moment.year + moment.month // 12, month=moment.month % 12 + 1)


def ensure_month_partitions(
    conn: psycopg.Connection[tuple[object, ...]], events: Sequence[AcceptedEvent],
    known: set[datetime], schema: str = "tally",
) -> None:
    """Create the monthly ledger partitions the events need (`known` caches them; the
    caller clears it when its transaction rolls back)."""
    months: set[tuple[int, int]] = set()
    for e in events:  # hot path: a tuple per event, a datetime per month
        t = e.event_time
        if offset := t.utcoffset():
            t = t - offset
        months.add((t.year, t.month))
    starts = {datetime(y, m, 1, tzinfo=UTC) for y, m in months}
    create_month_partitions(conn, starts - known, schema)
    known.update(starts)


def create_month_partitions(
    conn: psycopg.Connection[tuple[object, ...]], months: set[datetime], schema: str = "tally"
) -> None:
    for start in sorted(months):
        name = f"usage_events_y{start.year:04d}m{start.month:02d}"
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.{name} PARTITION OF {schema}.usage_events "
            f"FOR VALUES FROM ('{start.isoformat()}') TO ('{_next_month(start).isoformat()}')"
        )


_ESCAPE = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _text(value: str) -> str:
    """A value in COPY's text format."""
    return value.translate(_ESCAPE)


def _copy_lines(events: Sequence[AcceptedEvent]) -> list[str]:
    """COPY text lines of the events, first occurrence of each (tenant, event id) only.

    The projection's throughput is bound by this loop and one statement, so: lines are
    formatted here (several times faster than the driver's per-value adaptation); event and
    ingestion times go as exact integer microseconds since the epoch (formatting an aware
    datetime costs more than the rest of the line); period bounds are formatted once; and
    text is escaped only in the rare line whose fields hold a backslash, tab, CR or LF.
    """
    seen: set[tuple[str, str]] = set()
    periods: dict[datetime, str] = {}
    lines: list[str] = []
    for e in events:
        key = (e.tenant_id, e.event_id)
        if key in seen:
            continue
        seen.add(key)
        start = periods.get(e.period_start) or periods.setdefault(
            e.period_start, e.period_start.isoformat())
        end = periods.get(e.period_end) or periods.setdefault(
            e.period_end, e.period_end.isoformat())
        dims = dumps(e.dimensions).decode()
        flags = f"{'t' if e.late else 'f'}\t{'t' if e.adjustment else 'f'}\t"
        line = (
            f"{len(lines)}\t{e.event_id}\t{e.tenant_id}\t{e.meter}\t{e.aggregation}\t"
            f"{e.quantity}\t{(e.event_time - _EPOCH) // _MICROSECOND}\t"
            f"{(e.ingested_at - _EPOCH) // _MICROSECOND}\t{e.source}\t{dims}\t{start}\t"
            f"{end}\t{e.plan_id}\t{flags}"
        )
        if line.count("\t") != 15 or "\\" in line or "\n" in line or "\r" in line:
            line = "\t".join([
                str(len(lines)), *map(_text, (e.event_id, e.tenant_id, e.meter,
                                             e.aggregation)),
                str(e.quantity), str((e.event_time - _EPOCH) // _MICROSECOND),
                str((e.ingested_at - _EPOCH) // _MICROSECOND), _text(e.source), _text(dims),
                start, end, _text(e.plan_id), flags,
            ])
        unique = "\\N" if e.unique_value is None else _text(e.unique_value)
        lines.append(f"{line}{unique}\n")
    return lines


def write_accepted(
    conn: psycopg.Connection[tuple[object, ...]], events: Sequence[AcceptedEvent],
    schema: str = "tally",
) -> int:
    """Insert the events not yet in the ledger and fold them into the rollups.

    `events` must be in log order (latest-value ties and a period's plan depend on it).
    Returns how many were new. Must run inside the caller's transaction; may run several
    times in one (the staging table is emptied first).
    """
    if not events:
        return 0
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS tally_incoming (seq bigint, event_id text,"
        " tenant_id text, meter text, aggregation text, unique_value text, quantity numeric,"
        " event_us bigint, ingested_us bigint, source text, dimensions jsonb,"
        " period_start timestamptz, period_end timestamptz, plan_id text, late boolean,"
        " adjustment boolean) ON COMMIT DELETE ROWS"
    )
    conn.execute("TRUNCATE tally_incoming")
    with conn.cursor().copy(f"COPY tally_incoming ({_COLUMNS}) FROM STDIN") as copy:
        copy.write("".join(_copy_lines(events)))
    row = conn.execute(_write_statement(schema)).fetchone()
    return int(row[0]) if row else 0  # type: ignore[call-overload]
