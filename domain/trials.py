"""Trial-ending notices (pure: no Kafka, no clock).

A tenant on a trial is told once, `notice` before the trial ends (3 days by default), that
it is ending. "Now" is the processor's watermark (the newest ingestion time it has seen),
never the wall clock, so a replay of the log makes the same decisions.

"Once" is kept by remembering, per subscription, the `trial_end` a notice was sent for
(`notified_for`). It is compared with the current `trial_end` rather than kept as a flag,
so a trial that is extended (a new `trial_end`) gets its own notice, and a replay that
restores `notified_for` from the changelog sends nothing twice.

A trial that starts already inside its notice window (a 2-day trial, say) is noticed at the
first watermark that sees it: the notice is due from `trial_end - notice` until
`trial_end`, not only at the moment the window opens.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from schemas.records import Notification

DEFAULT_NOTICE = timedelta(days=3)
# Notification.meter of a trial notice: a trial is about the whole subscription, not one
# meter. Kept apart so the identity (tenant, meter, period, kind, percent) stays unique.
TRIAL_METER = "*"


def notice_at(trial_end: datetime, notice: timedelta = DEFAULT_NOTICE) -> datetime:
    """When the notice for a trial ending at `trial_end` becomes due."""
    return trial_end - notice


def trial_ending_due(
    status: str,
    trial_end: datetime | None,
    notified_for: datetime | None,
    watermark: datetime,
    notice: timedelta = DEFAULT_NOTICE,
) -> bool:
    """Should a `trial_ending` notification be emitted now?

    Yes when the subscription is trialing, its trial ends within `notice` after the
    watermark but has not ended yet, and no notice was sent for this `trial_end`.
    """
    if status != "trialing" or trial_end is None or notified_for == trial_end:
        return False
    return notice_at(trial_end, notice) <= watermark < trial_end


def trial_ending_notification(tenant_id: str, plan_id: str, period_start: datetime) -> Notification:
    """The notification that tells a tenant its trial on `plan_id` is ending.

    Its identity is (tenant, "*", the subscription period's start, "trial_ending", None).
    The Notification contract has no field for when the trial ends; receivers that need it
    look the subscription up (or the contract gains an optional `trial_end`).
    """
    return Notification(
        tenant_id=tenant_id, meter=TRIAL_METER, plan_id=plan_id, period_start=period_start,
        kind="trial_ending", threshold_percent=None, used=Decimal(0), limit=None,
    )
