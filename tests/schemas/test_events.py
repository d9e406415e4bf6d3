from datetime import datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.codec import RecordDecodeError, decode_record, dumps, encode_batch, loads
from schemas.events import UsageEvent
from tests.helpers import usage


def test_documented_example_event_parses() -> None:
    raw = {"specversion": "1.0", "id": "0193f0c2-7b1e-7cc4-9a55-3c8f1f1a2b3c",
           "source": "svc/api-gateway", "type": "tally.usage.v1", "subject": "tenant-42",
           "time": "2026-11-21T10:00:00.123Z", "datacontenttype": "application/json",
           "data": {"meter": "api_calls", "quantity": "1", "dimensions": {"endpoint": "/v1/x"}}}
    event = UsageEvent.model_validate(raw)
    assert event.tenant == "tenant-42"
    assert event.data.quantity == Decimal("1")
    assert event.time.tzinfo is not None


def test_json_number_quantity_becomes_exact_decimal() -> None:
    event = UsageEvent.model_validate(usage("t1", quantity=0.1))
    assert event.data.quantity == Decimal("0.1")


@pytest.mark.parametrize("quantity", ["-1", "NaN", "Infinity", "1e16", True])
def test_quantity_out_of_range_is_rejected(quantity: object) -> None:
    with pytest.raises(ValidationError):
        UsageEvent.model_validate(usage("t1", quantity=quantity))


def test_naive_time_is_rejected() -> None:
    raw = usage("t1")
    raw["time"] = "2026-11-21T10:00:00"
    with pytest.raises(ValidationError, match="timezone"):
        UsageEvent.model_validate(raw)


@pytest.mark.parametrize("tenant", ["", "has space", "a/b", "x" * 200])
def test_invalid_tenant_is_rejected(tenant: str) -> None:
    with pytest.raises(ValidationError):
        UsageEvent.model_validate(usage(tenant))


def test_unknown_envelope_field_is_rejected() -> None:
    raw = usage("t1")
    raw["surprise"] = 1
    with pytest.raises(ValidationError):
        UsageEvent.model_validate(raw)


def test_every_problem_is_reported_not_just_the_first() -> None:
    raw = usage("t1", quantity="-5")
    raw["time"] = "not a time"
    raw["data"]["meter"] = "Bad Meter"
    with pytest.raises(ValidationError) as info:
        UsageEvent.model_validate(raw)
    assert info.value.error_count() >= 3


def test_single_and_batch_records_decode_alike() -> None:
    a, b = usage("t1"), usage("t1")
    assert decode_record(dumps(a)) == [a]
    assert decode_record(encode_batch([a, b])) == [a, b]
    assert decode_record(b"  \n" + dumps(a)) == [a]


@pytest.mark.parametrize("value", [b"", b"nope", b"{broken", b"[]", b"42", None])
def test_undecodable_record_raises_a_clear_error(value: bytes | None) -> None:
    with pytest.raises(RecordDecodeError):
        decode_record(value)


@given(st.decimals(min_value=0, max_value=10**15, allow_nan=False, allow_infinity=False,
                   places=6))
def test_quantity_round_trips_through_the_codec_exactly(q: Decimal) -> None:
    event = UsageEvent.model_validate(usage("t1", quantity=str(q)))
    again = UsageEvent.model_validate(loads(dumps(event)))
    assert again.data.quantity == q
    assert isinstance(again.time, datetime)
