import tracemalloc
from datetime import UTC, datetime, timedelta

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.dedup import SEGMENT_IDS, DedupWindow

NOW = datetime(2026, 11, 21, tzinfo=UTC)


def test_an_id_remembers_the_offset_that_first_carried_it() -> None:
    w = DedupWindow(timedelta(days=35))
    b = w.bucket_for("t1", NOW, NOW)
    assert not w.seen(b, "e1")
    assert w.claim(b, "e1", 7)  # first sight
    assert w.claim(b, "e1", 7)  # the same record again: a replay, not a duplicate
    assert not w.claim(b, "e1", 9)  # a later record carrying it: a duplicate
    assert w.seen(b, "e1")
    assert w.size == 1


def test_ids_are_per_tenant_and_offsets_beyond_32_bits_still_tell_replays() -> None:
    w = DedupWindow(timedelta(days=35))
    a, b = w.bucket_for("t1", NOW, NOW), w.bucket_for("t2", NOW, NOW)
    assert w.claim(a, "e1", 2**40 + 5)
    assert w.claim(b, "e1", 3)  # the same id from another tenant is another event
    assert w.claim(a, "e1", 2**40 + 5)
    assert not w.claim(a, "e1", 2**40 + 6)
    assert w.size == 2


def test_buckets_beyond_the_horizon_are_evicted_with_tombstones() -> None:
    w = DedupWindow(timedelta(days=2))
    old = w.bucket_for("t1", NOW - timedelta(days=1), NOW - timedelta(days=1))
    w.claim(old, "e1", 1)
    list(w.drain_changes())
    w.evict_before(NOW + timedelta(days=5))
    assert w.size == 0
    assert list(w.drain_changes()) == [(DedupWindow.segment_key(old[1], 0), None)]


def test_event_older_than_the_horizon_is_bucketed_by_arrival() -> None:
    w = DedupWindow(timedelta(days=2))
    bucket = w.bucket_for("t1", NOW - timedelta(days=30), NOW)
    assert bucket == ("t1", "a" + NOW.date().isoformat())


def test_changelog_writes_only_new_ids_and_restores_exactly() -> None:
    w = DedupWindow(timedelta(days=35))
    b = w.bucket_for("t1", NOW, NOW)
    other = w.bucket_for("t2", NOW, NOW)
    for i in range(SEGMENT_IDS + 1500):
        w.claim(b, f"e{i}", i)
    w.claim(other, "e1", 3)
    first = list(w.drain_changes())
    label = b[1]
    assert [k for k, _ in first] == [DedupWindow.segment_key(label, 0),
                                     DedupWindow.segment_key(label, 1)]
    w.claim(b, "late", 99999)
    w.claim(b, "e3", 5)  # already known: not written again
    second = list(w.drain_changes())
    assert second == [(DedupWindow.segment_key(label, 2), {"ids": [("t1", "late", 99999)]})]
    assert list(w.drain_changes()) == []

    restored = DedupWindow(timedelta(days=35))
    for key, value in orjson.loads(orjson.dumps(first + second)):  # as the changelog has it
        restored.restore_segment(key, value)
    restored.finish_restore()
    assert restored.size == w.size == SEGMENT_IDS + 1502
    assert restored.claim(b, "late", 99999) and not restored.claim(b, "late", 1)
    assert not restored.claim(b, "e3", 5) and restored.claim(b, "e3", 3)
    assert restored.seen(other, "e1") and not restored.seen(other, "e2")
    restored.claim(b, "next", 7)  # continues after the restored segments
    assert [k for k, _ in restored.drain_changes()] == [DedupWindow.segment_key(label, 3)]


def test_state_written_in_the_per_tenant_format_is_restored_and_tombstoned_on_eviction(
) -> None:
    """The changelog of workers before the compact window: `d/<tenant>/<day>/<n>` keys
    with `{"ids": {id: offset}}`. Read back as it is; its tombstones remove one tenant's
    bucket; its segments are tombstoned when their day is evicted."""
    day = "e" + NOW.date().isoformat()
    old_log = [
        (f"d/t1/{day}/0", {"ids": {"a": 1, "b": 2}}),
        (f"d/t1/{day}/1", {"ids": {"c": 3}}),
        (f"d/t2/{day}/0", {"ids": {"a": 4}}),
        (f"d/t3/{day}/0", {"ids": {"z": 5}}),
        (f"d/t3/{day}/0", None),  # t3's bucket evicted by the old worker
    ]
    w = DedupWindow(timedelta(days=2))
    for key, value in old_log:
        w.restore_segment(key, value)
    w.finish_restore()
    assert w.size == 4
    b1, b2 = w.bucket_for("t1", NOW, NOW), w.bucket_for("t2", NOW, NOW)
    assert not w.claim(b1, "c", 9) and w.claim(b1, "c", 3) and not w.claim(b2, "a", 1)
    assert not w.seen(w.bucket_for("t3", NOW, NOW), "z")
    w.claim(b1, "new", 10)
    list(w.drain_changes())
    w.evict_before(NOW + timedelta(days=5))
    assert sorted(k for k, v in w.drain_changes() if v is None) == sorted(
        [DedupWindow.segment_key(day, 0), f"d/t1/{day}/0", f"d/t1/{day}/1", f"d/t2/{day}/0"])
    assert w.size == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.integers(0, 3000),
                          st.integers(0, 2**33)), max_size=4000))
def test_the_window_answers_as_a_dict_of_ids_would(claims: list[tuple[str, int, int]]) -> None:
    """Against the obvious model, through part splits (thousands of ids in one bucket)."""
    w = DedupWindow(timedelta(days=35))
    model: dict[tuple[str, str], int] = {}
    for tenant, n, offset in claims:
        event_id = f"id-{n}"
        first = model.setdefault((tenant, event_id), offset)
        assert w.claim(w.bucket_for(tenant, NOW, NOW), event_id, offset) == (first == offset)
    assert w.size == len(model)


def test_many_distinct_ids_are_never_taken_for_duplicates_and_take_under_24_bytes_each(
) -> None:
    w = DedupWindow(timedelta(days=35))
    b = w.bucket_for("tenant-1", NOW, NOW)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    assert all(w.claim(b, f"{i:08x}-0000-7000-8000-{i:012x}", i) for i in range(300_000))
    for table in w.tables.values():
        table.pending.clear()  # the ids waiting for the next drain's changelog segments
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert w.size == 300_000
    assert held / w.size <= 24, held / w.size


@given(st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1),
                    timezones=st.just(UTC)),
       st.lists(st.tuples(st.one_of(  # event time - watermark: often near the horizon
                    st.timedeltas(min_value=timedelta(days=-36), max_value=timedelta(days=-34)),
                    st.timedeltas(min_value=timedelta(days=-40), max_value=timedelta(days=3))),
                    st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=30))),
                max_size=30))
def test_buckets_do_not_depend_on_what_was_asked_before(
    start: datetime, steps: list[tuple[timedelta, timedelta]],
) -> None:
    """bucket_for remembers the last event day: asked in any order, under a watermark that
    moves forwards, it answers what a fresh window answers."""
    w = DedupWindow(timedelta(days=35))
    watermark = start
    for event_offset, advance in steps:
        watermark += advance
        moment = watermark + event_offset
        fresh = DedupWindow(timedelta(days=35))
        assert w.bucket_for("t1", moment, watermark) == fresh.bucket_for("t1", moment,
                                                                         watermark)
