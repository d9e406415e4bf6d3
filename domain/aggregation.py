"""The worker's running counters (pure): one per tenant, meter and period.

How an event folds into the value depends on the meter's kind (domain/meters.py); this
module keeps what every counter needs around that: dedup against replays, its changelog
form, and the distinct values of unique_count counters.

A counter is fed from one source partition (the tenant's), and remembers the last source
offset folded into it: a record replayed after a crash (offset <= applied_offset) is not
folded again. That is what makes at-least-once delivery give exactly-once counts.

A unique_count counter's distinct values are not all in its state record: they can be
many, and the record is written at every batch that touches the counter. They go to the
changelog in segments of the values new since the last segment (`take_distinct_segment`);
the state record carries only the newest segment's values too, so that either record alone
keeps them (see PartitionProcessor.finish_restore).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from domain.meters import KINDS, MeterKind
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
    applied_offset: int = -1  # of the owner's own (home) source partition
    # unique_count: the distinct values seen; latest: the time of the current value.
    distinct: set[str] = field(default_factory=set)
    distinct_segments: int = 0  # segments of distinct values written so far
    latest_time: datetime | None = None
    # Thresholds already announced for this period (so each is emitted once).
    notified: set[str] = field(default_factory=set)
    # The last offset folded from each other source partition (records of producers whose
    # partitioner is not Tally's, see streams/processor.py); empty in the common case.
    applied_from: dict[int, int] = field(default_factory=dict)
    # Not state: which processed record is being folded in (the worker's count of records,
    # see PartitionProcessor._start_folding). A record whose offset is already applied is
    # folded only while it is that record: a replayed or re-sent one is not.
    folding_record: int = field(default=0, compare=False, repr=False)
    # Distinct values added since the last segment (not state), and those of the segment
    # taken last (in the state record).
    distinct_unwritten: list[str] = field(default_factory=list, compare=False, repr=False)
    distinct_latest: list[str] = field(default_factory=list, compare=False, repr=False)
    kind: MeterKind = field(init=False, compare=False, repr=False)  # of `aggregation`

    def __post_init__(self) -> None:
        self.kind = KINDS[self.aggregation]

    def fold(self, quantity: Decimal, unique_value: str | None, event_time: datetime) -> None:
        """Add one (already deduplicated) event, as the meter's kind folds it."""
        self.event_count += 1
        self.kind.fold(self, quantity, unique_value, event_time)

    def take_distinct_segment(self) -> tuple[int, list[str]] | None:
        """The distinct values added since the last segment, with the segment's number;
        None when there are none."""
        values, self.distinct_unwritten = self.distinct_unwritten, []
        self.distinct_latest = values
        if not values:
            return None
        self.distinct_segments += 1
        return self.distinct_segments - 1, values

    def restore_distinct(self, values: Iterable[str]) -> None:
        """Add distinct values read back from the changelog."""
        self.distinct.update(values)
        if self.aggregation == "unique_count":
            # Values of a batch whose counter state was lost in a crash are counted too:
            # their records are replayed, and a set does not count them twice.
            self.value = Decimal(len(self.distinct))

    def to_state(self) -> dict[str, Any]:
        """The changelog form (JSON-ready); distinct values go in segments."""
        state: dict[str, Any] = {
            "tenant_id": self.tenant_id,
            "meter": self.meter,
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(),
            "aggregation": self.aggregation,
            "value": str(self.value),
            "event_count": self.event_count,
            "applied_offset": self.applied_offset,
            "distinct_segments": self.distinct_segments,
            "distinct_latest": self.distinct_latest,
            "latest_time": self.latest_time.isoformat() if self.latest_time else None,
            "notified": sorted(self.notified),
        }
        if self.applied_from:  # absent in the common case: the form older workers wrote
            state["applied_from"] = {str(p): o for p, o in sorted(self.applied_from.items())}
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Counter:
        latest = state.get("latest_time")
        counter = cls(
            tenant_id=state["tenant_id"],
            meter=state["meter"],
            period_start=datetime.fromisoformat(state["period_start"]),
            period_end=datetime.fromisoformat(state["period_end"]),
            aggregation=state["aggregation"],
            value=Decimal(state["value"]),
            event_count=int(state["event_count"]),
            applied_offset=int(state["applied_offset"]),
            distinct={*state.get("distinct", ()), *state.get("distinct_latest", ())},
            distinct_segments=int(state.get("distinct_segments", 0)),
            latest_time=datetime.fromisoformat(latest) if latest else None,
            notified=set(state.get("notified", ())),
            applied_from={int(p): int(o) for p, o in state.get("applied_from", {}).items()},
        )
        counter.distinct_latest = list(state.get("distinct_latest", ()))
        if "distinct" in state:  # written before segments: its values go to the next one
            counter.distinct_unwritten = sorted(counter.distinct)
        return counter
