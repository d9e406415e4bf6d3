"""`GET /v1/meters/{meter}/query`: a meter's exact value over the ledger, by window and
dimension.

The value of each (window, group) is the meter's aggregation kind folded over the ledger
rows in it, with the same SQL that defines the kind everywhere else
(`domain.meters.KINDS[kind].ledger_sql`: sum, count, max, unique count, latest with its tie
rule), so the answer is what the worker and the rollups count for the same events. Rows
are the ledger's (`tally.usage_events`): every counted event by its event time, late ones
included. Windows are calendar units in the asked time zone (`date_trunc` on local time),
so a day in Europe/Paris is Paris's midnight to midnight.

The ledger index (tenant_id, meter, event_time) serves a tenant's query; a query across
all tenants (admin trends) scans the month partitions the range touches.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from psycopg import sql

from api.errors import BadRequest
from domain.meters import KINDS
from runtime.postgres import AsyncConnection
from schemas.plans import MeterSpec

Window = Literal["minute", "hour", "day", "month"]
WINDOWS: tuple[Window, ...] = ("minute", "hour", "day", "month")
# The most windows one answer may hold (about a week of minutes, 27 years of days).
MAX_WINDOWS = 10_000
MAX_GROUP_BY = 8
MAX_FILTERS = 16
_WINDOW_LENGTH = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1),
                  "day": timedelta(days=1), "month": timedelta(days=28)}
_DEFAULT_RANGE = timedelta(days=30)


@dataclass(frozen=True)
class MeterQuery:
    """A validated query: every problem with the request is reported at once."""

    meter: str
    spec: MeterSpec
    tenants: tuple[str, ...] | None  # None: every tenant
    start: datetime
    end: datetime
    window: Window | None
    group_by: tuple[str, ...]
    filters: tuple[tuple[str, tuple[str, ...]], ...]  # key, any of these values
    tz: str


@dataclass(frozen=True)
class Row:
    """One window (or the whole range) of one group."""

    window_start: datetime
    window_end: datetime
    group: dict[str, str | None]
    value: Decimal
    events: int


def _clean(text: str, what: str, limit: int, problems: list[str]) -> str:
    if "\x00" in text or len(text) > limit:
        problems.append(f"{what} must be at most {limit} characters, without NUL")
    return text


def build(meter: str, spec: MeterSpec, *, tenants: tuple[str, ...] | None,
          start: datetime | None, end: datetime | None, window: Window | None,
          group_by: list[str], filters: list[str], tz: str, now: datetime) -> MeterQuery:
    """The query a request asks for; BadRequest listing every problem."""
    problems: list[str] = []
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(f"tz: {tz[:64]!r} is not an IANA time zone (like UTC, Europe/Paris)")
    end = _aware(end) if end is not None else now
    start = _aware(start) if start is not None else end - _DEFAULT_RANGE
    if start >= end:
        problems.append("from must be before to")
    elif window is not None and (end - start) / _WINDOW_LENGTH[window] > MAX_WINDOWS:
        problems.append(f"more than {MAX_WINDOWS} {window} windows between from and to: "
                        "ask for a shorter range or a longer window")
    if len(group_by) > MAX_GROUP_BY or len(set(group_by)) != len(group_by):
        problems.append(f"group_by: at most {MAX_GROUP_BY} distinct dimension keys")
    keys = tuple(_clean(k, "a group_by key", 64, problems) for k in group_by)
    wanted: dict[str, list[str]] = {}
    if len(filters) > MAX_FILTERS:
        problems.append(f"filter: at most {MAX_FILTERS}")
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"filter {item[:80]!r} is not key=value")
            continue
        wanted.setdefault(_clean(key, "a filter key", 64, problems), []).append(
            _clean(value, "a filter value", 256, problems))
    if problems:
        raise BadRequest("; ".join(dict.fromkeys(problems)))
    return MeterQuery(meter, spec, tenants, start, end, window, keys,
                      tuple((k, tuple(v)) for k, v in wanted.items()), tz)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def statement(q: MeterQuery) -> tuple[sql.Composed, dict[str, object]]:
    """The SQL of a query and its parameters."""
    params: dict[str, object] = {"meter": q.meter, "start": q.start, "end": q.end,
                                 "tz": q.tz, "all": q.tenants is None,
                                 "tenants": list(q.tenants or ())}
    if q.window is None:
        bucket = sql.SQL("%(start)s::timestamptz AS window_start,"
                         " %(end)s::timestamptz AS window_end")
    else:
        params["unit"] = q.window
        params["step"] = f"1 {q.window}"
        bucket = sql.SQL(
            "date_trunc(%(unit)s, event_time AT TIME ZONE %(tz)s) AT TIME ZONE %(tz)s"
            " AS window_start,"
            " (date_trunc(%(unit)s, event_time AT TIME ZONE %(tz)s) + %(step)s::interval)"
            " AT TIME ZONE %(tz)s AS window_end")
    groups = [sql.SQL("dimensions ->> {} AS {}").format(sql.Literal(k), sql.Identifier(f"g{i}"))
              for i, k in enumerate(q.group_by)]
    conditions = [sql.SQL("(dimensions ->> {}) = ANY({})").format(sql.Literal(k),
                                                                  sql.Literal(list(v)))
                  for k, v in q.filters]
    columns = sql.SQL(", ").join([bucket, *groups])
    group_count = 2 + len(groups)
    where = sql.SQL(" AND ").join([
        sql.SQL("meter = %(meter)s AND event_time >= %(start)s AND event_time < %(end)s"
                " AND (%(all)s OR tenant_id = ANY(%(tenants)s))"), *conditions])
    kind_sql = sql.SQL(KINDS[q.spec.aggregation].ledger_sql)
    query = sql.SQL(
        "SELECT {columns}, {value} AS value, count(*) AS events FROM tally.usage_events"
        " WHERE {where} GROUP BY {by} ORDER BY {by}").format(
        columns=columns, value=kind_sql, where=where,
        by=sql.SQL(", ").join(sql.Literal(i) for i in range(1, group_count + 1)))
    return query, params


async def run(conn: AsyncConnection, q: MeterQuery) -> list[Row]:
    """The rows of a query, windows in time order, groups by their values."""
    query, params = statement(q)
    try:
        cur = await conn.execute(query, params)
    except psycopg.errors.InvalidParameterValue as e:  # a zone Python knows, Postgres not
        raise BadRequest(f"tz: {e.diag.message_primary or e}") from e
    found = []
    for record in await cur.fetchall():
        start, end, *groups, total, events = record
        found.append(Row(start, end, dict(zip(q.group_by, groups, strict=True)),
                         total if isinstance(total, Decimal) else Decimal(total), int(events)))
    return found


async def top_tenants(conn: AsyncConnection, q: MeterQuery, limit: int
                      ) -> list[tuple[str, Decimal, int]]:
    """The tenants with the greatest value of the meter over [start, end): (tenant, value,
    events), greatest first, ties by tenant id. Filters apply; windows and groups do not."""
    conditions = [sql.SQL("(dimensions ->> {}) = ANY({})").format(sql.Literal(k),
                                                                  sql.Literal(list(v)))
                  for k, v in q.filters]
    where = sql.SQL(" AND ").join([
        sql.SQL("meter = %(meter)s AND event_time >= %(start)s AND event_time < %(end)s"
                " AND (%(all)s OR tenant_id = ANY(%(tenants)s))"), *conditions])
    kind_sql = sql.SQL(KINDS[q.spec.aggregation].ledger_sql)
    query = sql.SQL(
        "SELECT tenant_id, {value} AS value, count(*) AS events FROM tally.usage_events"
        " WHERE {where} GROUP BY tenant_id ORDER BY value DESC, tenant_id LIMIT %(limit)s"
    ).format(value=kind_sql, where=where)
    cur = await conn.execute(query, {"meter": q.meter, "start": q.start, "end": q.end,
                                     "all": q.tenants is None,
                                     "tenants": list(q.tenants or ()), "limit": limit})
    return [(str(t), Decimal(v), int(n)) for t, v, n in await cur.fetchall()]
