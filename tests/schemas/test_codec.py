"""schemas/codec.py: joining encoded arrays (hypothesis)."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from schemas.codec import dumps, join_arrays

elements = st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=20),
                     st.dictionaries(st.text(max_size=5), st.text(max_size=30), max_size=3))


@given(st.lists(st.lists(elements, min_size=1, max_size=8), max_size=12),
       st.integers(1, 400))
def test_joined_arrays_hold_every_element_in_order_within_the_size(
    arrays: list[list[Any]], max_bytes: int,
) -> None:
    encoded = [dumps(a) for a in arrays]
    joined = list(join_arrays(encoded, max_bytes))
    assert [e for j in joined for e in orjson.loads(j)] == [e for a in arrays for e in a]
    for j in joined:
        assert len(j) <= max_bytes or j in encoded  # only an array alone may be longer
    assert len(joined) <= len(encoded)
