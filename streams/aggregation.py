"""Meter aggregations (pure): how events fold into a period's counter.

A counter is fed from one source partition (the tenant's), and remembers the last source
offset folded into it: a record replayed after a crash (offset <= applied_offset) is not
folded again. That is what makes at-least-once delivery give exactly-once counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from schemas.plans import Aggregation

ZERO = Decimal(0)


@dataclass
class Counter:
    """A tenant's running aggregate for one meter and period."""

    tenant_id: str
    meter: str
    period_start: datetime
    period_end: datetime
    aggregation: Aggregation
    value: Decimal = ZERO
    event_count: int = 0
    applied_offset: int = -1
    # unique_count: the distinct values seen; latest: the time of the current value.
    distinct: set[str] = field(default_factory=set)
    latest_time: datetime | None = None
    # Thresholds already announced for this period (so each is emitted once).
    notified: set[str] = field(default_factory=set)
    # Not state: which processed record is being folded in (the worker's count of records,
    # see PartitionProcessor._start_folding). A record whose offset is already applied is
    # folded only while it is that record: a replayed or re-sent one is not.
    folding_record: int = field(default=0, compare=False, repr=False)

    def fold(self, quantity: Decimal, unique_value: str | None, event_time: datetime) -> None:
        """Add one (already deduplicated) event."""
        self.event_count += 1
        kind = self.aggregation
        if kind == "sum":
            self.value += quantity
        elif kind == "count":
            self.value += 1
        elif kind == "max":
            self.value = max(self.value, quantity) if self.event_count > 1 else quantity
        elif kind == "unique_count":
            if unique_value is not None and unique_value not in self.distinct:
                self.distinct.add(unique_value)
                self.value = Decimal(len(self.distinct))
        elif kind == "latest" and (self.latest_time is None or event_time >= self.latest_time):
            # Ties keep the later-processed event: deterministic for a given log.
            self.latest_time = event_time
            self.value = quantity

    def to_state(self) -> dict[str, Any]:
        """The changelog form (JSON-ready)."""
        return {
            "tenant_id": self.tenant_id,
            "meter": self.meter,
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(),
            "aggregation": self.aggregation,
            "value": str(self.value),
            "event_count": self.event_count,
            "applied_offset": self.applied_offset,
            "distinct": sorted(self.distinct),
            "latest_time": self.latest_time.isoformat() if self.latest_time else None,
            "notified": sorted(self.notified),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Counter:
        latest = state.get("latest_time")
        return cls(
            tenant_id=state["tenant_id"],
            meter=state["meter"],
            period_start=datetime.fromisoformat(state["period_start"]),
            period_end=datetime.fromisoformat(state["period_end"]),
            aggregation=state["aggregation"],
            value=Decimal(state["value"]),
            event_count=int(state["event_count"]),
            applied_offset=int(state["applied_offset"]),
            distinct=set(state.get("distinct", ())),
            latest_time=datetime.fromisoformat(latest) if latest else None,
            notified=set(state.get("notified", ())),
        )
