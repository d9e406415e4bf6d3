"""Event ids: UUIDv7 (RFC 9562), which Python 3.11's uuid module lacks."""

from __future__ import annotations

import os
import random
import time as _time
from uuid import UUID

_VARIANT = 0b10 << 62
_HEX3 = [f"{i:03x}" for i in range(0x1000)]


class _UUID7:
    """UUIDv7 generator: 48-bit Unix ms, 12-bit sequence counter, 62 random bits.

    Ids from one thread sort in creation order (RFC 9562 method 1: the counter is seeded
    randomly each millisecond and, on overflow, borrows the next millisecond). Uniqueness
    rests on the 62 random bits. They come from a private Mersenne Twister seeded from
    os.urandom, reseeded in a forked child so parent and child never share a stream:
    event ids must be unique, not unguessable, and os.urandom per id costs a syscall.
    No lock: threads racing here may share a counter value, never the random bits.
    """

    def __init__(self) -> None:
        self._rng = random.Random()
        self._last_ms = -1
        self._counter = 0
        self._prefix = ""  # "tttttttt-tttt-7" for _last_ms

    def reseed(self) -> None:
        self._rng.seed()

    def _set_ms(self, ms: int) -> None:
        self._last_ms = ms
        h = f"{ms & 0xFFFF_FFFF_FFFF:012x}"
        self._prefix = f"{h[:8]}-{h[8:]}-7"

    def next_str(self) -> str:
        ms = _time.time_ns() // 1_000_000
        if ms > self._last_ms:
            self._set_ms(ms)
            self._counter = self._rng.getrandbits(11)  # top bit clear: room to count up
        else:
            self._counter += 1
            if self._counter > 0xFFF:
                self._set_ms(self._last_ms + 1)
                self._counter = 0
        # Variant bits 0b10, then 62 random bits: "vrrr-rrrrrrrrrrrr" (hex with a dash
        # 6 bytes from the right is the fastest formatting CPython offers here).
        tail = (_VARIANT | self._rng.getrandbits(62)).to_bytes(8, "big").hex("-", 6)
        return f"{self._prefix}{_HEX3[self._counter]}-{tail}"


_GENERATOR = _UUID7()
os.register_at_fork(after_in_child=_GENERATOR.reseed)


def uuid7() -> UUID:
    """A new UUIDv7: time-ordered, unique."""
    return UUID(_GENERATOR.next_str())


def new_event_id() -> str:
    """A new event id: the canonical text of a UUIDv7 (what `record` uses by default)."""
    return _GENERATOR.next_str()
