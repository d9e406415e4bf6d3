"""Billing period math (pure). Periods are half-open [start, end) in UTC.

A tenant with a subscription has anniversary periods: the subscription's period, stepped
forwards or backwards by its length in whole months, anchored on its start day (a period
starting on the 31st ends on the last day of shorter months). A tenant without one has
calendar months.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property, lru_cache


@dataclass(frozen=True, order=True)
class Period:
    start: datetime
    end: datetime

    def __contains__(self, moment: datetime) -> bool:
        return self.start <= moment < self.end

    @cached_property
    def start_text(self) -> str:
        """`start` in ISO 8601, computed once (it is written with every accepted event)."""
        return self.start.isoformat()

    @cached_property
    def end_text(self) -> str:
        return self.end.isoformat()


def add_months(moment: datetime, months: int, anchor_day: int | None = None) -> datetime:
    """`moment` moved by whole months, on `anchor_day` (default: its own day), clamped."""
    day = anchor_day or moment.day
    index = moment.year * 12 + (moment.month - 1) + months
    year, month = divmod(index, 12)
    last = calendar.monthrange(year, month + 1)[1]
    return moment.replace(year=year, month=month + 1, day=min(day, last))


def calendar_month(moment: datetime) -> Period:
    """The UTC calendar month containing `moment`."""
    moment = moment.astimezone(UTC)
    return _calendar_month(moment.year, moment.month)


@lru_cache(maxsize=1024)
def _calendar_month(year: int, month: int) -> Period:
    # One Period object per month: its ISO texts are then computed once, not per record.
    start = datetime(year, month, 1, tzinfo=UTC)
    return Period(start, add_months(start, 1))


def months_between(start: datetime, end: datetime) -> int:
    """Whole months from start to end (at least 1): the length of a subscription period."""
    months = (end.year - start.year) * 12 + (end.month - start.month)
    return max(months, 1)


def anniversary_period(anchor: Period, moment: datetime) -> Period:
    """The period containing `moment` in the series that `anchor` belongs to."""
    if moment in anchor:
        return anchor
    length = months_between(anchor.start, anchor.end)
    day = anchor.start.day
    # Estimate the step count from the month distance, then correct by one either way.
    distance = (moment.year - anchor.start.year) * 12 + (moment.month - anchor.start.month)
    step = distance // length
    for candidate in (step - 1, step, step + 1):
        start = add_months(anchor.start, candidate * length, day)
        end = add_months(anchor.start, (candidate + 1) * length, day)
        if start <= moment < end:
            return Period(start, end)
    raise AssertionError(f"no period found for {moment} from {anchor}")  # pragma: no cover
