"""A checked fast path for reading accepted events off `tally.usage.accepted` (pure).

The worker writes these records itself (streams/processor.py builds each event as a dict),
so almost every event is plain: exactly the keys of `AcceptedEvent`, exact JSON types,
ISO 8601 times with an offset, a plain decimal quantity. Validating such an event with the
model costs more than staging it for the ledger. `read_accepted` accepts exactly the plain
events that the ledger takes too (nothing `accepted_problems` would report) and returns
what the model would have produced; anything else returns None, and the caller validates
it with the model and `accepted_problems`, which decide (and explain) every other case.
A hypothesis test holds the two paths equal (tests/projections/test_fast_accepted.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from domain.meters import KINDS
from projections.ledger import Accepted
from schemas.fast_usage import read_decimal, read_time
from schemas.records import AcceptedEvent

_FIELDS = len(Accepted._fields)

_new_tuple = tuple.__new__


def from_model(event: AcceptedEvent) -> Accepted:
    """The same tuple from an event the model validated."""
    return Accepted(**dict(event))


def _time(text: Any) -> datetime | None:
    return read_time(text) if type(text) is str else None


def read_accepted(item: Any) -> Accepted | None:
    """The event in `item` if it is plain, valid and fit for the ledger; otherwise None."""
    if type(item) is not dict or len(item) != _FIELDS:
        return None
    try:
        tenant_id = item["tenant_id"]
        event_id = item["event_id"]
        meter = item["meter"]
        aggregation = item["aggregation"]
        unique_value = item["unique_value"]
        quantity = item["quantity"]
        source = item["source"]
        dimensions = item["dimensions"]
        plan_id = item["plan_id"]
        late = item["late"]
        adjustment = item["adjustment"]
        event_time = _time(item["event_time"])
        ingested_at = _time(item["ingested_at"])
        period_start = _time(item["period_start"])
        period_end = _time(item["period_end"])
    except KeyError:
        return None  # a key missing, so (with as many keys as fields) another one extra
    if (type(tenant_id) is not str or type(event_id) is not str or type(meter) is not str
            or type(source) is not str or type(plan_id) is not str
            or type(aggregation) is not str or aggregation not in KINDS
            or (unique_value is not None and type(unique_value) is not str)
            or type(late) is not bool or type(adjustment) is not bool
            or type(dimensions) is not dict or type(quantity) is not str):
        return None  # bools, numbers and nulls for texts (or texts for bools) included
    if (event_time is None or ingested_at is None or period_start is None
            or period_end is None or period_end <= period_start):
        return None
    # Postgres text cannot hold NUL.
    if ("\x00" in tenant_id or "\x00" in event_id or "\x00" in meter or "\x00" in source
            or "\x00" in plan_id or (unique_value is not None and "\x00" in unique_value)):
        return None
    for key, value in dimensions.items():
        if type(key) is not str or type(value) is not str or "\x00" in key or "\x00" in value:
            return None

    amount = read_decimal(quantity)
    if amount is None:
        return None
    # tuple.__new__: a NamedTuple's own constructor is a Python function, and this is
    # once per event.
    return _new_tuple(Accepted, (
        tenant_id, event_id, meter, aggregation, unique_value, amount, event_time,
        ingested_at, source, dimensions, period_start, period_end, plan_id, late,
        adjustment))
