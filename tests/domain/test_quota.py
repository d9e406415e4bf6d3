from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain import quota
from schemas.plans import PlanMeter

FREE = PlanMeter(included=D(1000), hard_limit=D(1000))
STARTER = PlanMeter(included=D(10000), hard_limit=D(20000))
SOFT_ONLY = PlanMeter(included=D(100))


@pytest.mark.parametrize(("used", "terms", "expected"), [
    (D(0), FREE, "ok"),
    (D(799), FREE, "ok"),
    (D(800), FREE, "warning"),
    (D(999), FREE, "warning"),
    (D(1000), FREE, "blocked"),
    (D(10000), STARTER, "warning"),
    (D(10001), STARTER, "exceeded"),
    (D(20000), STARTER, "blocked"),
    (D(500), SOFT_ONLY, "exceeded"),
    (D(10**9), None, "ok"),
    (D(10**9), PlanMeter(), "ok"),
])
def test_quota_status_table(used: D, terms: PlanMeter | None, expected: str) -> None:
    assert quota.status(used, terms) == expected


def test_check_allows_up_to_the_hard_limit_and_not_past_it() -> None:
    assert quota.check(D(999), D(1000), D(1)).allowed
    decision = quota.check(D(999), D(1000), D(2))
    assert not decision.allowed and decision.remaining == D(1)
    assert quota.check(D(10**12), None, D(5)).allowed


def test_thresholds_crossed_are_listed_in_order() -> None:
    crossed = quota.crossed_thresholds(D(20000), STARTER)
    assert crossed == [("soft_limit", D(80)), ("soft_limit", D(100)), ("exceeded", None),
                       ("blocked", None)]


@given(st.integers(0, 30000), st.integers(0, 30000))
def test_quota_state_never_improves_as_usage_grows(a: int, b: int) -> None:
    order = ["ok", "warning", "exceeded", "blocked"]
    lo, hi = sorted((a, b))
    assert order.index(quota.status(D(lo), STARTER)) <= order.index(quota.status(D(hi), STARTER))
