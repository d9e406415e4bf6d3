"""Idempotency (pure): an event is counted once per (tenant, event id).

Ids are kept per time bucket (the event's day, or its arrival day, see `bucket_for`), each
with the source offset of the record that first carried it. A redelivered record (same
offset) is recognised as a replay rather than a duplicate, which lets a restarted worker
re-derive its decisions; a later record carrying the same id is a duplicate.

Memory is bounded twice (DESIGN guarantee 5):
- by the horizon: buckets older than `horizon` behind the partition's watermark (the
  newest ingestion time seen) are evicted. An event older than the horizon is bucketed by
  its arrival day instead, so its redeliveries are still caught. The horizon must be at
  least the longest lateness window (checked where settings are built);
- per id: a bucket holds no strings, only fixed-width numbers in sorted arrays, about 20
  bytes per id (`IdTable`; docs/architecture.md, "Guarantees and what they cost", has the
  measurement and the arithmetic).

What an id is held as: a 64-bit hash of "tenant/id" (the table's sort key), 32 more bits
of an independent hash of the id (a check), and the low 32 bits of the first offset. Two
different ids are taken for one only if all 96 hash bits agree: with n ids held, a new id
is a false duplicate with probability below n / 2**96 (9e-22 for 72 million ids held, an
hour at 20,000 events/s; 6e-10 false duplicates expected in a year at that rate). A
duplicate is taken for a replay only if its first carrier is a multiple of 2**32 records
earlier in the same partition. The hashes are Python's own string hash (SipHash with a
key drawn at process start): never persisted, so they cannot be predicted from outside,
and recomputed from the ids in the changelog when the state is restored.

The changelog holds the ids themselves, in append-only segments: each drain writes, per
bucket, the ids added since the previous drain (key `d/<bucket>/<segment no>`, value
`{"ids": [[tenant, id, offset], ...]}`, at most SEGMENT_IDS ids each), so the bytes written
are proportional to new ids whatever the batch size. Eviction writes a tombstone for
every segment of the bucket. State written before this format, with one bucket per tenant
(`d/<tenant>/<bucket>/<n>`, value `{"ids": {id: offset}}`), is read back as well, and its
segments are tombstoned when their bucket is evicted: no migration step is needed.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

if sys.hash_info.width < 64:  # pragma: no cover - every 64-bit CPython
    raise ImportError("streams.dedup needs 64-bit string hashes (a 64-bit Python)")

BucketKey = tuple[str, str]  # (tenant, "e2026-11-21" by event day | "a2026-11-21" by arrival)

SEGMENT_IDS = 5000  # ids per changelog record: ~300 KB, far below the producer's request size
PART_IDS = 128  # a part that would hold more ids splits in two
_MASK32 = (1 << 32) - 1
_DAY = timedelta(days=1)
_EARLIEST = datetime.min.replace(tzinfo=UTC)


class IdTable:
    """The ids of one time bucket: fixed-width numbers in small sorted arrays.

    Extendible hashing: the top `depth` bits of a key (a signed 64-bit hash) index the
    directory `dir` (`key >> shift`; negative prefixes index from the back, as Python
    does), which names the part holding the key. A part is a sorted array of keys and a
    parallel array of `check << 32 | offset & 0xFFFFFFFF`, so a lookup or an insert is a
    bisect and a memmove in an array of at most PART_IDS entries. A part that outgrows it
    splits in two by its next key bit (doubling the directory first if the part already
    uses all its bits): memory grows with the ids, a part at a time, never a whole copy.
    """

    __slots__ = ("depths", "dir", "keys", "metas", "pending", "segments", "shift", "size")

    def __init__(self) -> None:
        # Two parts to start with: keys from 0 up (directory item 0) and negative keys
        # (item -1, the last): `key >> 63` is 0 or -1.
        self.keys: list[array[int]] = [array("q"), array("q")]
        self.metas: list[array[int]] = [array("Q"), array("Q")]
        self.depths = [1, 1]  # how many top key bits each part's keys share
        self.dir = [0, 1]
        self.shift = 63  # 64 - the directory's depth
        self.size = 0
        self.segments = 0  # changelog segments written for this bucket so far
        # Ids added since the last drain, (tenant, id, offset): its next segments.
        self.pending: list[tuple[str, str, int]] = []

    def claim(self, key: int, check: int, offset: int) -> bool:
        """Whether `offset` first carried the id (key, check): True for an id not seen
        before (then remembered as carried by `offset`) and for a replay of its first
        record; False for a duplicate. (DedupWindow.claim has this inlined.)"""
        part = self.dir[key >> self.shift]
        keys = self.keys[part]
        i = bisect_left(keys, key)
        n = len(keys)
        while i < n and keys[i] == key:  # nearly always at most one: a 64-bit match
            meta = self.metas[part][i]
            if meta >> 32 == check:
                return meta & _MASK32 == offset & _MASK32
            i += 1
        keys.insert(i, key)
        self.metas[part].insert(i, check << 32 | offset & _MASK32)
        self.size += 1
        if n >= PART_IDS:
            self.split(part)
        return True

    def contains(self, key: int, check: int) -> bool:
        part = self.dir[key >> self.shift]
        keys = self.keys[part]
        i = bisect_left(keys, key)
        while i < len(keys) and keys[i] == key:
            if self.metas[part][i] >> 32 == check:
                return True
            i += 1
        return False

    def split(self, part: int) -> None:
        """Split a part in two by the next bit of its keys (those with a 1 move to a new
        part), doubling the directory first when the part uses all its bits."""
        depth = self.depths[part]
        if depth >= 48:  # 2**48 parts: only equal 64-bit keys get here; let them be
            return
        if depth == 64 - self.shift:  # every directory item is two now
            self.dir = [p for p in self.dir for _ in (0, 1)]
            self.shift -= 1
        keys, metas = self.keys[part], self.metas[part]
        prefix = keys[0] >> (64 - depth)  # the part's keys share it (signed)
        middle = bisect_left(keys, (2 * prefix + 1) << (63 - depth))
        new = len(self.keys)
        self.keys[part], self.metas[part] = keys[:middle], metas[:middle]
        self.keys.append(keys[middle:])
        self.metas.append(metas[middle:])
        self.depths[part] = depth + 1
        self.depths.append(depth + 1)
        # Directory items of the upper half of the part's prefix range name the new part.
        spread = 64 - self.shift - depth  # directory bits below the part's prefix
        for item in range((2 * prefix + 1) << (spread - 1), (prefix + 1) << spread):
            self.dir[item] = new

def source_tag(offset: int, source_partition: int) -> int:
    """What the window holds as the first carrier of an id carried by the record at
    `offset` of a source partition other than the processor's own (the home partition,
    whose records are held by their offset alone): the offset mixed with the partition,
    so that records of different partitions at equal offsets are not taken for each other.
    Distinct partitions add distinct odd multiples of 2**32 / golden ratio, which spread
    far apart modulo 2**32 (docs/architecture.md, "Guarantees and what they cost")."""
    return (offset + (source_partition + 1) * 0x9E3779B1) & _MASK32


def id_hashes(tenant: str, event_id: str) -> tuple[int, int]:
    """The (key, check) an id is held as (see the module docstring)."""
    return hash(f"{tenant}/{event_id}"), hash(event_id) & _MASK32


@dataclass
class DedupWindow:
    """Seen event ids of one source partition, bounded by a time horizon."""

    horizon: timedelta
    tables: dict[str, IdTable] = field(default_factory=dict)  # per bucket day label
    # Evicted buckets and how many segments each had, awaiting their tombstones.
    evicted: dict[str, int] = field(default_factory=dict)
    # How many segments of the per-tenant format (read back from older state) each
    # bucket has, per tenant: tombstoned when their bucket is evicted.
    legacy_segments: dict[str, dict[str, int]] = field(default_factory=dict)
    evicted_legacy: dict[str, dict[str, int]] = field(default_factory=dict)
    _legacy_read: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
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

    def _table(self, label: str) -> IdTable:
        table = self.tables.get(label)
        if table is None:
            table = self.tables[label] = IdTable()
        return table

    def seen(self, bucket: BucketKey, event_id: str) -> bool:
        """Whether this id was seen in this bucket."""
        table = self.tables.get(bucket[1])
        return table is not None and table.contains(*id_hashes(bucket[0], event_id))

    @property
    def size(self) -> int:
        """How many ids are held."""
        return sum(table.size for table in self.tables.values())

    def claim(self, bucket: BucketKey, event_id: str, offset: int) -> bool:
        """Whether the record at `offset` is the first to carry this id (or a replay of
        that record); an id not seen before is remembered as first carried by it. False:
        a duplicate. (Once per event: `IdTable.claim` inlined, constants written out.)"""
        tenant, label = bucket
        table = self.tables.get(label)
        if table is None:
            table = self.tables[label] = IdTable()
        key = hash(f"{tenant}/{event_id}")
        check = hash(event_id) & 0xFFFFFFFF
        part = table.dir[key >> table.shift]
        keys = table.keys[part]
        i = bisect_left(keys, key)
        n = len(keys)
        while i < n and keys[i] == key:  # nearly always at most one: a 64-bit match
            meta = table.metas[part][i]
            if meta >> 32 == check:
                return meta & 0xFFFFFFFF == offset & 0xFFFFFFFF
            i += 1
        keys.insert(i, key)
        table.metas[part].insert(i, check << 32 | offset & 0xFFFFFFFF)
        table.size += 1
        table.pending.append((tenant, event_id, offset))  # its next changelog segment
        if n >= PART_IDS:
            table.split(part)
        return True

    def evict_before(self, watermark: datetime) -> None:
        """Drop buckets whose day is older than the horizon allows."""
        oldest = (watermark - self.horizon - _DAY).date()
        for label in [k for k in self.tables if date.fromisoformat(k[1:]) < oldest]:
            table = self.tables.pop(label)
            # Pending ids never reached the changelog: only written segments need
            # tombstones (the ones being built are dropped with the bucket).
            self.evicted[label] = table.segments
        for label in [k for k in self.legacy_segments if date.fromisoformat(k[1:]) < oldest]:
            self.evicted_legacy[label] = self.legacy_segments.pop(label)

    # --- changelog -------------------------------------------------------------------

    @staticmethod
    def segment_key(label: str, index: int) -> str:
        return f"d/{label}/{index}"

    def drain_changes(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Changelog entries since the last drain: new segments and tombstones."""
        for label, table in sorted(self.tables.items()):
            pending, table.pending = table.pending, []
            for start in range(0, len(pending), SEGMENT_IDS):
                # (tenant, id, offset) triples, as they were claimed: orjson writes them
                # as arrays without a dict being built per id.
                yield (self.segment_key(label, table.segments),
                       {"ids": pending[start:start + SEGMENT_IDS]})
                table.segments += 1
        for label, segments in self.evicted.items():
            for index in range(segments):
                yield self.segment_key(label, index), None
        self.evicted.clear()
        for label, by_tenant in self.evicted_legacy.items():
            for tenant, segments in by_tenant.items():
                for index in range(segments):
                    yield f"d/{tenant}/{label}/{index}", None
        self.evicted_legacy.clear()

    def restore_segment(self, key: str, value: dict[str, Any] | None) -> None:
        """Apply one changelog entry read back during recovery (either format); call
        `finish_restore` after the last one."""
        parts = key.split("/")  # neither tenant ids nor bucket names hold "/"
        if len(parts) == 4:  # d/<tenant>/<bucket>/<n>: the per-tenant format
            tenant, label = parts[1], parts[2]
            segments = self.legacy_segments.setdefault(label, {})
            if value is None:
                self._legacy_read.pop((tenant, label), None)
                segments.pop(tenant, None)
                return
            self._legacy_read.setdefault((tenant, label), {}).update(value["ids"])
            segments[tenant] = max(segments.get(tenant, 0), int(parts[3]) + 1)
            return
        _, label, index = parts
        if value is None:  # a bucket is evicted whole: all its segments are tombstoned
            self.tables.pop(label, None)
            return
        table = self._table(label)
        table.segments = max(table.segments, int(index) + 1)
        for tenant, event_id, offset in value["ids"]:
            table.claim(*id_hashes(tenant, event_id), offset)

    def finish_restore(self) -> None:
        """Fold the ids read in the per-tenant format into the tables. (They are kept
        apart until the end: a tombstone of that format removes one tenant's bucket.)"""
        for (tenant, label), ids in self._legacy_read.items():
            table = self._table(label)
            for event_id, offset in ids.items():
                table.claim(*id_hashes(tenant, event_id), offset)
        self._legacy_read.clear()
