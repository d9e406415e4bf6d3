"""Idempotency (pure): an event is counted once per (tenant, event id).

Ids are kept per tenant and day bucket, each id with the source offset of the record that
first carried it. A redelivered record (same offset) is recognised as a replay rather than
a duplicate, which lets a restarted worker re-derive its decisions; a later record carrying
the same id is a duplicate.

Memory is bounded by the horizon: buckets older than `horizon` behind the partition's
watermark (the newest ingestion time seen) are evicted. An event older than the horizon is
bucketed by its arrival day instead, so its redeliveries are still caught. The horizon must
be at least the longest lateness window (checked where settings are built).

The changelog form is append-only chunks of at most CHUNK_SIZE ids, so persisting a batch
rewrites only the chunks it touched, never a whole tenant's ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

CHUNK_SIZE = 1000


@dataclass
class _Bucket:
    ids: dict[str, int] = field(default_factory=dict)
    chunks: list[list[str]] = field(default_factory=list)


BucketKey = tuple[str, str]  # (tenant, "e2026-11-21" by event day | "a2026-11-21" by arrival)


@dataclass
class DedupWindow:
    """Seen event ids of one source partition, bounded by a time horizon."""

    horizon: timedelta
    buckets: dict[BucketKey, _Bucket] = field(default_factory=dict)
    dirty: set[tuple[BucketKey, int]] = field(default_factory=set)
    # Evicted buckets and how many chunks each had, awaiting their tombstones.
    evicted: dict[BucketKey, int] = field(default_factory=dict)
    size: int = 0

    def bucket_for(self, tenant: str, event_time: datetime, watermark: datetime) -> BucketKey:
        if event_time >= watermark - self.horizon:
            return tenant, "e" + event_time.date().isoformat()
        return tenant, "a" + watermark.date().isoformat()

    def first_offset(self, bucket: BucketKey, event_id: str) -> int | None:
        """The offset of the record that first carried this id, if it was seen."""
        found = self.buckets.get(bucket)
        return None if found is None else found.ids.get(event_id)

    def add(self, bucket: BucketKey, event_id: str, offset: int) -> None:
        b = self.buckets.setdefault(bucket, _Bucket())
        if event_id in b.ids:
            return
        b.ids[event_id] = offset
        if not b.chunks or len(b.chunks[-1]) >= CHUNK_SIZE:
            b.chunks.append([])
        b.chunks[-1].append(event_id)
        self.dirty.add((bucket, len(b.chunks) - 1))
        self.size += 1

    def evict_before(self, watermark: datetime) -> None:
        """Drop buckets whose day is older than the horizon allows."""
        oldest = (watermark - self.horizon - timedelta(days=1)).date()
        for key in [k for k in self.buckets if date.fromisoformat(k[1][1:]) < oldest]:
            bucket = self.buckets.pop(key)
            self.size -= len(bucket.ids)
            self.dirty = {d for d in self.dirty if d[0] != key}
            self.evicted[key] = len(bucket.chunks)

    # --- changelog -------------------------------------------------------------------

    @staticmethod
    def chunk_key(bucket: BucketKey, index: int) -> str:
        return f"d/{bucket[0]}/{bucket[1]}/{index}"

    def drain_changes(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Changelog entries since the last drain: rewritten chunks and tombstones."""
        for bucket, index in sorted(self.dirty):
            b = self.buckets[bucket]
            ids = {i: b.ids[i] for i in b.chunks[index]}
            yield self.chunk_key(bucket, index), {"ids": ids}
        self.dirty.clear()
        for bucket, chunk_count in self.evicted.items():
            for index in range(chunk_count):
                yield self.chunk_key(bucket, index), None
        self.evicted.clear()

    def restore_chunk(self, key: str, value: dict[str, Any] | None) -> None:
        """Apply one changelog entry read back during recovery."""
        _, tenant, day, index = key.split("/", 3)
        bucket = (tenant, day)
        if value is None:
            if bucket in self.buckets:
                self.size -= len(self.buckets.pop(bucket).ids)
            return
        b = self.buckets.setdefault(bucket, _Bucket())
        i = int(index)
        while len(b.chunks) <= i:
            b.chunks.append([])
        old = b.chunks[i]
        for event_id in old:
            b.ids.pop(event_id, None)
        self.size -= len(old)
        b.chunks[i] = list(value["ids"])
        b.ids.update(value["ids"])
        self.size += len(value["ids"])
