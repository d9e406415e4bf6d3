"""The names Tally gives its Stripe calls: deterministic, within Stripe's limits, and
distinct for distinct readings."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_jobs import stripe_ids
from billing_jobs.push_usage import identifier

PERIOD = datetime(2026, 10, 1, tzinfo=UTC)
tenants = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}", fullmatch=True)
meters = st.from_regex(r"[a-z][a-z0-9_]{0,63}", fullmatch=True)
readings = st.one_of(st.integers(0, 10**15).map(str),
                     st.tuples(st.integers(1, 10**6), st.integers(0, 10**15)).map(
                         lambda r: f"g{r[0]}={r[1]}"))
calls = st.tuples(tenants, meters, readings, st.integers(0, 5))


def test_a_short_identifier_stays_readable_and_the_old_scheme_is_kept() -> None:
    assert identifier("acme", "api_calls", PERIOD, 130) == "acme:api_calls:20261001T000000Z:130"
    assert identifier("acme", "api_calls", PERIOD, 130, 1) == (
        "acme:api_calls:20261001T000000Z:130#1")


def test_a_128_character_tenant_gives_a_100_character_identifier() -> None:
    tenant = "t" * 128
    first = identifier(tenant, "api_calls", PERIOD, 130)

    assert len(first) == stripe_ids.IDENTIFIER_MAX
    assert first == identifier(tenant, "api_calls", PERIOD, 130)  # deterministic
    assert first.startswith("ttt") and "~" in first


@given(calls, calls)
def test_distinct_readings_never_share_an_identifier(a: tuple[str, str, str, int],
                                                     b: tuple[str, str, str, int]) -> None:
    ids = [stripe_ids.meter_event_identifier(t, m, PERIOD, r, n) for t, m, r, n in (a, b)]

    assert all(len(i) <= stripe_ids.IDENTIFIER_MAX for i in ids)
    assert (ids[0] == ids[1]) == (a == b)


def test_gauge_readings_returning_to_an_earlier_value_are_new_events() -> None:
    ids = [identifier("acme", "seats", PERIOD, f"g{n}={v}") for n, v in
           enumerate((5, 7, 5, 0), 1)]

    assert len(set(ids)) == 4


@given(st.text(min_size=1, max_size=600), st.integers(0, 3))
def test_idempotency_keys_are_at_most_255_characters(readable: str, n: int) -> None:
    assert len(stripe_ids.idempotency_key(readable, n)) <= stripe_ids.IDEMPOTENCY_KEY_MAX


def test_metadata_is_kept_within_stripes_limits() -> None:
    assert stripe_ids.metadata({"tally_tenant_id": "t" * 128}) == {"tally_tenant_id": "t" * 128}
    assert len(stripe_ids.metadata({"long": "v" * 501})["long"]) == 500
    with pytest.raises(ValueError, match="over 40"):
        stripe_ids.metadata({"k" * 41: "v"})
