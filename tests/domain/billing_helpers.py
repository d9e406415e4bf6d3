"""Builders shared by the billing tests: subscription events, usage records, dates in 2026."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from domain.periods import add_months
from domain.usage_charges import UsageRecord
from schemas.events import SubscriptionEvent
from schemas.plans import Catalog, default_catalog_path, load_catalog

CATALOG: Catalog = load_catalog(default_catalog_path())
TENANT = "acme"
_ids = itertools.count()


def d(month: int, day: int, hour: int = 0, year: int = 2026) -> datetime:
    """A 2026 instant, 00:00 UTC unless an hour is given."""
    return datetime(year, month, day, hour, tzinfo=UTC)


def event(kind: str, time: datetime, plan: str, period_start: datetime | None = None,
          period_end: datetime | None = None, *, months: int = 1, tenant: str = TENANT,
          **data: Any) -> SubscriptionEvent:
    """A `tally.subscription.<kind>.v1` event; the period defaults to `months` from `time`."""
    start = period_start or time
    end = period_end or add_months(start, months)
    return SubscriptionEvent.model_validate({
        "specversion": "1.0", "id": f"ev-{next(_ids)}", "source": "test", "subject": tenant,
        "time": time, "type": f"tally.subscription.{kind}.v1",
        "data": {"plan_id": plan, "period_start": start, "period_end": end, **data},
    })


def use(time: datetime, meter: str, quantity: int | str,
        ingested_at: datetime | None = None) -> UsageRecord:
    """A usage record, ingested when it happened unless said otherwise."""
    return UsageRecord(time=time, meter=meter, quantity=Decimal(quantity),
                       ingested_at=ingested_at or time)
