"""Records checked in the pre-batching stage (`check_record`, carried in frames) make the
worker decide exactly what it decides reading the records themselves."""

from __future__ import annotations

from datetime import UTC, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from schemas import fast_usage
from schemas.events import USAGE_TYPE
from schemas.fast_usage import check_record, item_of_row, read_checked
from streams import frames
from streams.processor import Effects, PartitionProcessor
from tests.helpers import ms, record, usage
from tests.schemas.test_fast_usage import wire_items
from tests.streams.test_processor import NOW, TOPIC, UNIQUE_CATALOG, processor

TENANT = "tenant-1"  # the subject wire_items mostly draws


@st.composite
def plain_items(draw: st.DrawFn) -> dict[str, Any]:
    """Valid events in every form the checked rows must carry back: times with offsets
    and in the future, quantities as text, integers and floats, dimensions or none, the
    content type named or not, meters in the catalog or not."""
    # Last period (late, or an adjustment), this one, a little ahead, too far ahead.
    moment = NOW + draw(st.sampled_from([timedelta(days=-40), timedelta(days=-22),
                                         timedelta(hours=-1), timedelta(0),
                                         timedelta(minutes=3), timedelta(minutes=10)]))
    moment += timedelta(milliseconds=draw(st.integers(0, 999)))
    zone = draw(st.sampled_from([UTC, timezone(timedelta(hours=-5))]))
    text = moment.astimezone(zone).isoformat()
    if draw(st.booleans()):
        text = text.replace("+00:00", "Z")
    data: dict[str, Any] = {
        "meter": draw(st.sampled_from(["api_calls", "tokens", "active_users", "gpu_hours"])),
        "quantity": draw(st.one_of(st.sampled_from(["1", "2.50", "007", "0"]),
                                   st.integers(0, 10**15), st.floats(0, 1e6))),
    }
    if draw(st.booleans()):
        data["dimensions"] = {"user": draw(st.sampled_from(["u1", "u2", "u3"]))}
    item = {"specversion": "1.0", "id": f"e{draw(st.integers(0, 30))}", "source": "svc",
            "type": USAGE_TYPE, "subject": TENANT, "time": text, "data": data}
    if draw(st.booleans()):
        item["datacontenttype"] = "application/json"
    return item


records = st.lists(
    st.tuples(
        st.sampled_from([TENANT, TENANT, TENANT, "tenant-2", "", "not a tenant!"]),
        st.lists(st.one_of(plain_items(), plain_items(), plain_items(), wire_items()),
                 min_size=1, max_size=4),
        st.booleans(),  # a batch even of one event
    ),
    min_size=1, max_size=12,
)


def _value(items: list[Any], as_batch: bool) -> bytes:
    return orjson.dumps(items if as_batch or len(items) > 1 else items[0])


def _outcome(effects: Effects) -> dict[str, Any]:
    """Everything a drain decided, comparable (dead-lettered events as JSON values: a
    checked one is rebuilt from its row, in another key order)."""
    return {
        "accepted": {t: [orjson.loads(a) for a in arrays]
                     for t, arrays in effects.accepted.items() if arrays},
        "dead": [(d.reason, d.detail, d.index, d.key, d.source_offset, orjson.loads(d.value))
                 for d in effects.dead_letters],
        "counters": [(c.tenant_id, c.meter, c.period_start, c.value, c.event_count,
                      c.applied_offset) for c in effects.counters],
        "quota": [q.model_dump() for q in effects.quota_states],
        "notifications": [n.model_dump() for n in effects.notifications],
        "changelog": effects.changelog,
        "duplicates": effects.duplicates,
        "counted": effects.counted,
    }


def _feed(p: PartitionProcessor, recs: list[tuple[str, bytes]], checked: bool) -> None:
    values = [check_record(key.encode(), value) if checked else None for key, value in recs]
    # The readers' caches would hand one path what another read: the worker reads with
    # its own (the pre-batching stage is another process).
    fast_usage._times.clear()
    fast_usage._amounts.clear()
    for offset, ((key, value), rows) in enumerate(zip(recs, values, strict=True)):
        p.process_usage(TOPIC, offset, key.encode() or None,
                        value if rows is None else rows, ms(NOW), rows is not None)


@settings(max_examples=400, deadline=None)
@given(records)
def test_checked_records_are_decided_exactly_as_the_records_themselves(
    drawn: list[tuple[str, list[Any], bool]],
) -> None:
    try:
        recs = [(key, _value(items, as_batch)) for key, items, as_batch in drawn]
    except TypeError:  # an integer JSON cannot carry (orjson's bound)
        assume(False)
    recs += recs[:2]  # a re-sent record: recognised as a replay either way
    # Both processors go through the same `processor()` as the other processor tests.
    raw, checked = processor(UNIQUE_CATALOG), processor(UNIQUE_CATALOG)
    _feed(raw, recs, checked=False)
    _feed(checked, recs, checked=True)
    assert _outcome(checked.drain()) == _outcome(raw.drain())


def test_a_plain_record_is_checked_and_anything_else_is_left_to_the_worker() -> None:
    plain = usage(TENANT, quantity=3, time=NOW, dimensions={"user": "u1"})
    assert check_record(TENANT.encode(), record(plain)) is not None
    assert check_record(TENANT.encode(), record(plain, plain)) is not None
    # Unknown meters are for the worker to judge against its catalog: still checked.
    assert check_record(TENANT.encode(), record(usage(TENANT, meter="gpu_hours"))) is not None
    bad = {**plain, "data": {"meter": "api_calls", "quantity": "-1"}}
    for key, value in [
        (None, record(plain)), (b"", record(plain)), (b"tenant 1", record(plain)),
        (b"\xff", record(plain)), (TENANT.encode(), None), (TENANT.encode(), b"not json"),
        (b"tenant-2", record(plain)),  # the subject is not the key
        (TENANT.encode(), record(plain, bad)),  # one bad event: the whole record
        (TENANT.encode(), record(usage(TENANT, meter="Not_A_Name"))),
    ]:
        assert check_record(key, value) is None, (key, value)


@pytest.mark.parametrize("as_batch", [False, True])
def test_rows_read_back_as_the_events_and_items_they_came_from(as_batch: bool) -> None:
    items = [usage(TENANT, quantity=q, time=NOW, dimensions=d)
             for q, d in [("1.50", None), (2, {"user": "u1"}), (0.1, {})]]
    items[0].pop("datacontenttype")
    items[2]["data"].pop("dimensions")
    value = _value(items, as_batch)
    rows_value = check_record(TENANT.encode(), value)
    assert rows_value is not None
    is_batch, rows, events = read_checked(rows_value, TENANT)
    assert is_batch == as_batch or len(items) > 1
    assert [item_of_row(row, TENANT) for row in rows] == items
    assert [str(e.quantity) for e in events] == ["1.50", "2", "0.1"]
    assert [e.dimensions for e in events] == [{}, {"user": "u1"}, {}]


def test_frames_carry_each_entry_with_its_kind_and_source_and_read_older_formats() -> None:
    entries: list[frames.Entry] = [
        (7, 1000, b"t", b"[1]", frames.CHECKED, 3), (8, 1001, None, None, frames.RAW, 0),
        (9, 1002, b"", b"{}", frames.RAW, 2), (4, 1003, b"s", b"{}", frames.SUBSCRIPTION, 1)]
    assert list(frames.decode(frames.encode(entries), 5)) == entries
    # The older formats held usage records of the frame's own partition only.
    raw_only = frames.MAGIC_RAW_ONLY + b"".join(
        frames._HEADER_RAW_ONLY.pack(o, t, len(k), len(v)) + k + v
        for o, t, k, v in [(1, 2, b"k", b"v"), (3, 4, b"", b"w")])
    assert list(frames.decode(raw_only, 5)) == [(1, 2, b"k", b"v", frames.RAW, 5),
                                                (3, 4, b"", b"w", frames.RAW, 5)]
    same_partition = frames.MAGIC_SAME_PARTITION + b"".join(
        frames._HEADER_SAME_PARTITION.pack(o, t, len(k), len(v), kind) + k + v
        for o, t, k, v, kind in [(1, 2, b"k", b"v", frames.CHECKED), (3, 4, b"", b"w", 0)])
    assert list(frames.decode(same_partition, 6)) == [(1, 2, b"k", b"v", frames.CHECKED, 6),
                                                      (3, 4, b"", b"w", frames.RAW, 6)]
    with pytest.raises(frames.FrameError):  # the older formats carried no subscriptions
        list(frames.decode(frames.MAGIC_SAME_PARTITION
                           + frames._HEADER_SAME_PARTITION.pack(1, 2, 0, 0, 2), 0))
    with pytest.raises(frames.FrameError):
        list(frames.decode(b"XXXX", 0))
    with pytest.raises(frames.FrameError):
        list(frames.decode(frames.encode(entries)[:-1], 0))
