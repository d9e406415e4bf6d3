"""Idempotency (pure): an event is counted once per (tenant, event id).

Ids are kept per tenant and day bucket, each id with the source offset of the record that
first carried it. A redelivered record (same offset) is recognised as a replay rather than
a duplicate, which lets a restarted worker re-derive its decisions; a later record carrying
the same id is a duplicate.

Memory is bounded by the horizon: buckets older than `horizon` behind the partition's
watermark (the newest ingestion time seen) are evicted. An event older than the horizon is
bucketed by its arrival day instead, so its redeliveries are still caught. The horizon must
be at least the longest lateness window (checked where settings are built).

The changelog form is append-only segments: each drain writes, per bucket, one record with
only the ids added since the previous drain (key `d/<tenant>/<bucket>/<segment no>`), so
the bytes written are proportional to new ids whatever the batch size. Eviction writes a
tombstone for every segment of the bucket.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any


@dataclass
class _Bucket:
    ids: dict[str, int] = field(default_factory=dict)
    segments: int = 0  # segments written to the changelog so far
    # Ids added since the last drain, with their offsets: the next segment as it is written.
    unwritten: dict[str, int] = field(default_factory=dict)


BucketKey = tuple[str, str]  # (tenant, "e2026-11-21" by event day | "a2026-11-21" by arrival)


_DAY = timedelta(days=1)
_EARLIEST = datetime.min.replace(tzinfo=UTC)


@dataclass
class DedupWindow:
    """Seen event ids of one source partition, bounded by a time horizon."""

    horizon: timedelta
    buckets: dict[BucketKey, _Bucket] = field(default_factory=dict)
    dirty: set[BucketKey] = field(default_factory=set)
    # Evicted buckets and how many segments each had, awaiting their tombstones.
    evicted: dict[BucketKey, int] = field(default_factory=dict)
    size: int = 0
    _labels: dict[tuple[str, date], str] = field(default_factory=dict)  # bucket day names
    # The watermark last seen, and the oldest event time bucketed by event day under it.
    _watermark: datetime | None = None
    _floor: datetime = _EARLIEST
    # The bucket day of the event times [_span_from, _span_until) under that watermark.
    _span_label: str = ""
    _span_from: datetime = _EARLIEST
    _span_until: datetime = _EARLIEST

    def bucket_for(self, tenant: str, event_time: datetime, watermark: datetime) -> BucketKey:
        if watermark is not self._watermark:  # changes once per record at most
            self._watermark, self._floor = watermark, watermark - self.horizon
            if self._span_label.startswith("e"):  # an event day: still right above the floor
                self._span_from = max(self._span_from, self._floor)
            else:  # an arrival day: named after the watermark's day
                self._span_until = self._span_from
        # Events mostly fall on the day of the event before: two comparisons find it.
        if not self._span_from <= event_time < self._span_until:
            if event_time >= self._floor:
                day = event_time.date()
                self._span_label = self._day_label("e", day)
                start = datetime.combine(day, time.min, event_time.tzinfo)
                self._span_from, self._span_until = max(start, self._floor), start + _DAY
            else:
                self._span_label = self._day_label("a", watermark.date())
                self._span_from, self._span_until = _EARLIEST, self._floor
        return tenant, self._span_label

    def _day_label(self, kind: str, day: date) -> str:
        label = self._labels.get((kind, day))
        if label is None:
            label = self._labels[(kind, day)] = kind + day.isoformat()
        return label

    def first_offset(self, bucket: BucketKey, event_id: str) -> int | None:
        """The offset of the record that first carried this id, if it was seen."""
        found = self.buckets.get(bucket)
        return None if found is None else found.ids.get(event_id)

    def claim(self, bucket: BucketKey, event_id: str, offset: int) -> int:
        """The offset of the record that first carried this id; an id not seen before is
        remembered as first carried by `offset`."""
        b = self.buckets.get(bucket)
        if b is None:
            b = self.buckets[bucket] = _Bucket()
        first = b.ids.get(event_id)
        if first is not None:
            return first
        b.ids[event_id] = offset
        if not b.unwritten:  # the bucket's first new id since the last drain
            self.dirty.add(bucket)
        b.unwritten[event_id] = offset
        self.size += 1
        return offset

    def evict_before(self, watermark: datetime) -> None:
        """Drop buckets whose day is older than the horizon allows."""
        oldest = (watermark - self.horizon - timedelta(days=1)).date()
        for key in [k for k in self.buckets if date.fromisoformat(k[1][1:]) < oldest]:
            bucket = self.buckets.pop(key)
            self.size -= len(bucket.ids)
            self.dirty.discard(key)
            # Unwritten ids never reached the changelog: only written segments need
            # tombstones (the one being built is dropped with the bucket).
            self.evicted[key] = bucket.segments

    # --- changelog -------------------------------------------------------------------

    @staticmethod
    def segment_key(bucket: BucketKey, index: int) -> str:
        return f"d/{bucket[0]}/{bucket[1]}/{index}"

    def drain_changes(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Changelog entries since the last drain: new segments and tombstones."""
        for bucket in sorted(self.dirty):
            b = self.buckets[bucket]
            yield self.segment_key(bucket, b.segments), {"ids": b.unwritten}
            b.segments += 1
            b.unwritten = {}
        self.dirty.clear()
        for bucket, segments in self.evicted.items():
            for index in range(segments):
                yield self.segment_key(bucket, index), None
        self.evicted.clear()

    def restore_segment(self, key: str, value: dict[str, Any] | None) -> None:
        """Apply one changelog entry read back during recovery."""
        _, tenant, day, index = key.split("/")  # tenant ids cannot hold "/"
        bucket = (tenant, day)
        if value is None:
            if bucket in self.buckets:
                self.size -= len(self.buckets.pop(bucket).ids)
            return
        b = self.buckets.setdefault(bucket, _Bucket())
        b.segments = max(b.segments, int(index) + 1)
        for event_id, offset in value["ids"].items():
            if event_id not in b.ids:
                b.ids[event_id] = offset
                self.size += 1
