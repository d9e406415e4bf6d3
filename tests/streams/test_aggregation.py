from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

from streams.aggregation import Counter

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def counter(kind: str) -> Counter:
    return Counter("t1", "m", T0, T0 + timedelta(days=30), kind)  # type: ignore[arg-type]


def test_each_aggregation_folds_as_users_expect() -> None:
    events = [(D(3), "a", T0 + timedelta(hours=2)), (D(5), "b", T0 + timedelta(hours=1)),
              (D(2), "a", T0 + timedelta(hours=3))]
    expected = {"sum": D(10), "count": D(3), "max": D(5), "unique_count": D(2), "latest": D(2)}
    for kind, value in expected.items():
        c = counter(kind)
        for q, dim, t in events:
            c.fold(q, dim, t)
        assert c.value == value, kind
        assert c.event_count == 3


def test_latest_ignores_an_older_event_arriving_later() -> None:
    c = counter("latest")
    c.fold(D(7), None, T0 + timedelta(hours=5))
    c.fold(D(1), None, T0 + timedelta(hours=1))
    assert c.value == D(7)


def test_counter_state_round_trips() -> None:
    c = counter("unique_count")
    c.fold(D(1), "x", T0)
    c.applied_offset = 42
    c.notified.add("free:soft_limit:80")
    assert Counter.from_state(c.to_state()) == c
