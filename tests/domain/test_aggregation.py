from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

from domain.aggregation import Counter

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
    c.take_distinct_segment()  # as every drain does before writing the state
    assert Counter.from_state(c.to_state()) == c


def test_distinct_values_are_written_in_segments_of_new_values() -> None:
    c = counter("unique_count")
    for user in ("a", "b", "a"):
        c.fold(D(1), user, T0)
    assert c.take_distinct_segment() == (0, ["a", "b"])
    assert c.to_state()["distinct_latest"] == ["a", "b"]
    c.fold(D(1), "b", T0)
    assert c.take_distinct_segment() is None  # nothing new
    assert c.to_state()["distinct_latest"] == []
    c.fold(D(1), "c", T0)
    assert c.take_distinct_segment() == (1, ["c"])
    state = c.to_state()
    assert "distinct" not in state and state["distinct_segments"] == 2


def test_a_state_written_before_segments_puts_its_values_in_the_next_one() -> None:
    legacy = {**counter("unique_count").to_state(), "distinct": ["a", "b"], "value": "2"}
    del legacy["distinct_latest"], legacy["distinct_segments"]
    restored = Counter.from_state(legacy)
    assert restored.distinct == {"a", "b"} and restored.value == D(2)
    assert restored.take_distinct_segment() == (0, ["a", "b"])
