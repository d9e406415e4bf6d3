"""The projector's fast path (projections/fast_accepted.py) against the AcceptedEvent model
and `accepted_problems` (hypothesis): whatever the fast path accepts, the model accepts,
the ledger would take, and both read the same way; and plain valid events, shaped like the
worker's output, do take the fast path. No broker or database needed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from domain.meters import KINDS
from projections.fast_accepted import from_model, read_accepted
from projections.ledger import Accepted, accepted_problems
from schemas.plans import default_catalog_path, load_catalog
from schemas.records import AcceptedEvent
from streams.processor import PartitionProcessor, ProcessorConfig
from tests.helpers import accepted_events, ms, record, usage

OFFSETS = [UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=5, minutes=30))]


def model_reading(item: Any) -> Accepted | None:
    """What the projector's slow path makes of `item`: the event, or None if reported."""
    try:
        event = from_model(AcceptedEvent.model_validate(item))
    except ValidationError:
        return None
    return None if accepted_problems(event) else event


def same(a: Accepted, b: Accepted) -> bool:
    # Equal values are not enough (1 == True, equal instants): the types must match, the
    # offsets are kept too, and the quantity's text.
    times = ("event_time", "ingested_at", "period_start", "period_end")
    return (a == b and list(map(type, a)) == list(map(type, b))
            and all(getattr(a, t).utcoffset() == getattr(b, t).utcoffset() for t in times)
            and str(a.quantity) == str(b.quantity))


def worker_event(tenant: str = "acme", event_id: str = "e1", meter: str = "api_calls",
                 aggregation: str = "sum", unique_value: str | None = None,
                 quantity: str = "1", event_time: str = "2026-11-04T10:00:00.123000+00:00",
                 ingested_at: str = "2026-11-04T10:00:01+00:00",
                 source: str = "svc/test", dimensions: dict[str, str] | None = None,
                 period_start: str = "2026-11-01T00:00:00+00:00",
                 period_end: str = "2026-12-01T00:00:00+00:00", plan_id: str = "starter",
                 late: bool = False, adjustment: bool = False) -> dict[str, Any]:
    """An accepted event with the keys and value formats of streams/processor.py."""
    return {"tenant_id": tenant, "event_id": event_id, "meter": meter,
            "aggregation": aggregation, "unique_value": unique_value, "quantity": quantity,
            "event_time": event_time, "ingested_at": ingested_at, "source": source,
            "dimensions": {"region": "eu"} if dimensions is None else dimensions,
            "period_start": period_start, "period_end": period_end, "plan_id": plan_id,
            "late": late, "adjustment": adjustment}


texts = st.one_of(st.just("acme"), st.text(max_size=12), st.text(max_size=12),
                  st.just("a\x00b"), st.just(""),
                  st.integers(), st.none(), st.booleans(), st.lists(st.text(), max_size=1))
times = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                 timezones=st.sampled_from(OFFSETS)).map(lambda d: d.isoformat()),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))
    .map(lambda d: d.isoformat()),  # naive: the model takes it, the ledger cannot
    st.from_regex(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,7})?(Z|[+-]\d\d:\d\d)?\Z"),
    st.sampled_from(["2026-11-21T10:00:00Z", "2026-11-21T10:00:00.5z", "2026-11-21 10:00:00Z",
                     "2026-02-30T10:00:00Z", "2026-11-21T24:00:00Z", "2026-11-21T10:00:60Z",
                     "2026-11-21T10:00:00+24:00", "2026-11-21T10:00:00-00:00", "2026-11-21",
                     "20261121T100000Z", "2026-11-21T10:00Z", "2026-11-21T10:00:00,5Z",
                     "not a time", "\uff12\uff10\uff12\uff16-11-21T10:00:00Z"]),
    st.integers(-2, 2**31), st.floats(), st.none(), st.booleans(),
)
quantities = st.one_of(
    st.from_regex(r"\A[0-9]{1,17}(\.[0-9]{1,21})?\Z"),
    st.sampled_from(["1", "0", "0.0000001", "1E+2", "1e2", "-1", "-0", " 1", "1 ", "1_000",
                     "NaN", "Infinity", "-Infinity", "sNaN", "\u0661", "01", "1.", ".5", "",
                     "1000000000000000", "10000000000000000", "1.123456789012345678901"]),
    st.integers(-10, 10**16), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=8),
)
dimension_values = st.one_of(
    st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers() | st.none() | st.booleans(),
                    min_size=1, max_size=2),
    st.just({"a\x00": "b"}), st.just({"a": "b\x00"}), st.none(), st.integers(), st.just([]),
)
bools = st.one_of(st.booleans(), st.booleans(), st.integers(0, 2), st.none(),
                  st.sampled_from(["true", "false", "1", "yes", "off"]), st.floats(0, 1))


@st.composite
def adversarial_items(draw: st.DrawFn) -> Any:
    """Worker-shaped events with any field swapped for something else, keys dropped or
    added, and a few things that are not events at all."""
    item = worker_event()
    period = draw(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                               timezones=st.sampled_from(OFFSETS)))
    length = draw(st.sampled_from([timedelta(days=30)] * 4 + [timedelta(0), -timedelta(days=1)]))
    item["period_start"], item["period_end"] = period.isoformat(), (period + length).isoformat()
    changed = draw(st.sampled_from([0, 1, 1, 1, 2, 3]))
    for key in draw(st.sets(st.sampled_from(sorted(item)), min_size=changed, max_size=changed)):
        if key in ("event_time", "ingested_at", "period_start", "period_end"):
            item[key] = draw(times)
        elif key == "quantity":
            item[key] = draw(quantities)
        elif key == "dimensions":
            item[key] = draw(dimension_values)
        elif key in ("late", "adjustment"):
            item[key] = draw(bools)
        elif key == "aggregation":
            item[key] = draw(st.sampled_from(sorted(KINDS)) | st.just("median") | texts)
        else:
            item[key] = draw(texts)
    if draw(st.integers(0, 9)) == 0:
        item.pop(draw(st.sampled_from(sorted(item))))
    if draw(st.integers(0, 9)) == 0:
        item[draw(st.sampled_from(["extra", "unique_value", "tenant"]))] = "x"
    return draw(st.sampled_from([item] * 6 + [None, [item], 1, "x"]))


@settings(max_examples=4000, deadline=None)
@given(adversarial_items())
@example(worker_event(quantity="2.50", event_time="2026-11-04T10:00:00-05:00"))
@example(worker_event(event_time="2026-11-04T10:00:00"))  # naive
@example(worker_event(period_end="2026-11-01T00:00:00+00:00"))  # empty period
@example(worker_event(dimensions={"a": "\x00"}))
@example({**worker_event(), "late": 1})
@example({**worker_event(), "quantity": 1})
def test_fast_path_accepts_only_what_the_model_and_ledger_accept_and_reads_it_the_same(
    item: Any,
) -> None:
    fast = read_accepted(item)
    if fast is not None:
        model = model_reading(item)
        assert model is not None, "the fast path accepted what the slow path reports"
        assert same(fast, model)


@settings(max_examples=1500, deadline=None)
@given(
    st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s),
    st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s),
    st.sampled_from(sorted(KINDS)),
    st.none() | st.text(max_size=20).filter(lambda s: "\x00" not in s),
    st.one_of(st.integers(0, 10**15).map(Decimal),
              st.decimals(0, 10**15, places=6, allow_nan=False)).map(str),
    # The years the fast path reads (schemas/fast_usage.read_time; the worker writes no other)
    st.datetimes(min_value=datetime(1971, 1, 2), max_value=datetime(9998, 6, 1),
                 timezones=st.sampled_from(OFFSETS)),
    st.timedeltas(timedelta(0), timedelta(days=3)),
    st.dictionaries(st.text(max_size=16).filter(lambda s: "\x00" not in s),
                    st.text(max_size=32).filter(lambda s: "\x00" not in s), max_size=4),
    st.booleans(), st.booleans(), st.booleans(),
)
def test_plain_valid_events_take_the_fast_path(
    tenant: str, event_id: str, aggregation: str, unique_value: str | None, quantity: str,
    moment: datetime, delay: timedelta, dims: dict[str, str], late: bool, adjustment: bool,
    zulu: bool,
) -> None:
    def text(t: datetime) -> str:
        iso = t.isoformat()
        return iso[:-6] + "Z" if zulu and iso.endswith("+00:00") else iso

    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    item = worker_event(
        tenant, event_id, aggregation=aggregation, unique_value=unique_value,
        quantity=quantity, event_time=text(moment), ingested_at=text(moment + delay),
        dimensions=dims, period_start=text(start), period_end=text(start + timedelta(days=31)),
        late=late, adjustment=adjustment)
    # As the projector gets it: through JSON.
    item = orjson.loads(orjson.dumps(item))
    model = model_reading(item)
    assert model is not None
    fast = read_accepted(item)
    assert fast is not None, "a plain valid event missed the fast path"
    assert same(fast, model)


def test_what_the_worker_writes_takes_the_fast_path() -> None:
    """The real worker's output (streams/processor.py), for varied usage events, all read
    by the fast path exactly as by the model."""
    p = PartitionProcessor(0, load_catalog(default_catalog_path()), ProcessorConfig())
    now = datetime(2026, 11, 21, 12, tzinfo=UTC)
    events = [
        usage("t1", "api_calls", "2.5", time=now, dimensions={"endpoint": "/x"}),
        usage("t1", "tokens", 7, time=now - timedelta(hours=1)),
        usage("t1", "storage_mb", 0.1, time=now.astimezone(timezone(timedelta(hours=2)))),
        usage("t1", "api_calls", "0.000001", time=now - timedelta(days=25)),  # late
        usage("t1", "executions", "1000000000000000", time=now),
    ]
    p.process_usage("tally.usage", 0, b"t1", record(*events), ms(now))
    written = accepted_events(p.drain(), "t1")
    assert len(written) == len(events)
    for item in written:
        fast = read_accepted(item)
        model = model_reading(item)
        assert fast is not None and model is not None
        assert same(fast, model)


def test_the_model_still_explains_what_the_fast_path_declines() -> None:
    assert read_accepted(worker_event(quantity="-1")) is None
    assert model_reading(worker_event(quantity="-1")) is None
    naive = worker_event(event_time="2026-11-04T10:00:00")
    assert read_accepted(naive) is None
    assert accepted_problems(from_model(AcceptedEvent.model_validate(naive))) == [
        "a time has no UTC offset"]
