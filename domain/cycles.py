"""Billing cycles (pure): anchors, monthly cycles, fee intervals, whole seconds.

The rules are docs/billing.md, rule 2. A paid subscription is anchored at its start, or at
its `trial_end` when it has a trial. Cycle k starts k calendar months after the anchor, on
the anchor's day clamped to the month's length and at the anchor's time of day (anchored on
Jan 31: Feb 28, Mar 31, Apr 30, ...). Cycle starts are always computed from the anchor, never
from the previous cycle, so a short month does not pull later cycles earlier.

Usage is billed per monthly cycle whatever the interval; the fee is charged per fee interval:
one cycle for a monthly subscription, twelve for a yearly one.

Billing instants are whole seconds (`whole_second` truncates) and elapsed time is the exact
count of seconds between two UTC instants (`seconds_between`), never wall-clock arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from domain.periods import add_months
from domain.rating import Interval

MONTHS_PER_INTERVAL: dict[Interval, int] = {"month": 1, "year": 12}
_SECOND = timedelta(seconds=1)


@dataclass(frozen=True, order=True)
class Cycle:
    """Cycle `index` of a series anchored at some instant: [start, end), end exclusive."""

    index: int
    start: datetime
    end: datetime

    @property
    def seconds(self) -> int:
        return seconds_between(self.start, self.end)

    def __contains__(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


def whole_second(moment: datetime) -> datetime:
    """`moment` in UTC, truncated to its second: the resolution of every billing instant."""
    return moment.astimezone(UTC).replace(microsecond=0)


def seconds_between(start: datetime, end: datetime) -> int:
    """Whole seconds from `start` to `end` (both whole seconds): exact, no float."""
    return (end - start) // _SECOND


def cycle_start(anchor: datetime, index: int, months: int = 1) -> datetime:
    """The start of cycle `index` of `months` months anchored at `anchor`."""
    return add_months(anchor, index * months, anchor_day=anchor.day)


def cycle(anchor: datetime, index: int, months: int = 1) -> Cycle:
    """Cycle `index` (0 starts at the anchor) of `months`-month cycles."""
    return Cycle(index, cycle_start(anchor, index, months), cycle_start(anchor, index + 1, months))


def cycle_containing(anchor: datetime, moment: datetime, months: int = 1) -> Cycle:
    """The cycle of `months`-month cycles from `anchor` that contains `moment`."""
    distance = (moment.year - anchor.year) * 12 + (moment.month - anchor.month)
    estimate = distance // months
    # The month distance is right to within one cycle either way (day and time of day).
    for index in (estimate - 1, estimate, estimate + 1):
        candidate = cycle(anchor, index, months)
        if moment in candidate:
            return candidate
    raise AssertionError(f"no cycle contains {moment} from {anchor}")  # pragma: no cover


def fee_interval_containing(anchor: datetime, interval: Interval, moment: datetime) -> Cycle:
    """The fee interval (a month or a year from the anchor) that contains `moment`."""
    return cycle_containing(anchor, moment, MONTHS_PER_INTERVAL[interval])


def is_fee_boundary(anchor: datetime, interval: Interval, moment: datetime) -> bool:
    """Whether a fee interval starts at `moment` (the anchor itself included)."""
    return moment >= anchor and fee_interval_containing(anchor, interval, moment).start == moment


def interval_of(period_start: datetime, period_end: datetime) -> Interval | None:
    """`month` or `year` when the period is exactly one of them, else None.

    A month is `period_end` = `period_start` plus one calendar month, its day clamped: Jan 31
    to Feb 28 is a month. Because cycles keep the anchor's day, a later period of the same
    subscription may start on a clamped day (Feb 28 to Mar 31, anchored on the 31st): any
    anchor day from `period_start`'s day to 31 is accepted. Likewise for a year.
    """
    start, end = whole_second(period_start), whole_second(period_end)
    for interval, months in MONTHS_PER_INTERVAL.items():
        if any(add_months(start, months, day) == end for day in range(start.day, 32)):
            return interval
    return None
