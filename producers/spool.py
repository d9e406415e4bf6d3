"""The durable local spool: where batch records go while Kafka cannot be reached.

Layout: a directory of numbered segment files, `segment-0000000001.jsonl`, ..., each an
append-only file of one JSON line per Kafka record::

    {"topic": "tally.usage", "key": "tenant-42", "timestamp_ms": 1763719200123,
     "value": [<the CloudEvents of the batch record, exactly as they would have been sent>]}

Guarantees, and the code that gives them:

- A record handed to `append` is in the kernel's page cache when `append` returns (one
  `os.write` on an O_APPEND descriptor, no user-space buffer), so it survives a crash of
  the process. It survives a crash of the machine once fsynced: every write
  (`fsync="always"`), within `fsync_interval_ms` (`"interval"`), or when the OS gets to it
  (`"never"`).
- Replay never loses a record: a segment is only removed (`remove`) after every record in
  it was acknowledged by Kafka. Appends during a replay go to a newer segment (`rotate`).
  If the process dies mid-replay the whole segment is replayed again on the next start:
  some records are then delivered twice, which is safe because consumers dedup by
  (tenant, event id) — DESIGN.md guarantee 1.
- A line torn by a crash mid-write is cut off when the spool is opened (it was never
  reported as spooled to anyone who could rely on it, since the write did not complete).
- Only one process uses a spool directory at a time (an exclusive `flock` on `.lock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson

from producers import metrics
from producers.errors import SpoolError
from schemas import codec

FsyncPolicy = Literal["always", "interval", "never"]

_SEGMENT_PREFIX = "segment-"
_SEGMENT_SUFFIX = ".jsonl"
REJECTED_FILE = "rejected.jsonl"


@dataclass(frozen=True)
class SpooledRecord:
    """One Kafka record as kept in the spool: where it goes, its key, value and timestamp."""

    topic: str
    key: str
    value: bytes  # the batch record value, a JSON array of CloudEvents
    timestamp_ms: int
    events: int  # how many events the value carries (for metrics)


@dataclass(frozen=True)
class Segment:
    """A sealed segment file: no more appends go to it."""

    seq: int
    path: Path


def _segment_name(seq: int) -> str:
    return f"{_SEGMENT_PREFIX}{seq:010d}{_SEGMENT_SUFFIX}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """An append-only, segmented, crash-safe spool of Kafka records in one directory."""

    def __init__(
        self,
        directory: Path,
        *,
        fsync: FsyncPolicy = "interval",
        fsync_interval_ms: int = 100,
        segment_bytes: int = 64 << 20,
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.fsync_interval_ms = fsync_interval_ms
        self.segment_bytes = segment_bytes
        self._fd: int | None = None
        self._active_seq = 0
        self._active_bytes = 0
        self._dirty = False
        self._sync_timer: asyncio.TimerHandle | None = None
        self._pending = 0
        self._pending_bytes = 0
        self._closed = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SpoolError(f"cannot open spool directory {self.directory}: {e}") from e
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            raise SpoolError(
                f"spool directory {self.directory} is in use by another process"
            ) from e
        self._recover()

    # -- opening -------------------------------------------------------------------------

    def _recover(self) -> None:
        """Cut torn tails, drop empty segments, count what waits; appends go to a new segment."""
        last = 0
        for segment in self._segments():
            last = max(last, segment.seq)
            data = segment.path.read_bytes()
            if data and not data.endswith(b"\n"):
                # The process died inside a write: keep every complete line.
                keep = data.rfind(b"\n") + 1
                with segment.path.open("r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())
                data = data[:keep]
            if not data:
                segment.path.unlink()
                continue
            self._pending += data.count(b"\n")
            self._pending_bytes += len(data)
        self._active_seq = last + 1
        metrics.SPOOLED_RECORDS.inc(self._pending)
        metrics.SPOOLED_BYTES.inc(self._pending_bytes)

    def _segments(self) -> list[Segment]:
        found = []
        for path in self.directory.glob(f"{_SEGMENT_PREFIX}*{_SEGMENT_SUFFIX}"):
            digits = path.name[len(_SEGMENT_PREFIX) : -len(_SEGMENT_SUFFIX)]
            if digits.isdigit():
                found.append(Segment(int(digits), path))
        return sorted(found, key=lambda s: s.seq)

    # -- writing -------------------------------------------------------------------------

    @property
    def pending_records(self) -> int:
        """Records spooled and not yet removed after a successful replay."""
        return self._pending

    @property
    def pending_bytes(self) -> int:
        """Bytes of the segment files those records are in."""
        return self._pending_bytes

    def append(self, record: SpooledRecord) -> None:
        """Append one record durably (see the module docstring for what durable means)."""
        if self._closed:
            raise SpoolError("spool is closed")
        line = codec.dumps(
            {
                "topic": record.topic,
                "key": record.key,
                "timestamp_ms": record.timestamp_ms,
                # Embedded as JSON, not as an escaped string: the file stays readable.
                "value": orjson.Fragment(record.value),
            }
        ) + b"\n"
        try:
            if self._fd is None or self._active_bytes >= self.segment_bytes:
                self._open_active()
            assert self._fd is not None
            written = os.write(self._fd, line)
            while written < len(line):  # pragma: no cover - short writes on regular files
                written += os.write(self._fd, line[written:])
        except OSError as e:
            raise SpoolError(f"cannot write to spool {self.directory}: {e}") from e
        self._active_bytes += len(line)
        self._pending += 1
        self._pending_bytes += len(line)
        metrics.SPOOLED_RECORDS.inc()
        metrics.SPOOLED_BYTES.inc(len(line))
        self._dirty = True
        if self.fsync == "always":
            self.sync()
        elif self.fsync == "interval" and self._sync_timer is None:
            self._schedule_sync()

    def _schedule_sync(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (sync use): sync now rather than never
            self.sync()
            return
        self._sync_timer = loop.call_later(self.fsync_interval_ms / 1000, self._timed_sync)

    def _timed_sync(self) -> None:
        self._sync_timer = None
        with contextlib.suppress(SpoolError):
            self.sync()

    def sync(self) -> None:
        """fsync what was appended so far."""
        if self._fd is not None and self._dirty:
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                raise SpoolError(f"cannot fsync spool {self.directory}: {e}") from e
            self._dirty = False

    def _open_active(self) -> None:
        if self._fd is not None:
            self.rotate()
        path = self.directory / _segment_name(self._active_seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._active_bytes = 0
        _fsync_dir(self.directory)

    def rotate(self) -> None:
        """Seal the active segment (if any): later appends go to a new one."""
        if self._fd is None:
            return
        self.sync()
        os.close(self._fd)
        self._fd = None
        self._active_seq += 1

    # -- replaying -----------------------------------------------------------------------

    def sealed_segments(self) -> list[Segment]:
        """Segments no longer appended to, oldest first: the replay order."""
        return [s for s in self._segments() if self._fd is None or s.seq < self._active_seq]

    def read(self, segment: Segment) -> Iterator[SpooledRecord]:
        """The records of a sealed segment in the order they were appended.

        A line that cannot be parsed is moved to the rejected file rather than dropped.
        """
        with segment.path.open("rb") as f:
            for line in f:
                try:
                    doc = codec.loads(line)
                    events = doc["value"]
                    yield SpooledRecord(
                        topic=str(doc["topic"]),
                        key=str(doc["key"]),
                        value=codec.encode_batch(events),
                        timestamp_ms=int(doc["timestamp_ms"]),
                        events=len(events),
                    )
                except (ValueError, KeyError, TypeError) as e:
                    self._reject_line(line, f"unreadable spool line: {e}")

    def remove(self, segment: Segment) -> None:
        """Delete a sealed segment whose records were all acknowledged by Kafka (or rejected)."""
        try:
            data = segment.path.read_bytes()
        except FileNotFoundError:
            return
        segment.path.unlink()
        _fsync_dir(self.directory)
        records = data.count(b"\n")
        self._pending = max(0, self._pending - records)
        self._pending_bytes = max(0, self._pending_bytes - len(data))
        metrics.SPOOLED_RECORDS.dec(records)
        metrics.SPOOLED_BYTES.dec(len(data))

    def reject(self, record: SpooledRecord, reason: str) -> None:
        """Keep a record the broker refuses for good (e.g. too large) out of the replay path."""
        line = codec.dumps(
            {"reason": reason, "topic": record.topic, "key": record.key,
             "timestamp_ms": record.timestamp_ms, "value": orjson.Fragment(record.value)}
        )
        self._write_rejected(line)

    def _reject_line(self, line: bytes, reason: str) -> None:
        self._write_rejected(codec.dumps({"reason": reason, "line": line.decode(errors="replace")}))

    def _write_rejected(self, line: bytes) -> None:
        metrics.RECORDS_REJECTED.inc()
        with (self.directory / REJECTED_FILE).open("ab") as f:
            f.write(line + b"\n")
            os.fsync(f.fileno())

    def close(self) -> None:
        """fsync and close; an empty active segment is removed."""
        if self._closed:
            return
        self._closed = True
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self._fd is not None:
            path = self.directory / _segment_name(self._active_seq)
            self.rotate()
            if path.exists() and path.stat().st_size == 0:
                path.unlink()
        metrics.SPOOLED_RECORDS.dec(self._pending)
        metrics.SPOOLED_BYTES.dec(self._pending_bytes)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
