"""Writes accepted events into the ledger and its rollups, in the caller's transaction.

Exactly once: a row enters `usage_events` only if its (tenant_id, event_id) enters
`usage_event_keys` in the same statement, and the rollups are folded from exactly the rows
that entered. A redelivered event changes nothing. The caller commits the consumer offsets
in the same transaction (projections/projector.py).

Replayable (DESIGN guarantee 2): every rollup value is a function of the ledger rows and
their order in the log, never of how the log was cut into batches, so a rebuild from
offset 0 with other batch sizes gives the same rows. Each aggregation kind says how its
events fold, in a batch and across batches (domain/meters.py); the statement of a batch
is built from the kinds it holds. Order-dependent folds (`latest` ties) follow the log:
within a batch by position, across batches the later batch (a tenant's events are all on
one partition, keyed by tenant, so batches arrive in log order). Each ledger row keeps its
position in `tally.usage.accepted` (`log_offset`, `log_index`), so a fold over the ledger
alone (`tally.usage_as_of`) follows the same order.
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

from domain.meters import KINDS, by_kind_sql
from schemas.codec import dumps


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


# An accepted record as the projector read it: its offset in its partition, and its events
# to apply, each with its index in the record (the event's position in the log).
AcceptedRecord = tuple[int, Sequence[tuple[int, Accepted]]]

_COLUMNS = (
    "seq, event_id, tenant_id, meter, aggregation, quantity, event_us, ingested_us, source,"
    " dimensions, period_start_us, period_end_us, plan_id, late, adjustment, unique_value,"
    " log_offset, log_index"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_DAY_US = 86_400_000_000
# Postgres refuses numeric text whose exponent is beyond +-1000 (NUMERIC_MAX_PRECISION);
# the worker's rules keep far inside it (schemas/validation.py), older workers' may not.
_NUMERIC_EXPONENT_LIMIT = 1000

# The late and adjustment columns of a COPY line, by (late, adjustment).
_FLAGS = {(late, adjustment): f"{'t' if late else 'f'}\t{'t' if adjustment else 'f'}\t"
          for late in (False, True) for adjustment in (False, True)}

@dataclass(frozen=True)
class _Rollup:
    """A rollup table, the column it is keyed by (with tenant and meter), and its table of
    the unique values already counted."""

    table: str
    key: str
    uniques: str


_DAILY = _Rollup("usage_daily", "day", "usage_daily_uniques")
_BY_PERIOD = _Rollup("usage_by_period", "period_start", "usage_period_uniques")


def _rollup(s: str, rollup: _Rollup, kinds: frozenset[str], extra_aggs: str = "",
            extra_cols: str = "", extra_vals: str = "", extra_join: str = "",
            extra_sets: str = "") -> str:
    """The upsert of one rollup table from `new_rows`, whose events are of `kinds`.

    Only those kinds' SQL is in it: the CTEs of some (unique_count, latest) cost a scan
    and a sort of the batch, and most batches have events of one or two kinds.
    """
    defs = {name: kind for name, kind in KINDS.items() if name in kinds}
    fields = {"s": s, "table": rollup.table, "key": rollup.key, "uniques": rollup.uniques}
    ctes = "".join(k.rollup.ctes.format(kind=n, **fields) for n, k in defs.items())
    joins = "".join(k.rollup.join.format(kind=n, **fields) for n, k in defs.items())
    aggregates = "".join(f", {sql} AS {column}" for k in defs.values()
                         for column, sql in k.rollup.aggregates.items())
    value = by_kind_sql("g.aggregation", {n: k.rollup.value for n, k in defs.items()})
    times = {n: k.rollup.value_time for n, k in defs.items() if k.rollup.value_time is not None}
    value_time = by_kind_sql("g.aggregation", times) if times else "NULL::timestamptz"
    merge = by_kind_sql("excluded.aggregation", {n: k.rollup.merge for n, k in defs.items()})
    table, key = rollup.table, rollup.key
    return f"""{ctes}
, {table}_groups AS (
    SELECT tenant_id, meter, {key}, min(aggregation) AS aggregation,
        count(*) AS event_count{aggregates}{extra_aggs}
    FROM new_rows GROUP BY tenant_id, meter, {key}
), {table}_upsert AS (
    INSERT INTO {s}.{table} AS r
        (tenant_id, meter, {key}{extra_cols}, aggregation, quantity, event_count, value_time)
    SELECT g.tenant_id, g.meter, g.{key}{extra_vals}, g.aggregation, {value},
        g.event_count, {value_time}
    FROM {table}_groups g{joins}{extra_join}
    ON CONFLICT (tenant_id, meter, {key}) DO UPDATE SET
        quantity = {merge},
        value_time = greatest(r.value_time, excluded.value_time),
        event_count = r.event_count + excluded.event_count,
        aggregation = excluded.aggregation{extra_sets}
)"""


@cache
def _write_statement(s: str, kinds: frozenset[str]) -> str:
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
        plan_id, late, adjustment, log_offset, log_index,
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
        aggregation, unique_value, log_offset, log_index)
    SELECT event_id, tenant_id, meter, quantity, event_time, ingested_at, source, dimensions,
        period_start, period_end, plan_id, late, adjustment, aggregation, unique_value,
        log_offset, log_index
    FROM new_rows
)"""
        + _rollup(s, _DAILY, kinds)
        # A period's plan is that of its last new event in the log (the greatest seq).
        + _rollup(
            s, _BY_PERIOD, kinds, ",\n        max(period_end) AS period_end, max(seq) AS last_seq",
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
    elif not (e.quantity.as_tuple().exponent >= -_NUMERIC_EXPONENT_LIMIT  # type: ignore[operator]
              and e.quantity.adjusted() <= _NUMERIC_EXPONENT_LIMIT):
        problems.append(f"quantity {e.quantity} is beyond what Postgres numeric input takes")
    if e.aggregation not in KINDS:
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
    kinds: frozenset[str]  # the aggregation kinds of its events


def stage_accepted(records: Iterable[AcceptedRecord]) -> StagedEvents:
    """Stage the events of these records, in log order (`latest` ties and a period's plan
    depend on it), each with its position in the log.

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
    # The events of a batch share few distinct times (one period, a record's ingestion
    # time, the SDK's milliseconds): each is converted once. Its text is cached by the
    # reader (schemas/fast_usage.read_time), so a time repeats as the same object, whose
    # hash is computed once too.
    micros: dict[datetime, int] = {}
    for offset, pairs in records:
        for index, e in pairs:
            key = (e.tenant_id, e.event_id)
            if key in seen:
                continue
            seen.add(key)
            start = micros.get(e.period_start)
            if start is None:
                start = micros[e.period_start] = (e.period_start - _EPOCH) // _MICROSECOND
            end = micros.get(e.period_end)
            if end is None:
                end = micros[e.period_end] = (e.period_end - _EPOCH) // _MICROSECOND
            event_us = micros.get(e.event_time)
            if event_us is None:
                event_us = micros[e.event_time] = (e.event_time - _EPOCH) // _MICROSECOND
            ingested_us = micros.get(e.ingested_at)
            if ingested_us is None:
                ingested_us = micros[e.ingested_at] = (e.ingested_at - _EPOCH) // _MICROSECOND
            days.add(event_us // _DAY_US)
            aggregations.add(e.aggregation)
            dims = dumps(e.dimensions).decode() if e.dimensions else "{}"
            flags = _FLAGS[e.late, e.adjustment]
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
            lines.append(f"{line}{unique}\t{offset}\t{index}\n")
    months = frozenset(
        (_EPOCH + timedelta(days=day)).replace(day=1) for day in days)
    return StagedEvents("".join(lines).encode(), len(lines), months, frozenset(aggregations))


def load_staged(conn: psycopg.Connection[tuple[object, ...]], staged: StagedEvents) -> None:
    """COPY the staged events into this session's staging table (emptied first: a
    transaction may load several batches, see the projector's fallback)."""
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS tally_incoming (seq bigint, event_id text,"
        " tenant_id text, meter text, aggregation text, unique_value text, quantity numeric,"
        " event_us bigint, ingested_us bigint, source text, dimensions jsonb,"
        " period_start_us bigint, period_end_us bigint, plan_id text, late boolean,"
        " adjustment boolean, log_offset bigint, log_index int) ON COMMIT DELETE ROWS"
    )
    conn.execute("TRUNCATE tally_incoming")
    with conn.cursor().copy(f"COPY tally_incoming ({_COLUMNS}) FROM STDIN") as copy:
        copy.write(staged.copy)


def fold_staged(
    conn: psycopg.Connection[tuple[object, ...]], staged: StagedEvents, schema: str = "tally",
) -> int:
    """Insert the loaded events not yet in the ledger and fold them into the rollups (the
    one statement); return how many were new."""
    statement = _write_statement(schema, staged.kinds)
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
    conn: psycopg.Connection[tuple[object, ...]], records: Iterable[AcceptedRecord],
    schema: str = "tally",
) -> int:
    """`write_staged` of `stage_accepted(records)`: the month partitions must exist."""
    return write_staged(conn, stage_accepted(records), schema)
