"""What the worker knows of a tenant's subscription, and how a lifecycle event changes it
(pure). The worker keeps one per tenant, in its changelog as `s/<tenant>`
(streams/processor.py), and asks it which plan and period an event counts under.

Not the subscription history that invoicing derives (domain/subscriptions.py): the worker
keeps only the state the last event left, in event-log order, which is all that placing
usage needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from domain.periods import Period
from schemas.events import SUBSCRIPTION_TYPES, SubscriptionEvent


@dataclass
class Subscription:
    """A tenant's subscription as of the last lifecycle event applied."""

    plan_id: str
    period: Period
    status: Literal["active", "trialing", "canceled"]
    cancel_at: datetime | None  # from then on the default plan applies
    trial_end: datetime | None
    applied_offset: int  # the last offset applied from the owner's own (home) partition
    trial_notified: datetime | None = None  # the trial_end a trial_ending notice went for
    # The last offset applied from each other source partition (producers whose
    # partitioner is not Tally's: streams/processor.py).
    applied_from: dict[int, int] = field(default_factory=dict)

    @classmethod
    def after(cls, event: SubscriptionEvent, offset: int) -> Subscription:
        """The subscription a lifecycle event (at `offset` of its topic) leaves; the caller
        carries over what the event does not say (`trial_notified`)."""
        d = event.data
        period = Period(d.period_start.astimezone(UTC), d.period_end.astimezone(UTC))
        trial_end = d.trial_end.astimezone(UTC) if d.trial_end else None
        if event.type == SUBSCRIPTION_TYPES[2]:  # canceled
            at = period.end if d.cancel_at_period_end else event.time.astimezone(UTC)
            return cls(d.plan_id, period, "canceled", at, trial_end, offset)
        trialing = trial_end is not None and event.time < trial_end
        status: Literal["active", "trialing"] = "trialing" if trialing else "active"
        cancel_at = period.end if d.cancel_at_period_end else None
        return cls(d.plan_id, period, status, cancel_at, trial_end, offset)

    def applied(self, source: int | None) -> int:
        """The last offset applied from `source` (None: the home partition); -1 if none."""
        return self.applied_offset if source is None else self.applied_from.get(source, -1)

    def carry_over(self, before: Subscription | None, source: int | None,
                   offset: int) -> None:
        """Take over from the subscription this one replaces what an event does not say
        (the trial notice sent, the offsets applied), then mark `offset` of `source` (None:
        the home partition) applied."""
        if before is not None:
            self.trial_notified = before.trial_notified
            self.applied_offset = before.applied_offset
            self.applied_from = dict(before.applied_from)
        elif source is not None:
            self.applied_offset = -1
        if source is None:
            self.applied_offset = offset
        else:
            self.applied_from[source] = offset

    def plan_at(self, moment: datetime, default_plan: str) -> str:
        """The plan in force at `moment`."""
        if self.cancel_at is not None and moment >= self.cancel_at:
            return default_plan
        return self.plan_id

    def to_state(self) -> dict[str, Any]:
        """The changelog form (JSON-ready)."""
        state: dict[str, Any] = {
            "plan_id": self.plan_id,
            "period_start": self.period.start.isoformat(),
            "period_end": self.period.end.isoformat(),
            "status": self.status,
            "cancel_at": self.cancel_at.isoformat() if self.cancel_at else None,
            "trial_end": self.trial_end.isoformat() if self.trial_end else None,
            "applied_offset": self.applied_offset,
            "trial_notified": self.trial_notified.isoformat() if self.trial_notified else None,
        }
        if self.applied_from:  # absent in the common case: the form older workers wrote
            state["applied_from"] = {str(p): o for p, o in sorted(self.applied_from.items())}
        return state

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> Subscription:
        def ts(v: str | None) -> datetime | None:
            return datetime.fromisoformat(v) if v else None

        return cls(
            plan_id=s["plan_id"],
            period=Period(datetime.fromisoformat(s["period_start"]),
                          datetime.fromisoformat(s["period_end"])),
            status=s["status"],
            cancel_at=ts(s["cancel_at"]),
            trial_end=ts(s["trial_end"]),
            applied_offset=int(s["applied_offset"]),
            trial_notified=ts(s.get("trial_notified")),
            applied_from={int(p): int(o) for p, o in s.get("applied_from", {}).items()},
        )
