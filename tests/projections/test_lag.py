"""The lag in records (`projections.lag.distance`): the real distance to the log end, never
negative, the whole log when the position lies outside it. On the real pipeline: the
scenarios in test_faults.py (a projector waiting for Postgres, a broker restarted empty)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from projections.lag import distance

offsets = st.integers(min_value=0, max_value=1 << 40)


def test_the_distance_inside_the_log_is_what_is_left_to_read() -> None:
    assert distance(position=40, start=0, end=100) == 60
    assert distance(position=100, start=0, end=100) == 0
    assert distance(position=10, start=10, end=10) == 0


def test_a_position_outside_the_log_has_the_whole_log_to_read() -> None:
    # The broker restarted empty: 50 new records, the consumer still at 120.
    assert distance(position=120, start=0, end=50) == 50
    # Retention removed records never read: the projector resets to the start.
    assert distance(position=3, start=10, end=25) == 15


@given(offsets, offsets, offsets)
def test_the_distance_is_never_negative_nor_more_than_the_log(position: int, a: int,
                                                             b: int) -> None:
    start, end = min(a, b), max(a, b)
    lag = distance(position, start, end)
    assert 0 <= lag <= end - start
    if start <= position <= end:
        assert lag == end - position
