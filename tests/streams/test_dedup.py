from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from streams.dedup import DedupWindow

NOW = datetime(2026, 11, 21, tzinfo=UTC)


def test_an_id_remembers_the_offset_that_first_carried_it() -> None:
    w = DedupWindow(timedelta(days=35))
    b = w.bucket_for("t1", NOW, NOW)
    assert w.first_offset(b, "e1") is None
    assert w.claim(b, "e1", 7) == 7
    assert w.claim(b, "e1", 9) == 7  # a later record carrying it: a duplicate
    assert w.first_offset(b, "e1") == 7
    assert w.size == 1


def test_buckets_beyond_the_horizon_are_evicted_with_tombstones() -> None:
    w = DedupWindow(timedelta(days=2))
    old = w.bucket_for("t1", NOW - timedelta(days=1), NOW - timedelta(days=1))
    w.claim(old, "e1", 1)
    list(w.drain_changes())
    w.evict_before(NOW + timedelta(days=5))
    assert w.size == 0
    assert list(w.drain_changes()) == [(DedupWindow.segment_key(old, 0), None)]


def test_event_older_than_the_horizon_is_bucketed_by_arrival() -> None:
    w = DedupWindow(timedelta(days=2))
    bucket = w.bucket_for("t1", NOW - timedelta(days=30), NOW)
    assert bucket == ("t1", "a" + NOW.date().isoformat())


def test_changelog_writes_only_new_ids_and_restores_exactly() -> None:
    w = DedupWindow(timedelta(days=35))
    b = w.bucket_for("t1", NOW, NOW)
    for i in range(1500):
        w.claim(b, f"e{i}", i)
    first = list(w.drain_changes())
    assert [k for k, _ in first] == [DedupWindow.segment_key(b, 0)]
    w.claim(b, "late", 99999)
    w.claim(b, "e3", 5)  # already known: not written again
    second = list(w.drain_changes())
    assert second == [(DedupWindow.segment_key(b, 1), {"ids": {"late": 99999}})]
    assert list(w.drain_changes()) == []

    restored = DedupWindow(timedelta(days=35))
    for key, value in first + second:
        restored.restore_segment(key, value)
    assert restored.size == w.size == 1501
    assert restored.first_offset(b, "late") == 99999
    assert restored.first_offset(b, "e3") == 3
    restored.claim(b, "next", 7)  # continues after the restored segments
    assert [k for k, _ in restored.drain_changes()] == [DedupWindow.segment_key(b, 2)]


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
