"""The wire form of the events the SDK publishes, validated at the call site.

The rules are those of `schemas.events.UsageEvent`: common, obviously-valid input takes a
fast path (`fast_usage_event`) that checks the same rules without building the model
(tests/producers/test_validation.py proves with hypothesis that both agree); anything else
is validated by the model itself, and `InvalidEventError` lists every problem.
"""

from __future__ import annotations

import re
import time as _time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from pydantic import ValidationError

from producers.errors import InvalidEventError, Problem
from producers.ids import new_event_id
from schemas.events import (
    NAME_PATTERN,
    TENANT_PATTERN,
    USAGE_TYPE,
    SubscriptionEvent,
    UsageEvent,
)
from schemas.validation import (
    DEFAULT_MAX_FUTURE,
    EARLIEST_TIME,
    MAX_QUANTITY,
    future_problem,
    read_quantity,
    texts_acceptable,
)

# The largest int quantity the shared rules accept (schemas/validation.py).
_MAX_INT_QUANTITY = int(MAX_QUANTITY)

SubscriptionKind = Literal["created", "plan_changed", "canceled", "renewed"]
TallyEvent = UsageEvent | SubscriptionEvent


class _UtcClock:
    """Now, to the millisecond, as the text the UsageEvent model writes for it, cheaply.

    Default event times have millisecond precision (like the UUIDv7 event id), so the text
    changes once per ms, not per event: at 150k events/s that saves a format per event.
    The model writes the fraction as 6 digits, and none at all when it is zero.
    """

    def __init__(self) -> None:
        self._ms = -1
        self._second = -1
        self._prefix = ""
        self._text = ""

    def now_text(self) -> str:
        ms = _time.time_ns() // 1_000_000
        if ms != self._ms:
            self._ms = ms
            second, milli = divmod(ms, 1000)
            if second != self._second:
                self._second = second
                self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._text = f"{self._prefix}.{milli:03d}000Z" if milli else f"{self._prefix}Z"
        return self._text


_CLOCK = _UtcClock()


# ---------------------------------------------------------------------------------------
# Validation: the UsageEvent model's rules, with a fast path for plain input.
# ---------------------------------------------------------------------------------------

_NAME_RE = re.compile(NAME_PATTERN)
_EARLIEST_SECONDS = EARLIEST_TIME.timestamp()
_KNOWN_CACHE_SIZE = 65_536
_known_tenants: set[str] = set()
_known_meters: set[str] = set()

# Field paths of the models, named as the SDK's parameters.
_USAGE_FIELDS = {
    "subject": "tenant", "id": "event_id", "time": "time", "source": "source",
    "data.meter": "meter", "data.quantity": "quantity", "data.dimensions": "dimensions",
}
_SUBSCRIPTION_FIELDS = {"subject": "tenant", "id": "event_id", "time": "time",
                        "source": "source"}


def _remember(known: set[str], value: str) -> None:
    if len(known) >= _KNOWN_CACHE_SIZE:  # bounded (DESIGN.md guarantee 5)
        known.clear()
    known.add(value)


def fast_usage_event(
    tenant: object, meter: object, quantity: object, dimensions: object,
    event_id: object, time: object, source: str,
    max_future: timedelta = DEFAULT_MAX_FUTURE,
) -> dict[str, Any] | None:
    """The wire form of a usage event if the input is plain and valid, else None.

    Plain means exact builtin types (str, int, float, Decimal, dict, UTC datetime). Returns
    exactly `UsageEvent(...).model_dump(mode="json")` for such input; None sends the
    caller to the model, which decides (and explains) everything else. The rules are those
    of schemas/validation.py, called here; `max_future` bounds an explicit `time`.
    """
    if type(tenant) is not str or type(meter) is not str:
        return None
    if tenant not in _known_tenants:
        # Same check as the model's (schemas.events._check_tenant).
        if not TENANT_PATTERN.fullmatch(tenant):
            return None
        _remember(_known_tenants, tenant)
    if meter not in _known_meters:
        # fullmatch: the model's pattern is anchored at the true end of the text.
        if not _NAME_RE.fullmatch(meter):
            return None
        _remember(_known_meters, meter)

    qtype = type(quantity)
    if qtype is not int and qtype is not float and qtype is not Decimal:
        return None  # text (its grammar) and subclasses: the model
    amount = read_quantity(quantity)
    if amount is None:
        return None

    if dimensions is None:
        dims: dict[str, str] = {}
    elif type(dimensions) is dict and len(dimensions) <= 32:
        for k, v in dimensions.items():
            if (type(k) is not str or type(v) is not str or len(k) > 64 or len(v) > 256
                    or not texts_acceptable(k, v)):
                return None
        dims = dimensions
    else:
        return None

    if event_id is None:
        eid = new_event_id()
    elif type(event_id) is str and 0 < len(event_id) <= 128 and texts_acceptable(event_id):
        eid = event_id
    else:
        return None
    if not 0 < len(source) <= 256 or not texts_acceptable(source):
        return None

    if time is None:
        stamp = _CLOCK.now_text()
    elif type(time) is datetime and time.tzinfo is UTC:
        seconds = time.timestamp()
        if seconds < _EARLIEST_SECONDS or seconds > _time.time() + max_future.total_seconds():
            return None  # the model and future_problem say why
        # isoformat of a UTC datetime ends in "+00:00"; the model writes "Z".
        stamp = time.isoformat()[:-6] + "Z"
    else:
        return None

    return {
        "specversion": "1.0",
        "id": eid,
        "source": source,
        "subject": tenant,
        "time": stamp,
        "datacontenttype": "application/json",
        "type": USAGE_TYPE,
        "data": {"meter": meter, "quantity": str(amount), "dimensions": dims},
    }


def fast_usage_json(tenant: object, meter: object, quantity: object,
                    source_json: str) -> bytes | None:
    """The encoded wire form of the commonest event, or None for any other.

    The commonest event: a tenant and meter already seen valid, an int quantity, no
    dimensions, id or time given. Its bytes are written straight from a template, skipping
    the dict and its encoding (a third of the SDK's cost per event): every text in it is
    one JSON writes as it is (tenant ids and meter names admit no character that JSON
    escapes; the id, time and quantity are ours), and `source_json` is the source already
    encoded. Byte for byte what `codec.dumps(fast_usage_event(...))` writes for the same
    id and time (tests/producers/test_validation.py).
    """
    if (type(tenant) is not str or type(meter) is not str or type(quantity) is not int
            or tenant not in _known_tenants or meter not in _known_meters
            or not 0 <= quantity <= _MAX_INT_QUANTITY):
        return None
    return (
        f'{{"specversion":"1.0","id":"{new_event_id()}","source":{source_json},'
        f'"subject":"{tenant}","time":"{_CLOCK.now_text()}",'
        f'"datacontenttype":"application/json","type":"{USAGE_TYPE}",'
        f'"data":{{"meter":"{meter}","quantity":"{quantity}","dimensions":{{}}}}}}'
    ).encode()


def _problems(error: ValidationError, names: Mapping[str, str]) -> list[Problem]:
    found = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        path = ".".join(loc)
        for prefix in sorted(names, key=len, reverse=True):
            if path == prefix or path.startswith(prefix + "."):
                path = names[prefix] + path[len(prefix) :]
                break
        if path.startswith("data."):
            path = path[len("data.") :]
        found.append(Problem(path, item["msg"]))
    return found


def _envelope(event_type: str, tenant: str, source: str, event_id: str | None,
              time: datetime | None, data: dict[str, Any]) -> dict[str, Any]:
    """The CloudEvents envelope of an event the SDK builds (a new id and now by default)."""
    return {
        "specversion": "1.0",
        "id": new_event_id() if event_id is None else event_id,
        "source": source,
        "subject": tenant,
        "time": datetime.now(UTC) if time is None else time,
        "datacontenttype": "application/json",
        "type": event_type,
        "data": data,
    }


def build_usage_event(
    tenant: str, meter: str, quantity: int | float | Decimal | str, *,
    dimensions: Mapping[str, str] | None = None, event_id: str | None = None,
    time: datetime | None = None, source: str, max_future: timedelta = DEFAULT_MAX_FUTURE,
) -> dict[str, Any]:
    """The wire form of a usage event (as `UsageEvent.model_dump(mode="json")`).

    `dimensions=None` means no dimensions, `event_id=None` a new UUIDv7, `time=None` now
    (to the millisecond); an explicit `time` may be at most `max_future` ahead of now.
    Raises InvalidEventError naming every problem.
    """
    fast = fast_usage_event(tenant, meter, quantity, dimensions, event_id, time, source,
                            max_future)
    if fast is not None:
        return fast
    data: dict[str, Any] = {"meter": meter, "quantity": quantity}
    if dimensions is not None:
        data["dimensions"] = dimensions
    try:
        event = UsageEvent.model_validate(
            _envelope(USAGE_TYPE, tenant, source, event_id, time, data))
    except ValidationError as e:
        raise InvalidEventError(_problems(e, _USAGE_FIELDS)) from None
    if time is not None and (
        problem := future_problem(event.time, datetime.now(UTC), max_future)
    ) is not None:
        raise InvalidEventError([Problem("time", problem)])
    return event.model_dump(mode="json")


def build_subscription_event(
    kind: SubscriptionKind, tenant: str, plan_id: str, period_start: datetime,
    period_end: datetime, *, source: str, stripe_customer_id: str | None = None,
    stripe_subscription_id: str | None = None, cancel_at_period_end: bool | None = None,
    trial_end: datetime | None = None, event_id: str | None = None,
    time: datetime | None = None,
) -> dict[str, Any]:
    """The wire form of a `tally.subscription.<kind>.v1` event; InvalidEventError if invalid."""
    try:
        event = SubscriptionEvent.model_validate(_envelope(
            f"tally.subscription.{kind}.v1", tenant, source, event_id, time,
            {"plan_id": plan_id, "period_start": period_start, "period_end": period_end,
             "stripe_customer_id": stripe_customer_id,
             "stripe_subscription_id": stripe_subscription_id,
             "cancel_at_period_end": cancel_at_period_end, "trial_end": trial_end}))
    except ValidationError as e:
        raise InvalidEventError(_problems(e, _SUBSCRIPTION_FIELDS)) from None
    return event.model_dump(mode="json")
