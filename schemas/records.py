"""Records the worker writes: its decisions, counters, quota states, DLQ entries.

These are contracts too: services read quota states, projections read accepted events.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from schemas.codec import dumps

Frozen = ConfigDict(frozen=True, extra="forbid")

QuotaStatus = Literal["ok", "warning", "exceeded", "blocked"]


class AcceptedEvent(BaseModel):
    """One event the worker decided to count, with the period and plan it counts under.

    `ingested_at` is the source record's Kafka timestamp, so replays reproduce it.
    `late`: arrived after its period ended but within the meter's lateness window.
    `adjustment`: arrived after the window; counted in `period_start` (the open period)
    instead of the period of its event time, and flagged for the next invoice.
    """

    model_config = Frozen

    tenant_id: str
    event_id: str
    meter: str
    aggregation: str  # the meter's aggregation, so rollups fold it the same way
    # unique_count meters: the value of the counted dimension (None for other meters).
    unique_value: str | None = None
    quantity: Decimal
    event_time: datetime
    ingested_at: datetime
    source: str
    dimensions: dict[str, str]
    period_start: datetime
    period_end: datetime
    plan_id: str
    late: bool = False
    adjustment: bool = False


class CounterValue(BaseModel):
    """Running aggregate of one tenant, meter and period (`tally.counters`)."""

    model_config = Frozen

    tenant_id: str
    meter: str
    period_start: datetime
    period_end: datetime
    aggregation: str
    value: Decimal
    event_count: int
    # Source (tally.usage) partition and the last offset folded into `value`.
    partition: int
    applied_offset: int


class QuotaState(BaseModel):
    """A tenant's standing against its plan for one meter (`tally.quota-state`)."""

    model_config = Frozen

    tenant_id: str
    meter: str
    plan_id: str
    period_start: datetime
    period_end: datetime
    used: Decimal
    included: Decimal | None
    limit: Decimal | None
    remaining: Decimal | None
    state: QuotaStatus


class DeadLetter(BaseModel):
    """A record, or one event of a batch record, that could not be counted (by the worker)
    or stored (by the projector, which names `tally.usage.accepted` or the topic it read
    as `source_topic`).

    A dead letter is identified by its source position (`source_topic`, `source_partition`,
    `source_offset`, `index`): a stage that restarts may write one again, with the same
    position, so counting dead letters means counting distinct positions.
    """

    model_config = Frozen

    reason: str
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int
    index: int | None  # position in a batch record; None for the whole record
    key: str | None
    value: str  # the offending event (or whole record) as text

    def headers(self) -> list[tuple[str, bytes]]:
        """The Kafka headers of its record: reason and detail, readable without the body."""
        return [(DLQ_REASON_HEADER, self.reason.encode()),
                (DLQ_DETAIL_HEADER, self.detail[:1000].encode("utf-8", "replace"))]


DLQ_REASON_HEADER = "tally-dlq-reason"
DLQ_DETAIL_HEADER = "tally-dlq-detail"
# A dead letter carries the offending event as text, cut to this many characters: the
# whole record stays in the source topic at the partition and offset the letter names.
MAX_DEAD_LETTER_TEXT = 64_000


def dead_letter_text(raw: Any) -> str:
    """The offending record or event as a dead letter carries it (cut, see above)."""
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", "replace")
    else:
        try:
            text = dumps(raw).decode()
        except TypeError:
            text = repr(raw)
    if len(text) > MAX_DEAD_LETTER_TEXT:
        return text[:MAX_DEAD_LETTER_TEXT] + f"... [cut; {len(text)} characters in all]"
    return text


class Notification(BaseModel):
    """A threshold crossing, emitted once per tenant, meter, period and threshold."""

    model_config = Frozen

    tenant_id: str
    meter: str
    plan_id: str
    period_start: datetime
    kind: Literal["soft_limit", "exceeded", "blocked", "trial_ending"]
    threshold_percent: Decimal | None
    used: Decimal
    limit: Decimal | None
