"""Call-site validation of the SDK: the model's rules, every problem reported, fast path
equivalent to the model (hypothesis), and UUIDv7 event ids. No broker needed."""

from __future__ import annotations

import math
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from producers import (
    InvalidEventError,
    ProducerError,
    build_subscription_event,
    build_usage_event,
    new_event_id,
    uuid7,
)
from producers.encoding import fast_usage_event
from schemas.errors import TallyError
from schemas.events import USAGE_TYPE, UsageEvent
from schemas.validation import DEFAULT_MAX_FUTURE, future_problem

SOURCE = "svc/test"
T0 = datetime(2026, 11, 21, 10, 0, 0, 123000, tzinfo=UTC)


def fields_of(error: InvalidEventError) -> set[str]:
    return {p.field.split(".")[0] for p in error.problems}


def refused(**overrides: Any) -> InvalidEventError:
    args: dict[str, Any] = {"tenant": "tenant-1", "meter": "api_calls", "quantity": 1}
    args.update(overrides)
    with pytest.raises(InvalidEventError) as info:
        build_usage_event(source=SOURCE, **args)
    return info.value


def test_a_valid_event_is_built_in_the_documented_wire_form() -> None:
    event = build_usage_event(
        "tenant-42", "api_calls", 1, dimensions={"endpoint": "/v1/x"},
        event_id="0193f0c2-7b1e-7cc4-9a55-3c8f1f1a2b3c", time=T0, source="svc/api-gateway",
    )
    assert event == {
        "specversion": "1.0", "id": "0193f0c2-7b1e-7cc4-9a55-3c8f1f1a2b3c",
        "source": "svc/api-gateway", "subject": "tenant-42", "time": "2026-11-21T10:00:00.123000Z",
        "datacontenttype": "application/json",
        "type": USAGE_TYPE,
        "data": {"meter": "api_calls", "quantity": "1", "dimensions": {"endpoint": "/v1/x"}},
    }


@pytest.mark.parametrize("quantity", [-1, -0.5, Decimal("-0.001"), "-3"])
def test_negative_quantity_is_refused(quantity: Any) -> None:
    assert fields_of(refused(quantity=quantity)) == {"quantity"}


@pytest.mark.parametrize(
    "quantity", [math.nan, math.inf, -math.inf, Decimal("NaN"), Decimal("Infinity"), "nan"]
)
def test_non_finite_quantity_is_refused(quantity: Any) -> None:
    assert fields_of(refused(quantity=quantity)) == {"quantity"}


def test_quantity_above_the_maximum_is_refused() -> None:
    assert fields_of(refused(quantity=10**15 + 1)) == {"quantity"}


def test_empty_tenant_is_refused() -> None:
    assert fields_of(refused(tenant="")) == {"tenant"}


def test_empty_meter_is_refused() -> None:
    assert fields_of(refused(meter="")) == {"meter"}


def test_naive_datetime_is_refused() -> None:
    error = refused(time=datetime(2026, 11, 21, 10, 0))
    assert fields_of(error) == {"time"}
    assert "timezone" in str(error)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"quantity": [1]}, "quantity"),
        ({"quantity": True}, "quantity"),
        ({"tenant": 42}, "tenant"),
        ({"meter": None}, "meter"),
        ({"dimensions": {"region": 1}}, "dimensions"),
        ({"dimensions": ["region"]}, "dimensions"),
        ({"event_id": 7}, "event_id"),
        ({"time": "yesterday"}, "time"),
    ],
)
def test_unknown_field_types_are_refused(overrides: dict[str, Any], field: str) -> None:
    assert fields_of(refused(**overrides)) == {field}


def test_every_problem_is_reported_not_only_the_first() -> None:
    error = refused(tenant="", meter="Bad Meter", quantity=-1, time=datetime(2026, 1, 1),
                    event_id="")
    assert fields_of(error) == {"tenant", "meter", "quantity", "time", "event_id"}
    assert len(error.problems) == 5


def test_validation_errors_belong_to_the_tally_error_family() -> None:
    error = refused(quantity=-1)
    assert isinstance(error, ProducerError)
    assert isinstance(error, TallyError)
    assert isinstance(error, ValueError)


def test_too_many_dimensions_are_refused() -> None:
    dims = {f"d{i}": "x" for i in range(33)}
    assert fields_of(refused(dimensions=dims)) == {"dimensions"}


def test_subscription_event_with_end_before_start_is_refused() -> None:
    with pytest.raises(InvalidEventError) as info:
        build_subscription_event("created", "tenant-1", "pro", T0, T0 - timedelta(days=1),
                                 source=SOURCE)
    assert fields_of(info.value) == {"period_end"}


def test_subscription_event_is_built_with_its_type_and_data() -> None:
    end = T0 + timedelta(days=30)
    event = build_subscription_event("plan_changed", "tenant-1", "pro", T0, end, source=SOURCE,
                                     stripe_customer_id="cus_1")
    assert event["type"] == "tally.subscription.plan_changed.v1"
    assert event["subject"] == "tenant-1"
    assert event["data"]["plan_id"] == "pro"
    assert event["data"]["stripe_customer_id"] == "cus_1"


# -- the fast path is the model ------------------------------------------------------------


def model_dump(tenant: Any, meter: Any, quantity: Any, dimensions: Any, event_id: Any,
               time: Any) -> dict[str, Any]:
    """What the UsageEvent model makes of the SDK's arguments (raises ValidationError)."""
    data: dict[str, Any] = {"meter": meter, "quantity": quantity}
    if dimensions is not None:
        data["dimensions"] = dimensions
    return UsageEvent.model_validate({
        "specversion": "1.0", "id": event_id, "source": SOURCE, "subject": tenant,
        "time": time, "datacontenttype": "application/json", "type": USAGE_TYPE, "data": data,
    }).model_dump(mode="json")


tenants = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z"),
    st.text(max_size=130), st.sampled_from(["", "t\n", " t", "tenant/1"]), st.integers(),
)
meters = st.one_of(
    st.from_regex(r"\A[a-z][a-z0-9_]{0,63}\Z"),
    st.text(max_size=70), st.sampled_from(["", "api_calls\n", "Api", "a" * 65]), st.none(),
)
quantities = st.one_of(
    st.integers(min_value=-10, max_value=10**16),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.booleans(), st.none(), st.lists(st.integers(), max_size=1),
)
dimensions = st.one_of(
    st.none(),
    st.dictionaries(st.text(max_size=66), st.text(max_size=258), max_size=34),
    st.dictionaries(st.integers(), st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
event_ids = st.one_of(st.none(), st.text(max_size=130), st.integers())
times = st.one_of(
    st.none(),
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(timezones=st.sampled_from([timezone(timedelta(hours=2)), UTC])),
    st.datetimes(),  # naive
    st.sampled_from(["2026-11-21T10:00:00Z", "not a time"]),
)


@settings(max_examples=1500, deadline=None)
@given(tenants, meters, quantities, dimensions, event_ids, times)
@example("t\n", "api_calls", 1, None, None, None)
@example("t", "api_calls\n", 1, None, None, None)
@example("t", "m", Decimal("1E+2"), None, None, None)
@example("t", "m", 1e15, None, None, None)
@example("t", "m", -0.0, None, None, T0)
def test_fast_path_accepts_only_what_the_model_accepts_and_builds_the_same_event(
    tenant: Any, meter: Any, quantity: Any, dims: Any, event_id: Any, time: Any,
) -> None:
    fast = fast_usage_event(tenant, meter, quantity, dims, event_id, time, SOURCE)
    try:
        built: dict[str, Any] | None = build_usage_event(
            tenant, meter, quantity, dimensions=dims, event_id=event_id, time=time,
            source=SOURCE,
        )
    except InvalidEventError:
        built = None

    def expected(made: dict[str, Any] | None) -> dict[str, Any] | None:
        # Defaults (id, time) are made inside; hand the model the ones that were made.
        model_id = made["id"] if made is not None and event_id is None else event_id
        model_time = (datetime.fromisoformat(made["time"]) if made is not None and time is None
                      else time)
        try:
            dumped = model_dump(tenant, meter, quantity, dims,
                                "x" if model_id is None else model_id,
                                T0 if model_time is None else model_time)
        except ValidationError:
            return None
        # An explicit time is also held to the allowed future skew (the model has no clock).
        if time is not None and future_problem(
                datetime.fromisoformat(dumped["time"]), datetime.now(UTC),
                DEFAULT_MAX_FUTURE) is not None:
            return None
        return dumped

    if fast is not None:
        assert fast == expected(fast)
    assert built == expected(built)


def storable_text(min_size: int = 0, max_size: int = 256) -> st.SearchStrategy[str]:
    """Text every stage can store: no NUL, no surrogate (schemas/validation.py)."""
    return st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   min_size=min_size, max_size=max_size)


def within_places(amount: Any) -> bool:
    exponent = Decimal(repr(amount) if isinstance(amount, float) else amount).as_tuple()[2]
    return isinstance(exponent, int) and -12 <= exponent <= 15


@settings(max_examples=700, deadline=None)
@given(
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z"),
    st.from_regex(r"\A[a-z][a-z0-9_]{0,63}\Z"),
    st.one_of(st.integers(0, 10**15), st.floats(0, 1e15).filter(within_places),
              st.decimals(0, 10**15, allow_nan=False, allow_infinity=False)
              .filter(lambda d: within_places(d) and not d.is_signed())),
    st.one_of(st.none(), st.dictionaries(storable_text(max_size=64), storable_text(),
                                         max_size=32)),
    st.one_of(st.none(), storable_text(min_size=1, max_size=128)),
    st.one_of(st.none(), st.datetimes(min_value=datetime(1970, 1, 1),
                                      max_value=datetime(2030, 1, 1),
                                      timezones=st.just(UTC))
              .filter(lambda t: t <= datetime.now(UTC))),
)
def test_fast_path_takes_plain_valid_input_and_builds_what_the_model_builds(
    tenant: str, meter: str, quantity: Any, dims: Any, event_id: Any, time: Any,
) -> None:
    fast = fast_usage_event(tenant, meter, quantity, dims, event_id, time, SOURCE)
    assert fast is not None
    assert fast == model_dump(tenant, meter, quantity, dims, event_id or fast["id"],
                              time or datetime.fromisoformat(fast["time"]))


# -- event ids -----------------------------------------------------------------------------


def test_default_event_ids_are_uuid7() -> None:
    value = uuid.UUID(new_event_id())
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert uuid7().version == 7


def test_event_ids_sort_in_creation_order_and_are_unique() -> None:
    ids = [new_event_id() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_event_id_carries_the_creation_time_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid.UUID(new_event_id()).int >> 80
    after = time.time_ns() // 1_000_000
    assert before <= value <= after + 1
