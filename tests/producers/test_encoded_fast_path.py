"""The SDK's commonest call goes straight to bytes (`fast_usage_json`): the same bytes the
dict path encodes, and only for input the dict path takes. No broker needed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from producers import ProducerOptions
from producers.encoding import fast_usage_event, fast_usage_json
from schemas import codec
from schemas.validation import texts_acceptable

tenants = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z"),
    st.text(max_size=130), st.sampled_from(["", "t\n", 't"', "t\\", "tenant/1"]), st.integers(),
)
meters = st.one_of(
    st.from_regex(r"\A[a-z][a-z0-9_]{0,63}\Z"),
    st.text(max_size=70), st.sampled_from(["", "api_calls\n", 'a"', "Api"]), st.none(),
)
quantities = st.one_of(
    st.integers(min_value=-10, max_value=10**16), st.floats(), st.booleans(), st.text(max_size=5),
)
# The sources a producer can have: ProducerOptions checks its source once, so the
# encoded fast path never sees another (test_a_producer_refuses_a_source_no_stage_stores).
sources = st.text(min_size=1, max_size=256).filter(texts_acceptable)


@settings(max_examples=1500, deadline=None)
@given(tenants, meters, quantities, sources)
@example("tenant-1", "api_calls", 10**15, 'svc/"quoted"\n')
@example("tenant-1", "api_calls", True, "svc")
@example("tenant-1", "api_calls", 10**15 + 1, "svc")
def test_encoded_fast_path_writes_the_bytes_the_dict_path_writes(
    tenant: Any, meter: Any, quantity: Any, source: str,
) -> None:
    # A tenant and meter are remembered as valid the first time the dict path sees them.
    first = fast_usage_event(tenant, meter, quantity, None, None, None, source)
    encoded = fast_usage_json(tenant, meter, quantity, codec.dumps(source).decode())
    if encoded is None:
        # Declined: the call was not the commonest kind (an int quantity, valid names).
        assert first is None or type(quantity) is not int
        return
    assert first is not None
    made = orjson.loads(encoded)
    same = fast_usage_event(tenant, meter, quantity, None, made["id"],
                            datetime.fromisoformat(made["time"]), source)
    assert same is not None
    assert codec.dumps(same) == encoded


@pytest.mark.parametrize("source", ["svc\x00", "svc/\ud800"])
def test_a_producer_refuses_a_source_no_stage_stores(source: str) -> None:
    with pytest.raises(ValidationError, match="source"):
        ProducerOptions(source=source)
