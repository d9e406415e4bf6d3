"""The three folds of a meter agree for every aggregation kind (hypothesis, real Postgres):
the worker's counters (domain.aggregation.Counter), the projector's rollups
(`usage_by_period`, `usage_daily`, written by projections/ledger.py) and the ledger's as-of
fold (`tally.usage_as_of`), on the same log. The log has what makes them disagree if any
of them spells a kind its own way: event times tied on purpose, event ids in another order
than the log, several events of one record (one ingestion time), redeliveries, and the log
cut into projector transactions after any record."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from domain.aggregation import Counter
from domain.meters import ledger_value_sql
from projections.ledger import Accepted, ensure_month_partitions, stage_accepted, write_staged
from runtime.postgres import migrate, migration_files
from tests.projections.support import AGGREGATION_OF

PERIODS = [(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
           (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))]
# Few event times, two of them on one day: ties on event time are common, within a record
# and across records, and days and periods hold several groups.
TIMES = [start + offset for start, _ in PERIODS
         for offset in (timedelta(0), timedelta(minutes=1), timedelta(days=29))]
LEDGER_TABLES = ("usage_event_keys", "usage_events", "usage_daily", "usage_by_period",
                 "usage_daily_uniques", "usage_period_uniques")

Group = tuple[str, str, Any]  # tenant, meter, period start or day
Folded = dict[Group, tuple[Decimal, int]]


@dataclass(frozen=True)
class Record:
    """One accepted batch record: its tenant's events, all ingested at one moment."""

    offset: int
    events: list[Accepted]


def event(tenant: str, event_id: str, meter: str, quantity: Decimal, at: datetime,
          ingested: datetime, unique: str | None = None) -> Accepted:
    """An accepted event of the period that holds `at`."""
    start, end = next(p for p in PERIODS if p[0] <= at < p[1])
    return Accepted(tenant, event_id, meter, AGGREGATION_OF[meter], unique, quantity, at,
                    ingested, "svc/test", {}, start, end, "starter", False, False)


@st.composite
def records(draw: st.DrawFn, offset: int, ids: list[int], ingested: datetime) -> Record:
    """A record of one tenant, with events of one or two meters (ids taken from `ids`)."""
    tenant = draw(st.sampled_from(["acme", "bolt"]))
    meters = draw(st.lists(st.sampled_from(sorted(AGGREGATION_OF)), min_size=1, max_size=2,
                           unique=True))
    events = []
    for _ in range(draw(st.integers(1, 5))):
        meter = draw(st.sampled_from(meters))
        unique = draw(st.sampled_from(["u1", "u2", "u3", None])) \
            if AGGREGATION_OF[meter] == "unique_count" else None
        quantity = draw(st.decimals(min_value=0, max_value=100,
                                    places=draw(st.integers(0, 2))))
        events.append(event(tenant, f"e{ids.pop():03d}", meter, quantity,
                            draw(st.sampled_from(TIMES)), ingested, unique))
    return Record(offset, events)


@st.composite
def logs(draw: st.DrawFn) -> tuple[list[Record], list[int]]:
    """An accepted-events log and where the projector's transactions end (record indexes).

    Event ids are handed out in no particular log order; ingestion times never go back in
    the log, and a record's events share one (as the worker writes them)."""
    ids = list(draw(st.permutations(range(64))))
    ingested = datetime(2027, 1, 2, tzinfo=UTC)
    log: list[Record] = []
    for offset in range(draw(st.integers(1, 8))):
        ingested += timedelta(seconds=draw(st.integers(0, 1)))
        log.append(draw(records(offset, ids, ingested)))
    # Redelivery: records sent again later in the log (the same events, new offsets).
    for again in draw(st.lists(st.sampled_from(range(len(log))), max_size=2)):
        log.append(Record(len(log), log[again].events))
    cuts = draw(st.lists(st.integers(1, len(log)), max_size=3))
    return log, sorted({*cuts, len(log)})


def _tied_in_one_record() -> tuple[list[Record], list[int]]:
    """Two `latest` readings at one event time in one record, ids against the log order."""
    at, ingested = TIMES[0], datetime(2027, 1, 2, tzinfo=UTC)
    return [Record(0, [event("acme", "e2", "gpu_temp", Decimal(5), at, ingested),
                       event("acme", "e1", "gpu_temp", Decimal(7), at, ingested)])], [1]


def counters(records: list[Record]) -> tuple[Folded, Folded]:
    """What the worker's counters hold per period, and the same fold per day: each
    (tenant, event id) folded once, at its first place in the log."""
    by_period: dict[Group, Counter] = {}
    by_day: dict[Group, Counter] = {}
    seen: set[tuple[str, str]] = set()
    for record in records:
        for e in record.events:
            if (e.tenant_id, e.event_id) in seen:
                continue
            seen.add((e.tenant_id, e.event_id))
            for groups, key in ((by_period, e.period_start), (by_day, e.event_time.date())):
                c = groups.setdefault((e.tenant_id, e.meter, key), Counter(
                    e.tenant_id, e.meter, e.period_start, e.period_end, e.aggregation))  # type: ignore[arg-type]
                c.fold(e.quantity, e.unique_value, e.event_time)
    return ({k: (c.value, c.event_count) for k, c in by_period.items()},
            {k: (c.value, c.event_count) for k, c in by_day.items()})


def project(conn: psycopg.Connection[tuple[Any, ...]], records: list[Record],
            cuts: list[int]) -> None:
    """Write the log as the projector does: one transaction per slice, in log order."""
    begin = 0
    for end in cuts:
        staged = stage_accepted((r.offset, list(enumerate(r.events)))
                                for r in records[begin:end])
        with conn.transaction():
            ensure_month_partitions(conn, staged, set())
            write_staged(conn, staged)
        begin = end


@pytest.fixture(scope="module")
def ledger(module_database_url: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    migrate(module_database_url)
    with psycopg.connect(module_database_url, autocommit=True) as conn:
        yield conn


@settings(max_examples=50, deadline=None)
@given(log=logs())
@example(log=_tied_in_one_record())
def test_counters_rollups_and_usage_as_of_agree_for_every_kind(
    ledger: psycopg.Connection[tuple[Any, ...]], log: tuple[list[Record], list[int]]
) -> None:
    records, cuts = log
    ledger.execute(f"TRUNCATE {', '.join('tally.' + t for t in LEDGER_TABLES)}")
    project(ledger, records, cuts)
    per_period, per_day = counters(records)

    def folded(sql: str) -> Folded:
        return {(t, m, k): (q, n) for t, m, k, q, n in ledger.execute(sql)}

    assert folded("SELECT tenant_id, meter, period_start, quantity, event_count"
                  " FROM tally.usage_by_period") == per_period
    assert folded("SELECT tenant_id, meter, period_start, quantity, event_count"
                  " FROM tally.usage_as_of('infinity')") == per_period
    assert folded("SELECT tenant_id, meter, day, quantity, event_count"
                  " FROM tally.usage_daily") == per_day


def test_the_newest_usage_as_of_folds_every_kind_as_the_kinds_define() -> None:
    """A kind added or changed in domain/meters.py needs a migration recreating the
    function (print `ledger_value_sql()` for its body)."""
    newest = [path.read_text() for _, _, path in migration_files()
              if "FUNCTION tally.usage_as_of" in path.read_text()][-1]
    assert " ".join(ledger_value_sql().split()) in " ".join(newest.split())
