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
       st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=80)),
       st.lists(st.timedeltas(min_value=timedelta(days=-3), max_value=timedelta(days=3)),
                max_size=20))
def test_every_time_in_a_bucket_span_gets_that_bucket(
    event_time: datetime, behind: timedelta, nearby: list[timedelta],
) -> None:
    w = DedupWindow(timedelta(days=35))
    watermark = event_time + behind
    bucket, start, end = w.bucket_span("t1", event_time, watermark)
    assert start <= event_time < end
    assert bucket == w.bucket_for("t1", event_time, watermark)
    for moment in (event_time + d for d in nearby):
        if start <= moment < end:
            assert w.bucket_for("t1", moment, watermark) == bucket
