"""The frame format of `tally.usage.batched` (pure): many source records in one value.

A frame is MAGIC followed by entries, each a fixed header — source offset, source
timestamp (ms), key length, value length (-1 for None), kind — then the key and value
bytes. The kind says what the value is: the record's own value (RAW), or the rows the
pre-batching stage checked it into (CHECKED, see `schemas.fast_usage.check_record`). The
source offset and timestamp travel with each record so the worker's decisions (dedup,
applied offsets, ingestion time) are exactly those it would make reading `tally.usage`
itself.

Frames of the first format (MAGIC_RAW_ONLY: no kind, every value raw) are still read, so a
worker upgraded while such frames wait in the topic reads them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from streams.errors import StreamsError

MAGIC = b"TLB2"
MAGIC_RAW_ONLY = b"TLB1"
_HEADER = struct.Struct(">qqiiB")
_HEADER_RAW_ONLY = struct.Struct(">qqii")
RAW, CHECKED = 0, 1

# offset, timestamp_ms, key, value, whether the value is checked rows
Entry = tuple[int, int, bytes | None, bytes | None, bool]


class FrameError(StreamsError):
    """A batched record is not a valid frame (a bug, not bad input: frames are ours)."""


def entry_size(key: bytes | None, value: bytes | None) -> int:
    return _HEADER.size + len(key or b"") + len(value or b"")


def encode(entries: Iterable[Entry]) -> bytes:
    parts = [MAGIC]
    for offset, timestamp_ms, key, value, checked in entries:
        parts.append(_HEADER.pack(offset, timestamp_ms, -1 if key is None else len(key),
                                  -1 if value is None else len(value),
                                  CHECKED if checked else RAW))
        if key:
            parts.append(key)
        if value:
            parts.append(value)
    return b"".join(parts)


def decode(frame: bytes) -> Iterator[Entry]:
    if frame.startswith(MAGIC):
        header, has_kind = _HEADER, True
    elif frame.startswith(MAGIC_RAW_ONLY):
        header, has_kind = _HEADER_RAW_ONLY, False
    else:
        raise FrameError("not a Tally frame")
    unpack, header_size = header.unpack_from, header.size
    at, end = len(MAGIC), len(frame)
    checked = False
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
        if has_kind:
            if fields[4] not in (RAW, CHECKED):
                raise FrameError(f"unknown entry kind {fields[4]}")
            checked = fields[4] == CHECKED
        yield fields[0], fields[1], key, value, checked
