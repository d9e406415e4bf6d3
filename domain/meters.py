"""Meter aggregation kinds: one definition per kind, everything about it in one place.

A kind (`MeterKind`) says
- how an event folds into the worker's running counter (`fold`, called by
  `domain.aggregation.Counter.fold`);
- how the projector folds a batch of new ledger rows into a rollup row and merges that
  with the row stored (`rollup`, a `RollupSql`; projections/ledger.py builds its statement
  from the kinds of each batch);
- how the ledger rows of one period fold in a single query (`ledger_sql`:
  `tally.usage_as_of`, whose body is `ledger_value_sql()`, see runtime/sql/006);
- whether Stripe receives it as a gauge (`gauge`);
- what one more use does to the period's value, for the API's entitlement decisions
  (`pending_sql`: the value with the uses reserved but not yet in the ledger; `after_use`:
  the value were this use recorded; see api/entitlements.py).

Rating is the same for every kind (domain/rating.py): the period's value above the plan's
`included`. What differs is how that value reaches Stripe: a gauge as its current reading
(a Stripe meter with formula `last`), any other kind as deltas that add up (`sum`).

The three folds give the same value for the same log; tests/projections/
test_meter_kinds_agree.py holds them to it. That depends on one tie rule, written once in
`Latest`. `KINDS` holds every kind by name; its names are exactly those of the catalog's
`Aggregation` literal, the wire contract (tests/domain/test_meters.py).

Adding a kind: a `MeterKind` subclass here, in `KINDS`, in `schemas.plans.Aggregation`,
tests beside those of the others, and a migration that recreates `tally.usage_as_of`
(an applied migration is never edited; a test finds the newest one out of date).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import ClassVar, Protocol

from schemas.plans import Aggregation


class RunningAggregate(Protocol):
    """A period's running aggregate, as a kind folds events into it (the worker's
    `domain.aggregation.Counter` is one): the value and the state some kinds keep beside
    it. `event_count` already counts the event being folded."""

    value: Decimal
    event_count: int
    distinct: set[str]  # unique_count: the values counted
    distinct_unwritten: list[str]  # unique_count: those not yet in the changelog
    latest_time: datetime | None  # latest: the event time of the value


@dataclass(frozen=True)
class RollupSql:
    """How a kind's events fold into a rollup (`usage_daily`, `usage_by_period`) in the
    projector's one statement per batch (projections/ledger.py).

    The statement groups the batch's new ledger rows (`new_rows`: the ledger's columns plus
    `seq`, the position in the batch, and `day`) by tenant, meter and rollup key. Names the
    SQL below may use: `g`, the group, with `aggregation`, `event_count` and the columns of
    `aggregates`; whatever `join` brings in; in `merge`, `r` the stored rollup row and
    `excluded` the batch's. Format fields in `ctes` and `join`: {s} schema, {table} rollup
    table, {key} its key column (day, period_start), {uniques} its unique-values table,
    {kind} the kind's name.
    """

    value: str  # the batch's value for the group `g`
    merge: str  # the stored value and the batch's, merged
    # Extra columns of `g`: name -> aggregate over the group's new rows.
    aggregates: Mapping[str, str] = field(default_factory=dict)
    ctes: str = ""  # CTEs the value needs, each starting with ", name AS ("
    join: str = ""  # how they join `g`
    # The event time of the batch's value, kept in the rollup's `value_time` (the greatest
    # seen) for a merge that compares it; None for kinds whose merge does not.
    value_time: str | None = None


class MeterKind(ABC):
    """One aggregation kind (module docstring). Subclasses set the class attributes and
    `fold`; instances hold no state, `KINDS` has the one of each."""

    name: ClassVar[Aggregation]
    gauge: ClassVar[bool]  # Stripe gets the current reading, not deltas that add up
    rollup: ClassVar[RollupSql]
    # The period's value as one aggregate over its ledger rows (`tally.usage_as_of`).
    ledger_sql: ClassVar[str]

    # The period's value counting the uses the API reserved that the ledger does not hold
    # yet (api/entitlements.py), as one SQL expression over two relations: `ledger`, the
    # period's rollup row (`quantity`, `value_time`; no row: nothing counted), and
    # `pending`, those reservations (`event_id`, `event_time`, `quantity`,
    # `unique_value`). `%(s)s` is the period's start.
    pending_sql: ClassVar[str]
    # A use of this kind is meaningless without the meter's unique dimension.
    needs_unique_value: ClassVar[bool] = False

    @abstractmethod
    def fold(self, counter: RunningAggregate, quantity: Decimal, unique_value: str | None,
             event_time: datetime) -> None:
        """Fold one deduplicated event into `counter.value`."""

    @abstractmethod
    def after_use(self, value: Decimal, quantity: Decimal, new_unique: bool) -> Decimal:
        """The period's value once one more use of `quantity`, timed now, is counted, from
        its value `value` now (`new_unique`: the use's unique value was not counted yet).
        A hard limit is passed when this exceeds it."""


_ADD = "r.quantity + excluded.quantity"
_LEDGER = "coalesce((SELECT quantity FROM ledger), 0)"


class Sum(MeterKind):
    """The quantities add up (API calls, tokens)."""

    name = "sum"
    gauge = False
    rollup = RollupSql(value="g.total", merge=_ADD, aggregates={"total": "sum(quantity)"})
    ledger_sql = "sum(quantity)"
    pending_sql = f"{_LEDGER} + coalesce((SELECT sum(quantity) FROM pending), 0)"

    def fold(self, counter: RunningAggregate, quantity: Decimal, unique_value: str | None,
             event_time: datetime) -> None:
        counter.value += quantity

    def after_use(self, value: Decimal, quantity: Decimal, new_unique: bool) -> Decimal:
        return value + quantity


class Count(MeterKind):
    """The events add up, whatever their quantity (executions)."""

    name = "count"
    gauge = False
    rollup = RollupSql(value="g.event_count::numeric", merge=_ADD)
    ledger_sql = "count(*)::numeric"
    pending_sql = f"{_LEDGER} + (SELECT count(*) FROM pending)"

    def fold(self, counter: RunningAggregate, quantity: Decimal, unique_value: str | None,
             event_time: datetime) -> None:
        counter.value += 1

    def after_use(self, value: Decimal, quantity: Decimal, new_unique: bool) -> Decimal:
        return value + 1  # one event, whatever its quantity


class Max(MeterKind):
    """The greatest quantity of the period (peak storage)."""

    name = "max"
    gauge = True
    rollup = RollupSql(value="g.peak", merge="greatest(r.quantity, excluded.quantity)",
                       aggregates={"peak": "max(quantity)"})
    ledger_sql = "max(quantity)"
    pending_sql = f"greatest({_LEDGER}, (SELECT max(quantity) FROM pending))"

    def fold(self, counter: RunningAggregate, quantity: Decimal, unique_value: str | None,
             event_time: datetime) -> None:
        counter.value = max(counter.value, quantity) if counter.event_count > 1 else quantity

    def after_use(self, value: Decimal, quantity: Decimal, new_unique: bool) -> Decimal:
        return max(value, quantity)  # a new peak passes the limit, a lower reading never


class UniqueCount(MeterKind):
    """How many distinct values of the meter's `unique_dimension` the period saw (active
    users); an event without the dimension counts as an event only.

    The rollups remember the values counted in their `*_uniques` tables: a value adds 1
    only when its row there is new (the same rule as the ledger keys), so a value seen
    again in a later batch does not count twice."""

    name = "unique_count"
    gauge = True
    rollup = RollupSql(
        value="coalesce(u.n, 0)::numeric",
        merge=_ADD,
        ctes="""
, {table}_new_uniques AS (
    INSERT INTO {s}.{uniques} (tenant_id, meter, {key}, unique_value)
    SELECT DISTINCT tenant_id, meter, {key}, unique_value FROM new_rows
    WHERE aggregation = '{kind}' AND unique_value IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, meter, {key}
), {table}_unique_counts AS (
    SELECT tenant_id, meter, {key}, count(*) AS n FROM {table}_new_uniques
    GROUP BY tenant_id, meter, {key}
)""",
        join="\n    LEFT JOIN {table}_unique_counts u USING (tenant_id, meter, {key})",
    )
    ledger_sql = "count(DISTINCT unique_value)::numeric"
    # A pending value adds 1 unless the period's uniques (the ledger's) already hold it.
    pending_sql = f"""{_LEDGER} + (SELECT count(DISTINCT p.unique_value) FROM pending p
        WHERE p.unique_value IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM tally.usage_period_uniques u WHERE u.tenant_id = p.tenant_id
            AND u.meter = p.meter AND u.period_start = %(s)s
            AND u.unique_value = p.unique_value))"""
    needs_unique_value = True

    def fold(self, counter: RunningAggregate, quantity: Decimal, unique_value: str | None,
             event_time: datetime) -> None:
        if unique_value is not None and unique_value not in counter.distinct:
            counter.distinct.add(unique_value)
            counter.distinct_unwritten.append(unique_value)
            counter.value = Decimal(len(counter.distinct))

    def after_use(self, value: Decimal, quantity: Decimal, new_unique: bool) -> Decimal:
        return value + 1 if new_unique else value  # a value seen before is free


class Latest(MeterKind):
    """The quantity of the event with the greatest event time (a gauge reading, seats).

    Tie rule: of events with equal event times, the one later in the log wins. The log is
    the worker's input and, in the same order for a tenant, `tally.usage.accepted` (a
    tenant's events are on one partition, keyed by tenant), so every fold can follow it:
    - the worker folds in log order, and a tie replaces the value (`>=`);
    - a rollup takes a batch's last event in `LOG_ORDER`, and a later batch's value
      replaces the stored one on a tie (`>=` on `value_time`; batches commit in log order);
    - `tally.usage_as_of` takes the ledger's last row in `LOG_ORDER`, by the position in
      `tally.usage.accepted` the projector stores with each row.
    """

    # Ledger rows, last first: by event time, then by position in the accepted topic.
    # Only rows projected before positions were stored (migration 006) have none: they are
    # earlier than any row with one, and ingestion time and id order them among themselves
    # (`tally projections rebuild` gives them their positions).
    LOG_ORDER: ClassVar[str] = ("event_time DESC, log_offset DESC NULLS LAST,"
                                " log_index DESC NULLS LAST, ingested_at DESC, event_id DESC")

    name = "latest"
    gauge = True
    rollup = RollupSql(
        value="l.quantity",
        merge="""CASE WHEN r.value_time IS NULL OR excluded.value_time >= r.value_time
                THEN excluded.quantity ELSE r.quantity END""",
        ctes=f"""
, {{table}}_latest AS (
    SELECT DISTINCT ON (tenant_id, meter, {{key}}) tenant_id, meter, {{key}}, quantity,
        event_time
    FROM new_rows WHERE aggregation = '{{kind}}'
    ORDER BY tenant_id, meter, {{key}}, {LOG_ORDER}
)""",
        join="\n    LEFT JOIN {table}_latest l USING (tenant_id, meter, {key})",
        value_time="l.event_time",
    )
    ledger_sql = f"(array_agg(quantity ORDER BY {LOG_ORDER}))[1]"
    # The newest reservation not older than the ledger's value, else the ledger's value.
    # Reservations are timed when decided; two with the same time are ordered by id (their
    # publishes may reach the log in either order: the tie rule cannot be followed there).
    pending_sql = """coalesce((SELECT p.quantity FROM pending p
        WHERE p.event_time >= coalesce((SELECT value_time FROM ledger), '-infinity')
        ORDER BY p.event_time DESC, p.event_id DESC LIMIT 1), (SELECT quantity FROM ledger), 0)"""

    def fold(self, counter: RunningAggregate, quantity: Decimal, unique_value: str | None,
             event_time: datetime) -> None:
        if counter.latest_time is None or event_time >= counter.latest_time:
            counter.latest_time = event_time
            counter.value = quantity

    def after_use(self, value: Decimal, quantity: Decimal, new_unique: bool) -> Decimal:
        return quantity  # a use timed now is the newest reading: it replaces the value


KINDS: Mapping[str, MeterKind] = MappingProxyType({
    kind.name: kind for kind in (Sum(), Count(), Max(), UniqueCount(), Latest())})


def by_kind_sql(selector: str, sql_of: Mapping[str, str]) -> str:
    """A CASE choosing, by the kind named in `selector`, that kind's SQL (NULL for a kind
    not in `sql_of`)."""
    branches = "".join(f"\n        WHEN '{name}' THEN {sql}" for name, sql in sql_of.items())
    return f"CASE {selector}{branches}\n    END"


def ledger_value_sql() -> str:
    """The value of one tenant, meter and period over its ledger rows, every kind (the body
    of `tally.usage_as_of`'s quantity column)."""
    return by_kind_sql("min(aggregation)", {n: k.ledger_sql for n, k in KINDS.items()})
