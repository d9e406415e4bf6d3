"""The aggregation kinds (domain/meters.py): one per name of the wire contract, each folding
as its docstring says, ties included; the SQL built from them names every kind once."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import get_args

from hypothesis import given
from hypothesis import strategies as st

from domain.aggregation import Counter
from domain.meters import KINDS, ledger_value_sql
from schemas.plans import Aggregation

T0 = datetime(2026, 11, 1, tzinfo=UTC)
Event = tuple[D, str | None, datetime]


def folded(kind: str, events: list[Event]) -> D:
    c = Counter("t1", "m", T0, T0 + timedelta(days=30), kind)  # type: ignore[arg-type]
    for quantity, unique, at in events:
        c.fold(quantity, unique, at)
    assert c.event_count == len(events)
    return c.value


def _latest(events: list[Event]) -> D:
    # The greatest event time; of equals, the last in the log (the greatest position).
    return max(enumerate(events), key=lambda p: (p[1][2], p[0]))[1][0]


# Each kind's value, said as plainly as possible.
SPECIFICATION: dict[str, Callable[[list[Event]], D]] = {
    "sum": lambda events: sum((q for q, _, _ in events), D(0)),
    "count": lambda events: D(len(events)),
    "max": lambda events: max(q for q, _, _ in events),
    "unique_count": lambda events: D(len({u for _, u, _ in events if u is not None})),
    "latest": _latest,
}

events_ = st.lists(st.tuples(
    st.decimals(min_value=0, max_value=1000, places=2),
    st.sampled_from(["a", "b", "c", None]),
    st.sampled_from([T0, T0 + timedelta(minutes=1), T0 + timedelta(days=2)]),  # ties
), min_size=1, max_size=12)


def test_there_is_one_kind_for_each_aggregation_of_the_catalog() -> None:
    assert sorted(KINDS) == sorted(get_args(Aggregation))
    assert all(kind.name == name for name, kind in KINDS.items())
    assert sorted(SPECIFICATION) == sorted(KINDS)


@given(events=events_)
def test_every_kind_folds_as_specified_in_any_order(events: list[Event]) -> None:
    for name, value in SPECIFICATION.items():
        assert folded(name, events) == value(events), name


def test_latest_ties_on_event_time_go_to_the_event_later_in_the_log() -> None:
    assert folded("latest", [(D(5), None, T0), (D(7), None, T0), (D(1), None, T0)]) == D(1)
    assert folded("latest", [(D(5), None, T0 + timedelta(seconds=1)), (D(7), None, T0)]) == D(5)


def test_stripe_gets_max_unique_count_and_latest_as_readings_and_the_rest_as_deltas() -> None:
    assert {name for name, kind in KINDS.items() if kind.gauge} == {
        "max", "unique_count", "latest"}


def test_the_columns_kinds_add_to_a_rollup_group_are_their_own() -> None:
    columns = [c for kind in KINDS.values() for c in kind.rollup.aggregates]
    assert len(columns) == len(set(columns))
    assert not {"tenant_id", "meter", "aggregation", "event_count"} & set(columns)


def test_the_ledger_fold_chooses_each_kinds_own_sql() -> None:
    sql = ledger_value_sql()
    assert sql.startswith("CASE min(aggregation)") and sql.endswith("END")
    for name, kind in KINDS.items():
        assert sql.count(f"WHEN '{name}' THEN {kind.ledger_sql}\n") == 1


@given(kind=st.sampled_from(sorted(KINDS)),
       events=st.lists(st.tuples(st.integers(1, 50).map(D), st.sampled_from(["a", "b", "c"]),
                                 st.integers(0, 100)), max_size=8),
       quantity=st.integers(1, 50).map(D), unique=st.sampled_from(["a", "b", "d"]))
def test_after_use_is_the_value_folding_one_more_newest_event_gives(
        kind: str, events: list[tuple[D, str, int]], quantity: D, unique: str) -> None:
    # What an entitlement decision expects a use to leave (after_use) is what the worker
    # will count once its event, timed now (after every other), is folded.
    timed = [(q, u, T0 + timedelta(seconds=s)) for q, u, s in events]
    before = folded(kind, timed)
    after = folded(kind, [*timed, (quantity, unique, T0 + timedelta(seconds=101))])
    new_unique = unique not in {u for _, u, _ in events}
    assert KINDS[kind].after_use(before, quantity, new_unique) == after
