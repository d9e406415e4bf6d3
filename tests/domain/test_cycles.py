"""Billing cycles (docs/billing.md, rule 2): anchored, clamped, in whole seconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.cycles import (
    cycle,
    cycle_containing,
    fee_interval_containing,
    interval_of,
    is_fee_boundary,
    seconds_between,
    whole_second,
)


def dt(year: int, month: int, day: int, hour: int = 0) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


def test_cycles_anchored_on_the_31st_clamp_and_come_back() -> None:
    starts = [cycle(dt(2026, 1, 31), k).start for k in range(4)]
    assert starts == [dt(2026, 1, 31), dt(2026, 2, 28), dt(2026, 3, 31), dt(2026, 4, 30)]


def test_cycles_keep_the_anchors_time_of_day() -> None:
    assert cycle(dt(2026, 1, 15, 10), 1).start == dt(2026, 2, 15, 10)


def test_a_cycle_has_the_exact_seconds_of_its_months() -> None:
    assert cycle(dt(2026, 1, 1), 0).seconds == 31 * 86400
    assert cycle(dt(2026, 1, 1), 1).seconds == 28 * 86400


def test_yearly_fee_intervals_step_by_twelve_cycles() -> None:
    anchor = dt(2026, 1, 1)
    assert fee_interval_containing(anchor, "year", dt(2026, 7, 4)).end == dt(2027, 1, 1)
    assert is_fee_boundary(anchor, "year", dt(2027, 1, 1))
    assert not is_fee_boundary(anchor, "year", dt(2026, 2, 1))
    assert is_fee_boundary(anchor, "month", dt(2026, 2, 1))
    assert not is_fee_boundary(anchor, "month", dt(2025, 12, 1))  # before the anchor


@pytest.mark.parametrize(
    ("start", "end", "interval"),
    [
        (dt(2026, 1, 1), dt(2026, 2, 1), "month"),
        (dt(2026, 1, 31), dt(2026, 2, 28), "month"),
        (dt(2026, 2, 28), dt(2026, 3, 31), "month"),  # a later period anchored on the 31st
        (dt(2026, 1, 1), dt(2027, 1, 1), "year"),
        (dt(2026, 1, 1), dt(2026, 4, 1), None),  # quarterly
        (dt(2026, 1, 1), dt(2026, 1, 31), None),  # 30 days
        (dt(2026, 1, 1), dt(2026, 2, 1, 1), None),  # a month and an hour
    ],
)
def test_interval_is_read_from_the_period(start: datetime, end: datetime,
                                          interval: str | None) -> None:
    assert interval_of(start, end) == interval


def test_billing_instants_are_whole_seconds() -> None:
    moment = datetime(2026, 1, 1, 0, 0, 1, 999_999, tzinfo=UTC)
    assert whole_second(moment) == datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert seconds_between(dt(2026, 1, 1), dt(2026, 1, 2)) == 86400


@given(
    anchor=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1),
                        timezones=st.just(UTC)).map(whole_second),
    offset=st.integers(min_value=0, max_value=3 * 366 * 86400),
    months=st.sampled_from([1, 12]),
)
def test_the_containing_cycle_contains_the_moment_and_follows_its_predecessor(
        anchor: datetime, offset: int, months: int) -> None:
    moment = anchor + timedelta(seconds=offset)
    found = cycle_containing(anchor, moment, months)
    assert found.start <= moment < found.end
    if found.index > 0:
        assert cycle(anchor, found.index - 1, months).end == found.start
