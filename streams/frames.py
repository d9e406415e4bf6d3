"""The frame format of `tally.usage.batched` (pure): many source records in one value.

A frame is MAGIC followed by entries, each a fixed header — source offset, source
timestamp (ms), key length, value length (-1 for None) — then the key and value bytes as
they were. The source offset and timestamp travel with each record so the worker's
decisions (dedup, applied offsets, ingestion time) are exactly those it would make
reading `tally.usage` itself.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from streams.errors import StreamsError

MAGIC = b"TLB1"
_HEADER = struct.Struct(">qqii")

Entry = tuple[int, int, bytes | None, bytes | None]  # offset, timestamp_ms, key, value


class FrameError(StreamsError):
    """A batched record is not a valid frame (a bug, not bad input: frames are ours)."""


def entry_size(key: bytes | None, value: bytes | None) -> int:
    return _HEADER.size + len(key or b"") + len(value or b"")


def encode(entries: Iterable[Entry]) -> bytes:
    parts = [MAGIC]
    for offset, timestamp_ms, key, value in entries:
        parts.append(_HEADER.pack(offset, timestamp_ms, -1 if key is None else len(key),
                                  -1 if value is None else len(value)))
        if key:
            parts.append(key)
        if value:
            parts.append(value)
    return b"".join(parts)


def decode(frame: bytes) -> Iterator[Entry]:
    if not frame.startswith(MAGIC):
        raise FrameError("not a Tally frame")
    view = memoryview(frame)
    at, end = len(MAGIC), len(frame)
    while at < end:
        if at + _HEADER.size > end:
            raise FrameError("truncated frame header")
        offset, timestamp_ms, key_len, value_len = _HEADER.unpack_from(view, at)
        at += _HEADER.size
        key = None if key_len < 0 else bytes(view[at:at + key_len])
        at += max(key_len, 0)
        value = None if value_len < 0 else bytes(view[at:at + value_len])
        at += max(value_len, 0)
        if at > end:
            raise FrameError("truncated frame entry")
        yield offset, timestamp_ms, key, value
