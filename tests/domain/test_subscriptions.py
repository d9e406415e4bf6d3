"""Subscription history (docs/billing.md, rules 1 and 12): events to subscriptions and
segments; contradictions are typed errors, never a guess."""

from __future__ import annotations

import pytest

from domain.errors import DomainError
from domain.subscriptions import (
    HistoryConflictError,
    InvalidPeriodError,
    PlanSpan,
    Subscription,
    UnknownPlanError,
    derive_subscriptions,
)
from schemas.events import SubscriptionEvent
from tests.domain.billing_helpers import CATALOG, TENANT, d, event


def derive(*events: SubscriptionEvent) -> tuple[Subscription, ...]:
    return derive_subscriptions(TENANT, events, CATALOG)


def test_created_starts_a_monthly_subscription_at_its_period_start() -> None:
    (sub,) = derive(event("created", d(1, 1), "starter"))
    assert (sub.subscription_id, sub.interval, sub.start, sub.end) == (
        "acme/20260101T000000Z", "month", d(1, 1), None)
    assert sub.plans == (PlanSpan(d(1, 1), "starter"),)
    assert sub.invoiced_by_tally


def test_a_year_long_period_makes_a_yearly_subscription() -> None:
    (sub,) = derive(event("created", d(1, 1), "starter", months=12))
    assert sub.interval == "year"


def test_plan_changes_take_effect_at_the_event_time_in_time_order() -> None:
    (sub,) = derive(
        event("created", d(1, 1), "starter"),
        event("plan_changed", d(1, 20), "enterprise", d(1, 1), d(2, 1)),
        event("plan_changed", d(1, 11), "pro", d(1, 1), d(2, 1)),  # logged late
    )
    assert [(s.start, s.plan_id) for s in sub.plans] == [
        (d(1, 1), "starter"), (d(1, 11), "pro"), (d(1, 20), "enterprise")]
    assert sub.plan_at(d(1, 11)) == "pro"
    assert sub.plan_before(d(1, 11)) == "starter"


def test_a_redelivered_event_is_applied_once() -> None:
    created = event("created", d(1, 1), "starter")
    change = event("plan_changed", d(1, 11), "pro", d(1, 1), d(2, 1))
    assert derive(created, change, change, created) == derive(created, change)


def test_cancel_at_period_end_ends_at_period_end_and_immediate_cancel_at_once() -> None:
    (later,) = derive(event("created", d(1, 1), "pro"),
                      event("canceled", d(1, 10), "pro", d(1, 1), d(2, 1),
                            cancel_at_period_end=True))
    (now,) = derive(event("created", d(1, 1), "pro"),
                    event("canceled", d(1, 10), "pro", d(1, 1), d(2, 1)))
    assert (later.end, later.ended_by) == (d(2, 1), "canceled_at_period_end")
    assert (now.end, now.ended_by) == (d(1, 10), "canceled")


def test_a_scheduled_cancel_can_be_withdrawn_and_its_confirmation_changes_nothing() -> None:
    created = event("created", d(1, 1), "pro")
    schedule = event("canceled", d(1, 10), "pro", d(1, 1), d(2, 1), cancel_at_period_end=True)
    (withdrawn,) = derive(created, schedule, event("renewed", d(1, 12), "pro", d(1, 1), d(2, 1),
                                                   cancel_at_period_end=False))
    assert withdrawn.end is None
    confirmed = derive(created, schedule, event("canceled", d(2, 1, 1), "pro", d(1, 1), d(2, 1)))
    assert confirmed == derive(created, schedule)


def test_an_interval_change_ends_the_subscription_and_starts_one_anchored_there() -> None:
    old, new = derive(event("created", d(1, 1), "starter"),
                      event("plan_changed", d(1, 11), "starter", d(1, 11), d(1, 11, year=2027)))
    assert (old.end, old.ended_by) == (d(1, 11), "interval_changed")
    assert (new.start, new.anchor, new.interval) == (d(1, 11), d(1, 11), "year")


def test_a_new_subscription_after_a_cancel_is_a_second_subscription() -> None:
    first, second = derive(event("created", d(1, 1), "starter"),
                           event("canceled", d(1, 10), "starter", d(1, 1), d(2, 1)),
                           event("created", d(2, 5), "pro"))
    assert (first.end, second.start) == (d(1, 10), d(2, 5))


def test_a_successor_may_start_where_a_scheduled_cancel_ends_its_predecessor() -> None:
    first, second = derive(event("created", d(1, 1), "starter"),
                           event("canceled", d(1, 10), "starter", d(1, 1), d(2, 1),
                                 cancel_at_period_end=True),
                           event("created", d(1, 10), "pro", d(2, 1)))
    assert (first.end, second.start, second.plans[0].plan_id) == (d(2, 1), d(2, 1), "pro")


def test_segments_cut_at_trial_end_and_plan_changes_and_end_canceled() -> None:
    (sub,) = derive(event("created", d(1, 1), "pro", trial_end=d(1, 15)),
                    event("plan_changed", d(1, 20), "starter", d(1, 15), d(2, 15)),
                    event("canceled", d(2, 1), "starter", d(1, 15), d(2, 15)))
    assert [(s.plan_id, s.status, s.valid_from, s.valid_to, s.currency)
            for s in sub.segments(CATALOG)] == [
        ("pro", "trialing", d(1, 1), d(1, 15), "usd"),
        ("pro", "active", d(1, 15), d(1, 20), "usd"),
        ("starter", "active", d(1, 20), d(2, 1), "usd"),
        ("starter", "canceled", d(2, 1), None, "usd"),
    ]


def test_a_trial_event_gives_its_interval_by_the_paid_period_after_the_trial() -> None:
    (sub,) = derive(event("created", d(1, 1), "pro", d(1, 1), d(2, 15), trial_end=d(1, 15)))
    assert (sub.interval, sub.anchor) == ("month", d(1, 15))


def test_stripe_billed_subscriptions_are_not_invoiced_by_tally() -> None:
    (sub,) = derive(event("created", d(1, 1), "pro", stripe_subscription_id="sub_1"))
    assert not sub.invoiced_by_tally


# --- errors (rule 12) ---------------------------------------------------------------------


def test_a_plan_missing_from_the_catalog_is_an_error_not_free() -> None:
    with pytest.raises(UnknownPlanError, match="'platinum' is not in the catalog"):
        derive(event("created", d(1, 1), "platinum"))


@pytest.mark.parametrize("months", [3, 6, 24])
def test_a_period_neither_a_month_nor_a_year_is_an_error(months: int) -> None:
    with pytest.raises(InvalidPeriodError, match="neither one month nor one year"):
        derive(event("created", d(1, 1), "starter", months=months))


def test_a_yearly_period_on_a_plan_without_a_yearly_price_is_an_error() -> None:
    with pytest.raises(InvalidPeriodError, match="no yearly price"):
        derive(event("created", d(1, 1), "free", months=12))


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([event("canceled", d(1, 5), "pro", d(1, 1), d(2, 1))], "unknown subscription"),
        ([event("plan_changed", d(1, 5), "pro", d(1, 1), d(2, 1))], "no live subscription"),
        ([event("created", d(1, 1), "starter", d(1, 10)),  # created Jan 1, starting Jan 10
          event("plan_changed", d(1, 5), "pro", d(1, 1), d(2, 1))], "before the subscription"),
        ([event("created", d(1, 1), "starter"), event("created", d(1, 5), "pro")],
         "still live"),
        ([event("created", d(1, 1), "starter"),
          event("canceled", d(1, 20), "starter", d(1, 1), d(1, 15),
                cancel_at_period_end=True)], "already passed"),
        ([event("created", d(1, 1), "starter"),
          event("plan_changed", d(1, 5), "pro", d(1, 1), d(2, 1),
                stripe_subscription_id="sub_9")], "who invoices"),
    ],
)
def test_an_event_contradicting_the_history_is_an_error(events: list[SubscriptionEvent],
                                                         message: str) -> None:
    with pytest.raises(HistoryConflictError, match=message) as raised:
        derive(*events)
    assert isinstance(raised.value, DomainError)
    assert "acme" in str(raised.value)
