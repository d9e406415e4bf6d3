"""Trial-ending notices: due once, `notice` before the trial ends, judged by the watermark."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.trials import (
    DEFAULT_NOTICE,
    TRIAL_METER,
    notice_at,
    trial_ending_due,
    trial_ending_notification,
)
from streams.notifier import idempotency_key

END = datetime(2026, 12, 15, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.mark.parametrize(("status", "trial_end", "notified_for", "watermark", "due"), [
    ("trialing", END, None, END - 4 * DAY, False),  # too early
    ("trialing", END, None, END - 3 * DAY, True),  # the window opens
    ("trialing", END, None, END - DAY, True),  # inside the window, not yet told
    ("trialing", END, END, END - DAY, False),  # already told about this trial end
    ("trialing", END + 7 * DAY, END, END + 5 * DAY, True),  # trial extended: a new notice
    ("trialing", END, None, END, False),  # the trial has ended: too late to warn
    ("active", END, None, END - DAY, False),  # converted to paid before the window
    ("canceled", END, None, END - DAY, False),
    ("trialing", None, None, END, False),  # no trial at all
])
def test_trial_ending_is_due_table(status: str, trial_end: datetime | None,
                                   notified_for: datetime | None, watermark: datetime,
                                   due: bool) -> None:
    assert trial_ending_due(status, trial_end, notified_for, watermark) is due


def test_notice_period_is_configurable() -> None:
    assert notice_at(END) == END - DEFAULT_NOTICE == END - 3 * DAY
    assert not trial_ending_due("trialing", END, None, END - 2 * DAY, notice=timedelta(days=1))
    assert trial_ending_due("trialing", END, None, END - 12 * timedelta(hours=1),
                            notice=timedelta(days=1))


@given(st.lists(st.integers(min_value=0, max_value=10 * 24 * 60), min_size=1, max_size=50))
def test_a_trial_is_noticed_at_most_once_however_the_watermark_advances(
    minutes: list[int],
) -> None:
    """Feeding watermarks in order and remembering what was sent, as the processor does."""
    start = END - 8 * DAY
    notified_for: datetime | None = None
    sent = 0
    for m in sorted(minutes):
        watermark = start + timedelta(minutes=m)
        if trial_ending_due("trialing", END, notified_for, watermark):
            notified_for = END
            sent += 1
    in_window = any(notice_at(END) <= start + timedelta(minutes=m) < END for m in minutes)
    assert sent == (1 if in_window else 0)


def test_trial_ending_notification_has_a_stable_identity_of_its_own() -> None:
    period = datetime(2026, 12, 1, tzinfo=UTC)
    n = trial_ending_notification("t-1", "starter", period)
    assert (n.kind, n.meter, n.threshold_percent, n.limit) == ("trial_ending", TRIAL_METER,
                                                               None, None)
    assert idempotency_key(n) == idempotency_key(trial_ending_notification("t-1", "starter",
                                                                           period))
    assert idempotency_key(n) != idempotency_key(trial_ending_notification("t-2", "starter",
                                                                           period))
