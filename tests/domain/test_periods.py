from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from domain.periods import Period, add_months, anniversary_period, calendar_month


def dt(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_calendar_month_contains_the_moment() -> None:
    assert calendar_month(dt(2026, 11, 21, 10)) == Period(dt(2026, 11, 1), dt(2026, 12, 1))
    assert calendar_month(dt(2026, 12, 31, 23, 59)) == Period(dt(2026, 12, 1), dt(2027, 1, 1))


def test_month_end_anchor_clamps_in_short_months() -> None:
    assert add_months(dt(2026, 1, 31), 1) == dt(2026, 2, 28)
    assert add_months(dt(2026, 1, 31), 2, anchor_day=31) == dt(2026, 3, 31)


def test_anniversary_period_steps_forward_and_back() -> None:
    anchor = Period(dt(2026, 1, 15), dt(2026, 2, 15))
    assert anniversary_period(anchor, dt(2026, 3, 20)) == Period(dt(2026, 3, 15), dt(2026, 4, 15))
    assert anniversary_period(anchor, dt(2025, 12, 20)) == Period(dt(2025, 12, 15),
                                                                  dt(2026, 1, 15))
    assert anniversary_period(anchor, dt(2026, 2, 15)) == Period(dt(2026, 2, 15), dt(2026, 3, 15))


def test_yearly_periods_step_by_twelve_months() -> None:
    anchor = Period(dt(2026, 5, 1), dt(2027, 5, 1))
    assert anniversary_period(anchor, dt(2028, 1, 1)) == Period(dt(2027, 5, 1), dt(2028, 5, 1))


moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                       timezones=st.just(UTC))


@given(moments, moments, st.sampled_from([1, 3, 12]))
def test_anniversary_period_always_contains_the_moment(start: datetime, moment: datetime,
                                                       months: int) -> None:
    anchor = Period(start, add_months(start, months))
    period = anniversary_period(anchor, moment)
    assert period.start <= moment < period.end
    length = period.end - period.start
    assert timedelta(days=27 * months) <= length <= timedelta(days=31 * months + 1)


@given(moments)
def test_calendar_month_always_contains_the_moment(moment: datetime) -> None:
    period = calendar_month(moment)
    assert moment in period and period.start.day == 1
