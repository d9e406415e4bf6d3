"""A tenant's subscription history (pure): `tally.subscription.*` events to subscriptions.

The rules are docs/billing.md, rules 1 and 12. `derive_subscriptions` folds a tenant's
events, in order of their `time`, into the subscriptions the tenant had: each with its
interval, start, trial end, end, the plan in force from each instant (`plans`), and Stripe
ids. `Subscription.segments` cuts that into the segments the projector stores: plan,
interval, currency, status (trialing, active, canceled), valid from/to.

Identity: the events carry no subscription id (their subject is the tenant), so a tenant has
at most one live subscription at a time, and a subscription is named by its tenant and start
(`<tenant>/<start as %Y%m%dT%H%M%SZ>`), which invoice ids build on.

Contradictions raise a `SubscriptionError` naming the event, and the whole tenant is then
left alone by the caller: a history that cannot be trusted is never billed on a guess.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from typing import Literal

from domain.cycles import interval_of, whole_second
from domain.errors import DomainError
from domain.rating import Interval
from schemas.events import SubscriptionEvent
from schemas.plans import Catalog

Status = Literal["trialing", "active", "canceled"]
EndReason = Literal["canceled", "canceled_at_period_end", "interval_changed"]
_CANCELS: tuple[EndReason, ...] = ("canceled", "canceled_at_period_end")


class SubscriptionError(DomainError):
    """A tenant's subscription history cannot be billed; the message names the event."""


class UnknownPlanError(SubscriptionError):
    """An event names a plan that is not in the catalog."""


class InvalidPeriodError(SubscriptionError):
    """An event's period is neither one month nor one year (or the plan has no such price)."""


class HistoryConflictError(SubscriptionError):
    """An event contradicts the history: no such subscription, before its start, ..."""


@dataclass(frozen=True)
class PlanSpan:
    """`plan_id` is in force from `start` until the next span's start or the subscription's end."""

    start: datetime
    plan_id: str


@dataclass(frozen=True)
class Segment:
    """A stretch of one subscription with one plan and one status; `valid_to` None: open."""

    subscription_id: str
    plan_id: str
    interval: Interval
    currency: str
    status: Status
    valid_from: datetime
    valid_to: datetime | None
    trial_end: datetime | None
    stripe_customer_id: str | None
    stripe_subscription_id: str | None


@dataclass(frozen=True)
class Subscription:
    """One subscription of a tenant, from its start to its end (None: still running)."""

    subscription_id: str
    tenant_id: str
    interval: Interval
    start: datetime
    trial_end: datetime | None  # only when after `start`
    end: datetime | None
    ended_by: EndReason | None
    plans: tuple[PlanSpan, ...]  # by start; the first starts at `start`
    stripe_customer_id: str | None = None
    stripe_subscription_id: str | None = None

    @property
    def anchor(self) -> datetime:
        """Where the paid cycles start: the trial's end, or the start without a trial."""
        return self.trial_end or self.start

    @property
    def invoiced_by_tally(self) -> bool:
        """A subscription Stripe bills (it has a Stripe subscription id) Tally never invoices."""
        return self.stripe_subscription_id is None

    @property
    def paid(self) -> bool:
        """Whether any time is paid: not ended before its trial did."""
        return self.end is None or self.end > self.anchor

    def plan_at(self, moment: datetime) -> str:
        """The plan in force at `moment` (the first plan before the start, the last after)."""
        plan_id = self.plans[0].plan_id
        for span in self.plans:
            if span.start > moment:
                break
            plan_id = span.plan_id
        return plan_id

    def plan_before(self, moment: datetime) -> str:
        """The plan in force just before `moment`."""
        earlier = [span.plan_id for span in self.plans if span.start < moment]
        return earlier[-1] if earlier else self.plans[0].plan_id

    def status_at(self, moment: datetime) -> Status | None:
        """trialing, active or canceled at `moment`; None before the start or after an
        interval change (the next subscription is then in force)."""
        if moment < self.start:
            return None
        if self.end is not None and moment >= self.end:
            return "canceled" if self.ended_by in _CANCELS else None
        return "trialing" if moment < self.anchor else "active"

    def plan_changes(self) -> tuple[datetime, ...]:
        """The instants at which the plan changed (after the start)."""
        return tuple(span.start for span in self.plans[1:])

    def segments(self, catalog: Catalog) -> tuple[Segment, ...]:
        """The subscription cut at every plan change and at the trial's end, plus an open
        `canceled` segment after a cancel."""
        cuts = sorted({self.start, *self.plan_changes(), self.anchor}
                      | ({self.end} if self.end is not None else set()))
        if self.end is not None:
            cuts = [c for c in cuts if c <= self.end]
        bounds: list[tuple[datetime, datetime | None]] = list(pairwise(cuts))
        if self.end is None:
            bounds.append((cuts[-1], None))
        elif self.ended_by in _CANCELS:
            bounds.append((self.end, None))
        result = []
        for valid_from, valid_to in bounds:
            plan_id = self.plan_at(valid_from)
            status = self.status_at(valid_from)
            assert status is not None  # every bound is inside the subscription or after a cancel
            result.append(Segment(
                subscription_id=self.subscription_id, plan_id=plan_id, interval=self.interval,
                currency=catalog.plans[plan_id].currency, status=status, valid_from=valid_from,
                valid_to=valid_to, trial_end=self.trial_end,
                stripe_customer_id=self.stripe_customer_id,
                stripe_subscription_id=self.stripe_subscription_id,
            ))
        return tuple(result)


def subscription_id(tenant_id: str, start: datetime) -> str:
    """The name of a tenant's subscription that starts at `start`."""
    return f"{tenant_id}/{start:%Y%m%dT%H%M%SZ}"


@dataclass
class _Draft:
    """A subscription while its events are folded in."""

    interval: Interval
    start: datetime
    trial_end: datetime | None
    plans: list[PlanSpan]
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    end: datetime | None = None
    ended_by: EndReason | None = None

    def live_at(self, moment: datetime) -> bool:
        return self.end is None or moment < self.end


def derive_subscriptions(
    tenant_id: str, events: Iterable[SubscriptionEvent], catalog: Catalog
) -> tuple[Subscription, ...]:
    """Every subscription of `tenant_id`, by start, from its subscription events.

    Events apply in order of `time` (truncated to the second; ties keep the given order, the
    log's). An event already applied (same id) is skipped. Raises UnknownPlanError,
    InvalidPeriodError or HistoryConflictError on the first event that cannot be applied.
    """
    ordered = sorted(events, key=lambda e: whole_second(e.time))
    drafts: list[_Draft] = []
    seen: set[str] = set()
    for event in ordered:
        if event.subject != tenant_id:
            raise HistoryConflictError(f"event {event.id} is about tenant {event.subject!r}, "
                                       f"not {tenant_id!r}")
        if event.id in seen:
            continue
        seen.add(event.id)
        kind = event.type.split(".")[2]
        if kind == "created":
            _created(drafts, event, catalog)
        elif kind == "canceled":
            _canceled(drafts, event)
        else:
            _changed(drafts, event, catalog)
    subscriptions = [_freeze(tenant_id, draft) for draft in drafts]
    return tuple(s for s in subscriptions if s is not None)


def _where(event: SubscriptionEvent) -> str:
    return f"tenant {event.subject!r}, event {event.id} ({event.type} at {event.time.isoformat()})"


def _plan_and_interval(event: SubscriptionEvent, catalog: Catalog) -> tuple[str, Interval]:
    data = event.data
    plan = catalog.plans.get(data.plan_id)
    if plan is None:
        raise UnknownPlanError(f"{_where(event)}: plan {data.plan_id!r} is not in the catalog")
    interval = interval_of(data.period_start, data.period_end)
    if interval is None and data.trial_end is not None:
        interval = interval_of(data.trial_end, data.period_end)  # the paid period after a trial
    if interval is None:
        raise InvalidPeriodError(
            f"{_where(event)}: period {data.period_start.isoformat()} to "
            f"{data.period_end.isoformat()} is neither one month nor one year")
    if interval == "year" and plan.yearly_fee_cents is None:
        raise InvalidPeriodError(f"{_where(event)}: plan {data.plan_id!r} has no yearly price")
    return data.plan_id, interval


def _live(drafts: list[_Draft], moment: datetime) -> _Draft | None:
    if drafts and drafts[-1].live_at(moment):
        return drafts[-1]
    return None


def _check_stripe_id(draft: _Draft, event: SubscriptionEvent) -> None:
    given = event.data.stripe_subscription_id
    if given is not None and given != draft.stripe_subscription_id:
        raise HistoryConflictError(
            f"{_where(event)}: stripe_subscription_id {given!r} differs from the subscription's "
            f"{draft.stripe_subscription_id!r} (who invoices cannot change mid-subscription)")
    draft.stripe_customer_id = event.data.stripe_customer_id or draft.stripe_customer_id


def _created(drafts: list[_Draft], event: SubscriptionEvent, catalog: Catalog) -> None:
    data = event.data
    plan_id, interval = _plan_and_interval(event, catalog)
    start = whole_second(data.period_start)
    # Live where the new one starts: a successor may be created to start when a scheduled
    # cancel takes effect.
    live = _live(drafts, start)
    if live is not None:
        if live.start == start and live.plans[0].plan_id == plan_id:
            return  # the same creation stated again
        raise HistoryConflictError(
            f"{_where(event)}: a subscription started {live.start.isoformat()} is still live")
    if drafts and drafts[-1].end is not None and start < drafts[-1].end:
        raise HistoryConflictError(f"{_where(event)}: starts {start.isoformat()}, before the "
                                   f"previous subscription ended")
    trial_end = whole_second(data.trial_end) if data.trial_end is not None else None
    drafts.append(_Draft(
        interval=interval, start=start,
        trial_end=trial_end if trial_end is not None and trial_end > start else None,
        plans=[PlanSpan(start, plan_id)], stripe_customer_id=data.stripe_customer_id,
        stripe_subscription_id=data.stripe_subscription_id,
    ))


def _changed(drafts: list[_Draft], event: SubscriptionEvent, catalog: Catalog) -> None:
    """plan_changed and renewed: a new plan or interval at the event's time, if any."""
    at = whole_second(event.time)
    live = _live(drafts, at)
    if live is None:
        raise HistoryConflictError(f"{_where(event)}: the tenant has no live subscription")
    if at < live.start:
        raise HistoryConflictError(f"{_where(event)}: before the subscription's start "
                                   f"{live.start.isoformat()}")
    _check_stripe_id(live, event)
    plan_id, interval = _plan_and_interval(event, catalog)
    if event.data.cancel_at_period_end is False and live.ended_by == "canceled_at_period_end":
        live.end, live.ended_by = None, None  # a scheduled cancel withdrawn
    if interval != live.interval:
        if at == live.start:
            live.interval, live.plans = interval, [PlanSpan(at, plan_id)]
            return
        # The old subscription ends here; the new one is anchored here (a trial carries on).
        live.end, live.ended_by = at, "interval_changed"
        trial_end = live.trial_end if live.trial_end is not None and at < live.trial_end else None
        drafts.append(_Draft(
            interval=interval, start=at, trial_end=trial_end, plans=[PlanSpan(at, plan_id)],
            stripe_customer_id=live.stripe_customer_id,
            stripe_subscription_id=live.stripe_subscription_id,
        ))
        return
    live.plans.append(PlanSpan(at, plan_id))


def _canceled(drafts: list[_Draft], event: SubscriptionEvent) -> None:
    data = event.data
    at = whole_second(event.time)
    live = _live(drafts, at)
    if live is None:
        last = drafts[-1] if drafts else None
        if last is not None and last.ended_by in _CANCELS and (
            last.plans[-1].plan_id == data.plan_id
            or (data.stripe_subscription_id is not None
                and data.stripe_subscription_id == last.stripe_subscription_id)
        ):
            return  # confirms a cancel that already took effect (e.g. Stripe's deletion)
        raise HistoryConflictError(f"{_where(event)}: cancel of an unknown subscription")
    if at < live.start:
        raise HistoryConflictError(f"{_where(event)}: before the subscription's start "
                                   f"{live.start.isoformat()}")
    _check_stripe_id(live, event)
    if data.cancel_at_period_end:
        end = whole_second(data.period_end)
        if end < at:
            raise HistoryConflictError(f"{_where(event)}: cancel at period end "
                                       f"{end.isoformat()}, which has already passed")
        live.end, live.ended_by = end, "canceled_at_period_end"
    else:
        live.end, live.ended_by = at, "canceled"


def _freeze(tenant_id: str, draft: _Draft) -> Subscription | None:
    """The draft as a Subscription, its plan spans normalised; None if it never ran."""
    if draft.end is not None and draft.end <= draft.start:
        return None
    spans: list[PlanSpan] = []
    for span in draft.plans:
        if draft.end is not None and span.start >= draft.end:
            continue
        if spans and spans[-1].start == span.start:
            spans.pop()  # two changes in the same second: the later one holds
        if spans and spans[-1].plan_id == span.plan_id:
            continue  # no change
        spans.append(span)
    return Subscription(
        subscription_id=subscription_id(tenant_id, draft.start), tenant_id=tenant_id,
        interval=draft.interval, start=draft.start, trial_end=draft.trial_end, end=draft.end,
        ended_by=draft.ended_by, plans=tuple(spans),
        stripe_customer_id=draft.stripe_customer_id,
        stripe_subscription_id=draft.stripe_subscription_id,
    )
