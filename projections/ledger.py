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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import NamedTuple

import psycopg

from schemas.codec import dumps

AGGREGATIONS = frozenset({"sum", "count", "max", "unique_count", "latest"})


class Accepted(NamedTuple):
    """An accepted event as the projection reads it: the fields of `AcceptedEvent`, in its
    order. A tuple, not the model, because the projector builds one per event
    (projections/fast_accepted.py) and a model instance costs several times more."""

    tenant_id: str
    event_id: str
    meter: str
    aggregation: str
    unique_value: str | None
    quantity: Decimal
    event_time: datetime
    ingested_at: datetime
    source: str
    dimensions: dict[str, str]
    period_start: datetime
    period_end: datetime
    plan_id: str
    late: bool
    adjustment: bool


_COLUMNS = (
    "seq, event_id, tenant_id, meter, aggregation, quantity, event_us, ingested_us, source,"
    " dimensions, period_start_us, period_end_us, plan_id, late, adjustment, unique_value"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_DAY_US = 86_400_000_000

# The batch's contribution of one rollup group, by aggregation (g: the group, u: its new
# distinct values, l: its latest event; {u} and {l} are NULL when the batch has no event of
# that aggregation, see _rollup).
_CONTRIBUTION = """CASE g.aggregation
        WHEN 'count' THEN g.event_count::numeric
        WHEN 'max' THEN g.peak
        WHEN 'unique_count' THEN coalesce({u}, 0)::numeric
        WHEN 'latest' THEN {l}
        ELSE g.total END"""

# How a stored rollup value {t} and the batch's contribution merge.
_MERGE = """CASE excluded.aggregation
            WHEN 'max' THEN greatest({t}.quantity, excluded.quantity)
            WHEN 'latest' THEN CASE WHEN {t}.value_time IS NULL
                OR excluded.value_time >= {t}.value_time
                THEN excluded.quantity ELSE {t}.quantity END
            ELSE {t}.quantity + excluded.quantity END"""


def _rollup(s: str, table: str, key: str, uniques: str, has_uniques: bool, has_latest: bool,
            extra_aggs: str = "", extra_cols: str = "", extra_vals: str = "",
            extra_join: str = "", extra_sets: str = "") -> str:
    """The upsert of one rollup table (`key`: day or period_start) from `new_rows`.

    The unique_count and latest parts are left out of a batch without such events: each
    costs a scan (and a sort) of the batch, and most batches have neither.
    """
    t = "r"  # the stored rollup row
    ctes, joins = "", ""
    if has_uniques:
        ctes += f"""
, {table}_new_uniques AS (
    INSERT INTO {s}.{uniques} (tenant_id, meter, {key}, unique_value)
    SELECT DISTINCT tenant_id, meter, {key}, unique_value FROM new_rows
    WHERE aggregation = 'unique_count' AND unique_value IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, meter, {key}
), {table}_unique_counts AS (
    SELECT tenant_id, meter, {key}, count(*) AS n FROM {table}_new_uniques
    GROUP BY tenant_id, meter, {key}
)"""
        joins += f"\n    LEFT JOIN {table}_unique_counts u USING (tenant_id, meter, {key})"
    if has_latest:
        ctes += f"""
, {table}_latest AS (
    SELECT DISTINCT ON (tenant_id, meter, {key}) tenant_id, meter, {key}, quantity, event_time
    FROM new_rows WHERE aggregation = 'latest'
    ORDER BY tenant_id, meter, {key}, event_time DESC, seq DESC
)"""
        joins += f"\n    LEFT JOIN {table}_latest l USING (tenant_id, meter, {key})"
    contribution = _CONTRIBUTION.format(u="u.n" if has_uniques else "NULL",
                                        l="l.quantity" if has_latest else "NULL")
    value_time = "l.event_time" if has_latest else "NULL::timestamptz"
    return f"""{ctes}
, {table}_groups AS (
    SELECT tenant_id, meter, {key}, min(aggregation) AS aggregation,
        count(*) AS event_count, sum(quantity) AS total, max(quantity) AS peak{extra_aggs}
    FROM new_rows GROUP BY tenant_id, meter, {key}
), {table}_upsert AS (
    INSERT INTO {s}.{table} AS {t}
        (tenant_id, meter, {key}{extra_cols}, aggregation, quantity, event_count, value_time)
    SELECT g.tenant_id, g.meter, g.{key}{extra_vals}, g.aggregation, {contribution},
        g.event_count, {value_time}
    FROM {table}_groups g{joins}{extra_join}
    ON CONFLICT (tenant_id, meter, {key}) DO UPDATE SET
        quantity = {_MERGE.format(t=t)},
        value_time = greatest({t}.value_time, excluded.value_time),
        event_count = {t}.event_count + excluded.event_count,
        aggregation = excluded.aggregation{extra_sets}
)"""


@cache
def _write_statement(s: str, has_uniques: bool, has_latest: bool) -> str:
    """The one statement that writes a batch into schema `s` (see the module docstring).

    New events are found by an anti-join on the ledger keys and their keys inserted with a
    plain INSERT: about a third cheaper than `ON CONFLICT DO NOTHING RETURNING` joined back
    to the batch. Still never a double count: a key inserted by another transaction after
    this statement's snapshot makes the INSERT fail with a unique violation, which undoes
    the whole statement. The projector's advisory lock keeps that from happening to it.
    """
    return (
        f"""
WITH new_rows AS MATERIALIZED (  -- one row per (tenant, event id): deduplicated in Python
    SELECT seq, event_id, tenant_id, meter, aggregation, unique_value, quantity,
        timestamptz 'epoch' + event_us * interval '1 microsecond' AS event_time,
        timestamptz 'epoch' + ingested_us * interval '1 microsecond' AS ingested_at,
        source, dimensions,
        timestamptz 'epoch' + period_start_us * interval '1 microsecond' AS period_start,
        timestamptz 'epoch' + period_end_us * interval '1 microsecond' AS period_end,
        plan_id, late, adjustment,
        ((timestamptz 'epoch' + event_us * interval '1 microsecond')
            AT TIME ZONE 'UTC')::date AS day
    FROM tally_incoming i
    WHERE NOT EXISTS (SELECT FROM {s}.usage_event_keys k
                      WHERE k.tenant_id = i.tenant_id AND k.event_id = i.event_id)
), new_keys AS (
    INSERT INTO {s}.usage_event_keys (tenant_id, event_id)
    SELECT tenant_id, event_id FROM new_rows
), ledger AS (
    INSERT INTO {s}.usage_events (event_id, tenant_id, meter, quantity, event_time,
        ingested_at, source, dimensions, period_start, period_end, plan_id, late, adjustment,
        aggregation, unique_value)
    SELECT event_id, tenant_id, meter, quantity, event_time, ingested_at, source, dimensions,
        period_start, period_end, plan_id, late, adjustment, aggregation, unique_value
    FROM new_rows
)"""
        + _rollup(s, "usage_daily", "day", "usage_daily_uniques", has_uniques, has_latest)
        # A period's plan is that of its last new event in the log (the greatest seq).
        + _rollup(
            s, "usage_by_period", "period_start", "usage_period_uniques", has_uniques,
            has_latest, ",\n        max(period_end) AS period_end, max(seq) AS last_seq",
            ", period_end, plan_id", ", g.period_end, p.plan_id",
            "\n    JOIN new_rows p ON p.seq = g.last_seq",
            ",\n        period_end = greatest(r.period_end, excluded.period_end),"
            "\n        plan_id = excluded.plan_id",
        )
        + "\nSELECT count(*) FROM new_rows"
    )


def accepted_problems(e: Accepted) -> list[str]:
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
    # The model takes times without an offset; staging cannot place them in time.
    if any(t.utcoffset() is None
           for t in (e.event_time, e.ingested_at, e.period_start, e.period_end)):
        problems.append("a time has no UTC offset")
    elif e.period_end <= e.period_start:
        problems.append("period_end is not after period_start")
    return problems


def _next_month(moment: datetime) -> datetime:
    return moment.replace(year=moment.year + moment.month // 12, month=moment.month % 12 + 1)


def ensure_month_partitions(
    conn: psycopg.Connection[tuple[object, ...]], staged: StagedEvents, known: set[datetime],
    schema: str = "tally",
) -> None:
    """Create the monthly ledger partitions the staged events need (`known` caches them;
    the caller clears it when its transaction rolls back)."""
    create_month_partitions(conn, staged.months - known, schema)
    known.update(staged.months)


def create_month_partitions(
    conn: psycopg.Connection[tuple[object, ...]], months: Iterable[datetime],
    schema: str = "tally",
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


@dataclass(frozen=True)
class StagedEvents:
    """A batch of accepted events ready for `write_staged`: the COPY data of its first
    occurrence of each (tenant, event id), and what the statement needs to know of it.

    Built without a connection, so the projector builds one batch's while Postgres runs
    the previous batch's transaction (projections/projector.py).
    """

    copy: bytes
    rows: int
    months: frozenset[datetime]  # the first instant of each month of an event time
    has_uniques: bool
    has_latest: bool


def stage_accepted(events: Sequence[Accepted]) -> StagedEvents:
    """Stage the events, in log order (latest-value ties and a period's plan depend on it).

    The projection's throughput is bound by this loop and one statement, so: lines are
    formatted here (several times faster than the driver's per-value adaptation); times go
    as exact integer microseconds since the epoch (formatting an aware datetime, or even
    comparing two decoded ones, costs more than the rest of the line), and the months are
    worked out from those integers; and text is escaped only in the rare line whose fields
    hold a backslash, tab, CR or LF.
    """
    seen: set[tuple[str, str]] = set()
    days: set[int] = set()
    aggregations: set[str] = set()
    lines: list[str] = []
    for e in events:
        key = (e.tenant_id, e.event_id)
        if key in seen:
            continue
        seen.add(key)
        start = (e.period_start - _EPOCH) // _MICROSECOND
        end = (e.period_end - _EPOCH) // _MICROSECOND
        event_us = (e.event_time - _EPOCH) // _MICROSECOND
        ingested_us = (e.ingested_at - _EPOCH) // _MICROSECOND
        days.add(event_us // _DAY_US)
        aggregations.add(e.aggregation)
        dims = dumps(e.dimensions).decode()
        flags = f"{'t' if e.late else 'f'}\t{'t' if e.adjustment else 'f'}\t"
        line = (
            f"{len(lines)}\t{e.event_id}\t{e.tenant_id}\t{e.meter}\t{e.aggregation}\t"
            f"{e.quantity!s}\t{event_us}\t{ingested_us}\t{e.source}\t{dims}\t{start}\t"
            f"{end}\t{e.plan_id}\t{flags}"
        )
        if line.count("\t") != 15 or "\\" in line or "\n" in line or "\r" in line:
            line = "\t".join([
                str(len(lines)), *map(_text, (e.event_id, e.tenant_id, e.meter,
                                             e.aggregation)),
                str(e.quantity), str(event_us), str(ingested_us), _text(e.source),
                _text(dims), str(start), str(end), _text(e.plan_id), flags,
            ])
        unique = "\\N" if e.unique_value is None else _text(e.unique_value)
        lines.append(f"{line}{unique}\n")
    months = frozenset(
        (_EPOCH + timedelta(days=day)).replace(day=1) for day in days)
    return StagedEvents("".join(lines).encode(), len(lines), months,
                        "unique_count" in aggregations, "latest" in aggregations)


def load_staged(conn: psycopg.Connection[tuple[object, ...]], staged: StagedEvents) -> None:
    """COPY the staged events into this session's staging table (emptied first: a
    transaction may load several batches, see the projector's fallback)."""
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS tally_incoming (seq bigint, event_id text,"
        " tenant_id text, meter text, aggregation text, unique_value text, quantity numeric,"
        " event_us bigint, ingested_us bigint, source text, dimensions jsonb,"
        " period_start_us bigint, period_end_us bigint, plan_id text, late boolean,"
        " adjustment boolean) ON COMMIT DELETE ROWS"
    )
    conn.execute("TRUNCATE tally_incoming")
    with conn.cursor().copy(f"COPY tally_incoming ({_COLUMNS}) FROM STDIN") as copy:
        copy.write(staged.copy)


def fold_staged(
    conn: psycopg.Connection[tuple[object, ...]], staged: StagedEvents, schema: str = "tally",
) -> int:
    """Insert the loaded events not yet in the ledger and fold them into the rollups (the
    one statement); return how many were new."""
    statement = _write_statement(schema, staged.has_uniques, staged.has_latest)
    row = conn.execute(statement).fetchone()
    return int(row[0]) if row else 0  # type: ignore[call-overload]


def write_staged(
    conn: psycopg.Connection[tuple[object, ...]], staged: StagedEvents, schema: str = "tally",
) -> int:
    """`load_staged` then `fold_staged`. Must run inside the caller's transaction, after
    `ensure_month_partitions`; returns how many events were new."""
    if not staged.rows:
        return 0
    load_staged(conn, staged)
    return fold_staged(conn, staged, schema)


def write_accepted(
    conn: psycopg.Connection[tuple[object, ...]], events: Sequence[Accepted],
    schema: str = "tally",
) -> int:
    """`write_staged` of `stage_accepted(events)`: the month partitions must exist."""
    return write_staged(conn, stage_accepted(events), schema)
