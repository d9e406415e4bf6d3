"""The frame format of `tally.usage.batched` (pure): many source records in one value.

A frame is MAGIC followed by entries, each a fixed header — source offset, source
timestamp (ms), key length, value length (-1 for None), kind, source partition — then the
key and value bytes. The kind says what the value is: a usage record's own value (RAW),
the rows the pre-batching stage checked it into (CHECKED, see
`schemas.fast_usage.check_record`), or a `tally.subscriptions` record (SUBSCRIPTION). The
source partition, offset and timestamp travel with each record so the worker's decisions
(dedup, applied offsets, ingestion time, dead letters) are exactly those it would make
reading the source topics itself: a frame holds the records of every source partition
whose tenants its partition owns (docs/architecture.md, "Partition ownership").

Frames of the earlier formats are still read, so a worker upgraded while such frames wait
in the topic reads them: TLB2 (no source partition) and TLB1 (no kind either, every value
raw) held only `tally.usage` records of the frame's own partition number.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from streams.errors import StreamsError

MAGIC = b"TLB3"
MAGIC_SAME_PARTITION = b"TLB2"
MAGIC_RAW_ONLY = b"TLB1"
_HEADER = struct.Struct(">qqiiBi")
_HEADER_SAME_PARTITION = struct.Struct(">qqiiB")
_HEADER_RAW_ONLY = struct.Struct(">qqii")
RAW, CHECKED, SUBSCRIPTION = 0, 1, 2

# offset, timestamp_ms, key, value, kind, source partition
Entry = tuple[int, int, bytes | None, bytes | None, int, int]


class FrameError(StreamsError):
    """A batched record is not a valid frame (a bug, not bad input: frames are ours)."""


def entry_size(key: bytes | None, value: bytes | None) -> int:
    return _HEADER.size + len(key or b"") + len(value or b"")


def encode(entries: Iterable[Entry]) -> bytes:
    parts = [MAGIC]
    for offset, timestamp_ms, key, value, kind, source_partition in entries:
        parts.append(_HEADER.pack(offset, timestamp_ms, -1 if key is None else len(key),
                                  -1 if value is None else len(value), kind,
                                  source_partition))
        if key:
            parts.append(key)
        if value:
            parts.append(value)
    return b"".join(parts)


def decode(frame: bytes, partition: int) -> Iterator[Entry]:
    """The entries of a frame read from `partition` of `tally.usage.batched` (the source
    partition of the entries of the older formats, which have none of their own)."""
    if frame.startswith(MAGIC):
        header = _HEADER
    elif frame.startswith(MAGIC_SAME_PARTITION):
        header = _HEADER_SAME_PARTITION
    elif frame.startswith(MAGIC_RAW_ONLY):
        header = _HEADER_RAW_ONLY
    else:
        raise FrameError("not a Tally frame")
    fields_known = len(header.format) - 1  # 4, 5 or 6 fields (the format starts with ">")
    unpack, header_size = header.unpack_from, header.size
    at, end = len(MAGIC), len(frame)
    kind, source = RAW, partition
    while at < end:
        if at + header_size > end:
            raise FrameError("truncated frame header")
        fields = unpack(frame, at)
        at += header_size
        key_len, value_len = fields[2], fields[3]
        key = None if key_len < 0 else frame[at:at + key_len]
        at += max(key_len, 0)
        value = None if value_len < 0 else frame[at:at + value_len]
        at += max(value_len, 0)
        if at > end:
            raise FrameError("truncated frame entry")
        if fields_known > 4:
            kind = fields[4]
            if kind not in (RAW, CHECKED, SUBSCRIPTION) or (
                    kind == SUBSCRIPTION and fields_known == 5):
                raise FrameError(f"unknown entry kind {kind}")
        if fields_known > 5:
            source = fields[5]
            if source < 0:
                raise FrameError(f"negative source partition {source}")
        yield fields[0], fields[1], key, value, kind, source
