"""A checked fast path for reading usage events off the wire (pure).

Validating a decoded event with the `UsageEvent` model costs several times more than
everything else the worker does with it. Almost every event is plain: exact JSON types,
an RFC 3339 time, a decimal quantity. `read_usage` accepts exactly such events and returns
what the model would have produced; anything else returns None, and the caller validates
it with the model, which decides (and explains) every other case. A hypothesis test holds
the two paths equal (tests/schemas/test_fast_usage.py).

The pre-batching stage (streams/prebatch.py) runs these checks in its own process, so that
the worker's core does not: `check_record` turns a record whose events are all plain into
compact rows, and the worker reads them back with `read_checked`, skipping the checks.
Whether the meter is in the catalog is left to the worker, which follows the catalog.
"""

from __future__ import annotations

import re
from collections.abc import Container
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple, TypeVar

from schemas.codec import RecordDecodeError, decode_record, dumps, is_batch_value, loads
from schemas.events import NAME_PATTERN, TENANT_PATTERN, USAGE_TYPE, UsageEvent
from schemas.validation import read_quantity, texts_acceptable

# What both the model's parser and datetime.fromisoformat read the same way, in years that
# any UTC offset keeps inside 1970..9999 (schemas/validation.py: no overflow, not before
# 1970); anything else (other separators, more digits, no offset, 1970 or 9999 whose
# offset decides) goes to the model.
_TIME = re.compile(r"(?:19[7-9]\d|[2-9]\d{3})-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?"
                   r"(?:Z|[+-]\d\d:\d\d)", re.ASCII)
# Plain decimal text, as the worker writes quantities for the projector (fast_accepted).
_DECIMAL = re.compile(r"\d{1,16}(?:\.\d{1,20})?", re.ASCII)
_YEARS_FOR_THE_MODEL = ("1970", "9999")
_METER_NAME = re.compile(NAME_PATTERN.strip("^$"), re.ASCII)
_JSON = "application/json"

# Texts already read, and what they read as: events of a batch often share a timestamp
# (the SDK stamps in milliseconds) and most quantities are a few small numbers. Emptied
# when full, so they stay small.
_CACHE_LIMIT = 4096
_times: dict[str, datetime] = {}
_amounts: dict[str, Decimal] = {}
_K = TypeVar("_K")
_V = TypeVar("_V")


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> _V:
    """Put `value` in `cache` under `key`, emptying the cache first when it is full."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


class Usage(NamedTuple):
    """A valid usage event, as the worker uses it."""

    id: str
    source: str
    subject: str
    time: datetime  # aware, in the offset it was sent with
    meter: str
    quantity: Decimal
    dimensions: dict[str, str]


_new_tuple = tuple.__new__
# The types a JSON quantity decodes to (read_quantity also takes Decimals).
_JSON_NUMBERS = frozenset((str, int, float))


def read_time(text: str) -> datetime | None:
    """An RFC 3339 time with an offset, read as the models read it; None for anything
    else (the model then decides)."""
    moment = _times.get(text)
    if moment is None:
        if _TIME.fullmatch(text) is None or text[:4] in _YEARS_FOR_THE_MODEL:
            return None
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:  # a field out of range, such as month 13
            return None
        _remember(_times, text, moment)
    return moment


def read_decimal(text: str) -> Decimal | None:
    """Plain non-negative decimal text (no sign, exponent or spaces), else None."""
    amount = _amounts.get(text)
    if amount is None:
        if _DECIMAL.fullmatch(text) is None:
            return None
        amount = _remember(_amounts, text, Decimal(text))
    return amount


def from_model(event: UsageEvent) -> Usage:
    """The same tuple from an event the model validated."""
    d = event.data
    return Usage(event.id, event.source, event.subject, event.time, d.meter, d.quantity,
                 dict(d.dimensions))


def read_usage(item: Any, tenant: str | None, meters: Container[str]) -> Usage | None:
    """The event in `item` if it is plain, valid, about `tenant` (already a valid tenant
    id; None when the record key is not one) and for one of `meters` (valid meter names);
    otherwise None."""
    if tenant is None or type(item) is not dict:
        return None
    size = len(item)
    if size == 8:
        if item.get("datacontenttype") != _JSON:
            return None
    elif size != 7:
        return None
    try:
        event_id = item["id"]
        source = item["source"]
        time_text = item["time"]
        data = item["data"]
        if (item["specversion"] != "1.0" or item["type"] != USAGE_TYPE
                or item["subject"] != tenant):
            return None
    except KeyError:
        return None
    if (type(event_id) is not str or not 0 < len(event_id) <= 128
            or type(source) is not str or not 0 < len(source) <= 256
            or type(time_text) is not str or type(data) is not dict
            or not texts_acceptable(event_id, source)):
        return None
    moment = read_time(time_text)
    if moment is None:
        return None

    meter = data.get("meter")
    quantity = data.get("quantity")
    dimensions = data.get("dimensions")
    if (len(data) != 2 + (dimensions is not None) or type(meter) is not str
            or meter not in meters or quantity is None):
        return None  # other keys, a missing meter or quantity, or an explicit null
    if dimensions is None:
        dimensions = {}
    elif type(dimensions) is not dict or len(dimensions) > 32 or not all(
        type(k) is str and type(v) is str and len(k) <= 64 and len(v) <= 256
        and texts_acceptable(k, v)
        for k, v in dimensions.items()
    ):
        return None

    amount = read_quantity(quantity)
    if amount is None or type(quantity) not in _JSON_NUMBERS:
        return None
    # tuple.__new__: a NamedTuple's own constructor is a Python function, and this is
    # once per event.
    return _new_tuple(Usage, (event_id, source, tenant, moment, meter, amount, dimensions))


# --- checked records: read in the pre-batching process, used by the worker --------------

# A checked event: what the worker needs of it, as sent. Its subject is the record key and
# its type USAGE_TYPE; `time` is its RFC 3339 text, `quantity` its JSON value, `dimensions`
# None when the event has none, and the last field tells whether it named its content type.
Row = tuple[str, str, str, str, str | int | float, dict[str, str] | None, bool]


class _MeterNames:
    """Every valid meter name: the pre-batching stage does not follow the catalog."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __contains__(self, name: object) -> bool:
        if name in self._seen:
            return True
        if not isinstance(name, str) or _METER_NAME.fullmatch(name) is None:
            return False
        if len(self._seen) >= _CACHE_LIMIT:
            self._seen.clear()
        self._seen.add(name)
        return True


_meter_names = _MeterNames()


def check_record(key: bytes | None, value: bytes | None) -> bytes | None:
    """The usage record as checked rows, `[is_batch, [row, ...]]` encoded, when its key is
    a valid tenant id and every event in it is plain and valid (its meter only has to be a
    valid name); None when the worker has to read the record itself."""
    if not key or not value:
        return None
    try:
        tenant = key.decode()
        items = decode_record(value)
    except (UnicodeDecodeError, RecordDecodeError):
        return None
    if TENANT_PATTERN.fullmatch(tenant) is None:
        return None
    rows = []
    for item in items:
        if read_usage(item, tenant, _meter_names) is None:
            return None
        data = item["data"]
        rows.append((item["id"], item["source"], item["time"], data["meter"],
                     data["quantity"], data.get("dimensions"), len(item) == 8))
    return dumps((is_batch_value(value), rows))


def read_checked(payload: bytes, tenant: str) -> tuple[bool, list[Row], list[Usage | None]]:
    """Whether the record was a batch, its rows, and their events, from what
    `check_record` wrote for a record keyed `tenant`: the same events `read_usage` reads
    from the record. A row whose time or quantity the rules refuse (written by an earlier
    version of the stage, whose rules were looser) reads as None: the worker then has the
    model judge the event (`item_of_row`) and dead-letters it."""
    is_batch, rows = loads(payload)
    times = _times
    events: list[Usage | None] = []
    for event_id, source, time_text, meter, quantity, dimensions, _ in rows:
        moment = times.get(time_text)
        if moment is None:
            moment = read_time(time_text)
        amount = read_quantity(quantity)
        if moment is None or amount is None:
            events.append(None)
            continue
        events.append(_new_tuple(Usage, (event_id, source, tenant, moment, meter, amount,
                                         {} if dimensions is None else dimensions)))
    return is_batch, rows, events


def item_of_row(row: Row, tenant: str) -> dict[str, Any]:
    """The event a row was read from (its members in the usual order), for a dead letter."""
    event_id, source, time_text, meter, quantity, dimensions, named_content_type = row
    data: dict[str, Any] = {"meter": meter, "quantity": quantity}
    if dimensions is not None:
        data["dimensions"] = dimensions
    item: dict[str, Any] = {"specversion": "1.0", "id": event_id, "source": source,
                            "type": USAGE_TYPE, "subject": tenant, "time": time_text}
    if named_content_type:
        item["datacontenttype"] = _JSON
    item["data"] = data
    return item
