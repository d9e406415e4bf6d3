"""The worker's decisions on hostile input, without a broker: every record of the hostile
corpus, and arbitrary bytes and JSON (hypothesis), are counted, dead-lettered or counted as
duplicates, and never make the processor raise (issue 17)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.fast_usage import check_record
from schemas.plans import default_catalog_path, load_catalog
from streams.processor import PartitionProcessor, ProcessorConfig
from tests.helpers import ms, usage
from tests.hostile import load_corpus, units

CATALOG = load_catalog(default_catalog_path())
CORPUS = load_corpus()
TOPIC = "tally.usage"
NOW = datetime.now(UTC)


def outcome(p: PartitionProcessor) -> tuple[int, int, int]:
    """(accepted, dead letters, duplicates) since the last drain."""
    fx = p.drain()
    accepted = sum(len(orjson.loads(a)) for arrays in fx.accepted.values() for a in arrays)
    return accepted, len(fx.dead_letters), fx.duplicates


def test_the_corpus_has_at_least_fifty_records() -> None:
    assert len(CORPUS) >= 50


@pytest.mark.parametrize("checked", [False, True], ids=["as sent", "pre-batched"])
def test_every_corpus_record_is_counted_as_expected_and_the_rest_is_accounted_for(
    checked: bool,
) -> None:
    """Fed in order to one processor, as the worker would, with and without the
    pre-batching stage's checked rows."""
    p = PartitionProcessor(0, CATALOG, ProcessorConfig())
    wrong = []
    for offset, r in enumerate(CORPUS):
        value = r.value
        rows = check_record(r.key, r.value) if checked else None
        stamp = ms(NOW) if r.timestamp_ms is None else r.timestamp_ms
        p.process_usage(TOPIC, offset, r.key, value if rows is None else rows, stamp,
                        rows is not None)
        accepted, dead, duplicates = outcome(p)
        if (accepted != r.counted
                or accepted + dead + duplicates != units(r.key, r.value, stamp)):
            wrong.append((r.name, accepted, dead, duplicates))
    assert wrong == []


def account(p: PartitionProcessor, feed: list[tuple[bytes | None, bytes | None, int]]) -> None:
    total = accepted = dead = duplicates = 0
    for offset, (key, value, timestamp_ms) in enumerate(feed):
        total += units(key, value, timestamp_ms)
        p.process_usage(TOPIC, offset, key, value, timestamp_ms)
    accepted, dead, duplicates = outcome(p)
    assert accepted + dead + duplicates == total


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_events(draw: st.DrawFn) -> Any:
    """A usage event with one or more fields replaced by arbitrary JSON."""
    e: dict[str, Any] = usage("t1", time=NOW - timedelta(minutes=draw(st.integers(0, 10**6))))
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(["id", "source", "type", "subject", "time", "specversion",
                                      "datacontenttype", "data", "meter", "quantity",
                                      "dimensions"]))
        target = e["data"] if field in ("meter", "quantity", "dimensions") and isinstance(
            e["data"], dict) else e
        target[field] = draw(json_values | st.text())
    return e


keys = st.one_of(st.just(b"t1"), st.none(), st.binary(max_size=12))
timestamps = st.one_of(st.just(ms(NOW)), st.integers(-(2**63), 2**63 - 1))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(keys, st.one_of(st.none(), st.binary(max_size=200)), timestamps),
                max_size=8))
def test_arbitrary_bytes_never_make_the_processor_raise(
    feed: list[tuple[bytes | None, bytes | None, int]],
) -> None:
    account(PartitionProcessor(0, CATALOG, ProcessorConfig()), feed)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(
    keys,
    st.one_of(json_values, mutated_events(), st.lists(mutated_events() | json_values,
                                                      max_size=5)),
    timestamps), max_size=8))
def test_arbitrary_json_never_makes_the_processor_raise_and_every_event_is_accounted_for(
    feed: list[tuple[bytes | None, Any, int]],
) -> None:
    account(PartitionProcessor(0, CATALOG, ProcessorConfig()),
            [(key, orjson.dumps(value), ts) for key, value, ts in feed])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(keys, st.one_of(st.binary(max_size=100), json_values.map(
    orjson.dumps))), max_size=6))
def test_arbitrary_subscription_records_never_make_the_processor_raise(
    feed: list[tuple[bytes | None, bytes]],
) -> None:
    p = PartitionProcessor(0, CATALOG, ProcessorConfig())
    for offset, (key, value) in enumerate(feed):
        p.process_subscription("tally.subscriptions", offset, key, value)
    p.drain()


def test_corpus_names_are_unique() -> None:
    names = [r.name for r in CORPUS]
    assert len(set(names)) == len(names)

