"""The hostile corpus (tests/data/hostile/corpus.jsonl) and how to account for it.

Each line is one Kafka record for `tally.usage`: its key (`key`, or `key_b64` for bytes
that are not UTF-8, null for none), its value (`value` as JSON, `value_text` as raw text,
`value_b64` as raw bytes, `value_null` for none), optionally its timestamp
(`timestamp_ms`), and how many of its events must reach the ledger (`counted`). Everything
else in it must be a dead letter or a counted duplicate: the accounting is
`ledger + dead letters + duplicates = published`.

A record counts as one published unit per event when its key is present and its value
splits into events (`schemas.codec.decode_record`) and its timestamp is usable, as one
unit otherwise (the worker dead-letters such a record whole).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from schemas.codec import RecordDecodeError, decode_record

_YEAR_9000_MS = int(datetime(9000, 1, 1, tzinfo=UTC).timestamp() * 1000)
CORPUS = Path(__file__).parent / "data" / "hostile" / "corpus.jsonl"


@dataclass(frozen=True)
class HostileRecord:
    name: str
    key: bytes | None
    value: bytes | None
    counted: int
    timestamp_ms: int | None = None  # the record's timestamp, if not the producer's clock


def _bytes(line: dict[str, Any], name: str) -> bytes | None:
    if f"{name}_b64" in line:
        return base64.b64decode(line[f"{name}_b64"])
    if name == "value":
        if line.get("value_null"):
            return None
        if "value_text" in line:
            return str(line["value_text"]).encode("utf-8", "surrogatepass")
        return orjson.dumps(line["value"])
    key = line.get("key")
    return None if key is None else str(key).encode()


def load_corpus() -> list[HostileRecord]:
    records = []
    for text in CORPUS.read_text().splitlines():
        line = orjson.loads(text)
        records.append(HostileRecord(line["name"], _bytes(line, "key"), _bytes(line, "value"),
                                     int(line["counted"]), line.get("timestamp_ms")))
    return records


def units(key: bytes | None, value: bytes | None, timestamp_ms: int | None = None) -> int:
    """How many published units a record is (see the module docstring); a record whose
    timestamp the worker cannot use (before 1970 or from year 9000) is dead-lettered whole."""
    if not key or (timestamp_ms is not None and not 0 <= timestamp_ms < _YEAR_9000_MS):
        return 1
    try:
        return len(decode_record(value))
    except RecordDecodeError:
        return 1
