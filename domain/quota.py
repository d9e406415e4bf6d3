"""Quota rules (pure): where a tenant stands against its plan, and whether to allow usage.

- blocked:  a hard limit exists and used >= hard limit (the next unit would pass it)
- exceeded: used > included (in overage), not blocked
- warning:  used >= the lowest soft threshold (percent of included)
- ok:       otherwise, and always when the meter is unlimited on the plan
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from schemas.plans import PlanMeter
from schemas.records import QuotaStatus

HUNDRED = Decimal(100)
Threshold = Literal["soft_limit", "exceeded", "blocked"]


def status(used: Decimal, terms: PlanMeter | None) -> QuotaStatus:
    """The quota state of `used` under a plan's terms for the meter (None: unlimited)."""
    if terms is None:
        return "ok"
    if terms.hard_limit is not None and used >= terms.hard_limit:
        return "blocked"
    if terms.included is None:
        return "ok"
    if used > terms.included:
        return "exceeded"
    if terms.soft_thresholds and terms.included > 0:
        lowest = min(terms.soft_thresholds)
        if used * HUNDRED >= lowest * terms.included:
            return "warning"
    return "ok"


def remaining(used: Decimal, terms: PlanMeter | None) -> Decimal | None:
    """Units left before the hard limit; None when there is none."""
    if terms is None or terms.hard_limit is None:
        return None
    return max(terms.hard_limit - used, Decimal(0))


def crossed_thresholds(
    used: Decimal, terms: PlanMeter | None
) -> list[tuple[Threshold, Decimal | None]]:
    """Every notification threshold `used` has reached: (kind, percent) pairs."""
    if terms is None:
        return []
    crossed: list[tuple[Threshold, Decimal | None]] = []
    if terms.included is not None and terms.included > 0:
        for percent in sorted(terms.soft_thresholds):
            if used * HUNDRED >= percent * terms.included:
                crossed.append(("soft_limit", percent))
        if used > terms.included:
            crossed.append(("exceeded", None))
    if terms.hard_limit is not None and used >= terms.hard_limit:
        crossed.append(("blocked", None))
    return crossed


@dataclass(frozen=True)
class Decision:
    """The answer to `may this tenant use `quantity` more of this meter?`"""

    allowed: bool
    reason: str
    remaining: Decimal | None


def check(used: Decimal, limit: Decimal | None, quantity: Decimal) -> Decision:
    """Allow when the usage after `quantity` stays within the hard limit."""
    if limit is None:
        return Decision(True, "unlimited", None)
    left = max(limit - used, Decimal(0))
    if used + quantity <= limit:
        return Decision(True, "within limit", left - quantity)
    return Decision(False, f"hard limit {limit} reached ({used} used)", left)


def check_after(used: Decimal, after: Decimal, limit: Decimal | None) -> Decision:
    """Allow a use that takes the meter's value from `used` to `after` (its kind decides
    `after`: domain.meters.MeterKind.after_use) when `after` stays within the hard limit."""
    if limit is None:
        return Decision(True, "unlimited", None)
    if after <= limit:
        return Decision(True, "within limit", limit - after)
    return Decision(False, f"hard limit {limit} reached ({used} used, {after} with this use)",
                    max(limit - used, Decimal(0)))
