"""The wire fast path (schemas/fast_usage.py) against the UsageEvent model (hypothesis):
whatever the fast path accepts, the model accepts and reads the same way; and plain valid
events do take the fast path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.events import USAGE_TYPE, UsageEvent
from schemas.fast_usage import Usage, from_model, read_usage

TENANT = "tenant-1"
METERS = {"api_calls", "tokens"}


def model_reading(item: Any) -> Usage | None:
    """What the worker's slow path makes of `item` for TENANT and METERS."""
    try:
        event = UsageEvent.model_validate(item)
    except ValidationError:
        return None
    if event.subject != TENANT or event.data.meter not in METERS:
        return None
    return from_model(event)


def same(a: Usage, b: Usage) -> bool:
    # Equal instants are not enough: the offset is kept too, and the quantity's text.
    return (a == b and a.time.utcoffset() == b.time.utcoffset()
            and str(a.quantity) == str(b.quantity))


times = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                 timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5)),
                                            timezone(timedelta(hours=5, minutes=30))]))
    .map(lambda d: d.isoformat()),
    st.from_regex(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,7})?(Z|[+-]\d\d:\d\d)?\Z"),
    st.sampled_from(["2026-11-21T10:00:00Z", "2026-11-21T10:00:00.5z", "2026-11-21 10:00:00Z",
                     "2026-02-30T10:00:00Z", "2026-11-21T24:00:00Z", "2026-11-21T10:00:60Z",
                     "2026-11-21T10:00:00+24:00", "2026-11-21T10:00:00-00:00", "not a time",
                     "\uff12\uff10\uff12\uff16-11-21T10:00:00Z"]),
    st.integers(0, 2**31), st.none(),
)
quantities = st.one_of(
    st.from_regex(r"\A[0-9]{1,17}(\.[0-9]{1,21})?\Z"),
    st.sampled_from(["1", "0", "0.0000001", "1E+2", "-1", " 1", "1_000", "NaN", "\u0661",
                     "1000000000000000", "1000000000000000.1", "01"]),
    st.integers(-10, 10**16), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=8),
)
dimensions = st.one_of(
    st.dictionaries(st.text(max_size=66), st.text(max_size=258), max_size=34),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.none(), st.integers(),
)
ids = st.one_of(st.text(max_size=130), st.integers(), st.none())


@st.composite
def wire_items(draw: st.DrawFn) -> Any:
    data: dict[str, Any] = {
        "meter": draw(st.sampled_from(["api_calls", "tokens", "storage_mb", "Bad", 1, None])),
        "quantity": draw(quantities),
    }
    if draw(st.booleans()):
        data["dimensions"] = draw(dimensions)
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.sampled_from(["extra", "meter", "quantity"]))] = "x"
    if draw(st.integers(0, 9)) == 0:
        del data[draw(st.sampled_from(["meter", "quantity"]))]
    item: dict[str, Any] = {
        "specversion": draw(st.sampled_from(["1.0", "1.0", "1.0", "0.3", 1.0])),
        "id": draw(ids),
        "source": draw(st.one_of(st.just("svc"), st.text(max_size=258), st.integers())),
        "type": draw(st.sampled_from([USAGE_TYPE, USAGE_TYPE, "tally.usage.v2"])),
        "subject": draw(st.sampled_from([TENANT, TENANT, TENANT, "tenant-2", None])),
        "time": draw(times),
        "data": draw(st.one_of(st.just(data), st.just(data), st.none(), st.lists(st.none()))),
    }
    contenttype = draw(st.sampled_from([None, "application/json", "text/plain", "absent"]))
    if contenttype != "absent":
        item["datacontenttype"] = contenttype
    if draw(st.integers(0, 9)) == 0:
        item.pop(draw(st.sampled_from(sorted(item))))
    if draw(st.integers(0, 9)) == 0:
        item["extra"] = 1
    return draw(st.one_of(st.just(item), st.just(item), st.just(item), st.none(),
                          st.just([item]), st.integers()))


@settings(max_examples=3000, deadline=None)
@given(wire_items())
@example({"specversion": "1.0", "id": "a", "source": "s", "type": USAGE_TYPE,
          "subject": TENANT, "time": "2026-11-21T10:00:00Z",
          "data": {"meter": "api_calls", "quantity": 0.1}})
@example({"specversion": "1.0", "id": "a", "source": "s", "type": USAGE_TYPE,
          "subject": TENANT, "time": "2026-11-21T10:00:00Z",
          "data": {"meter": "api_calls", "quantity": "1", "dimensions": None}})
def test_fast_path_accepts_only_what_the_model_accepts_and_reads_it_the_same(
    item: Any,
) -> None:
    fast = read_usage(item, TENANT, METERS)
    if fast is not None:
        model = model_reading(item)
        assert model is not None, "the fast path accepted what the model rejects"
        assert same(fast, model)


def storable_text(min_size: int = 0, max_size: int = 256) -> st.SearchStrategy[str]:
    """Text every stage can store: no NUL, no surrogate (schemas/validation.py)."""
    return st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   min_size=min_size, max_size=max_size)


@settings(max_examples=1000, deadline=None)
@given(
    storable_text(1, 128), storable_text(1, 256),
    st.datetimes(min_value=datetime(1971, 1, 2), max_value=datetime(9998, 12, 30),
                 timezones=st.sampled_from([UTC, timezone(timedelta(hours=2))])),
    st.sampled_from(sorted(METERS)),
    st.one_of(st.integers(0, 10**15),
              st.floats(0, 1e15).filter(lambda f: Decimal(repr(f)).as_tuple()[2] >= -12),
              st.decimals(0, 10**15, places=6).map(str)),
    st.one_of(st.none(), st.dictionaries(storable_text(max_size=64), storable_text(),
                                         max_size=32)),
    st.booleans(),
)
def test_plain_valid_events_take_the_fast_path(
    event_id: str, source: str, moment: datetime, meter: str, quantity: Any,
    dims: dict[str, str] | None, zulu: bool,
) -> None:
    text = moment.isoformat()
    if zulu and text.endswith("+00:00"):
        text = text[:-6] + "Z"
    data: dict[str, Any] = {"meter": meter, "quantity": quantity}
    if dims is not None:
        data["dimensions"] = dims
    item = {"specversion": "1.0", "id": event_id, "source": source, "type": USAGE_TYPE,
            "subject": TENANT, "time": text, "datacontenttype": "application/json",
            "data": data}
    fast = read_usage(item, TENANT, METERS)
    model = model_reading(item)
    assert model is not None
    assert fast is not None, "a plain valid event missed the fast path"
    assert same(fast, model)
    assert fast.quantity == Decimal(str(quantity)) or isinstance(quantity, float)


def test_a_subject_other_than_the_key_or_an_unknown_meter_is_left_to_the_model() -> None:
    item = {"specversion": "1.0", "id": "a", "source": "s", "type": USAGE_TYPE,
            "subject": TENANT, "time": "2026-11-21T10:00:00Z",
            "data": {"meter": "api_calls", "quantity": "1"}}
    assert read_usage(item, TENANT, METERS) is not None
    assert read_usage(item, "tenant-2", METERS) is None
    assert read_usage(item, TENANT, {"tokens"}) is None
