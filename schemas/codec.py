"""The one JSON codec of Tally: Kafka record values <-> CloudEvents.

A record value is a single CloudEvent (`application/cloudevents+json`) or a JSON array of
them (`application/cloudevents-batch+json`). Consumers tell them apart by the first
non-blank byte, so records without a content-type header are read too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any

import orjson
from pydantic import BaseModel

from schemas.errors import SchemaError

CONTENT_TYPE_HEADER = "content-type"
SINGLE_CONTENT_TYPE = "application/cloudevents+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"

_WHITESPACE = b" \t\r\n"


class RecordDecodeError(SchemaError):
    """The record value is not JSON, or not an object or array of objects."""


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot encode {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """Encode to JSON bytes; Decimals become strings so no precision is lost."""
    return orjson.dumps(value, default=_default)


def loads(data: bytes | str) -> Any:
    """Decode JSON bytes (raises orjson.JSONDecodeError, a ValueError)."""
    return orjson.loads(data)


def decode_record(value: bytes | None) -> list[Any]:
    """Split a record value into the raw event objects it carries.

    Raises RecordDecodeError when the value is empty, not JSON, or not an object / array.
    Elements of a batch are returned as they are (validation is the caller's), so one bad
    element does not hide its neighbours.
    """
    if not value:
        raise RecordDecodeError("empty record value")
    head = value[:1]
    if head not in (b"{", b"["):  # lstrip copies the value: only when it starts blank
        head = value.lstrip(_WHITESPACE)[:1]
    if head not in (b"{", b"["):
        raise RecordDecodeError("record value is not a JSON object or array")
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise RecordDecodeError(f"invalid JSON: {e}") from e
    if isinstance(parsed, dict):
        return [parsed]
    if isinstance(parsed, list):
        if not parsed:
            raise RecordDecodeError("empty batch")
        return parsed
    raise RecordDecodeError("record value is not a JSON object or array")  # pragma: no cover


def is_batch_value(value: bytes) -> bool:
    """Whether a value `decode_record` read is a batch (its first non-blank byte is `[`)."""
    head = value[:1]
    return (head if head in (b"{", b"[") else value.lstrip(_WHITESPACE)[:1]) == b"["


def encode_batch(events: Sequence[BaseModel | dict[str, Any]]) -> bytes:
    """Encode events as one batch record value."""
    return dumps(list(events))


def encode_event(event: BaseModel | dict[str, Any]) -> bytes:
    """Encode one event as a single-event record value."""
    return dumps(event)


def join_arrays(arrays: Iterable[bytes], max_bytes: int) -> Iterator[bytes]:
    """Encoded non-empty JSON arrays (as `dumps` writes them) merged, in order, into as few
    arrays as fit in `max_bytes` each; an array longer than that on its own stays whole."""
    batch: list[bytes] = []
    size = 0
    for array in arrays:
        if batch and size + len(array) > max_bytes:
            yield _joined(batch)
            batch, size = [], 0
        batch.append(array)
        size += len(array)
    if batch:
        yield _joined(batch)


def _joined(arrays: list[bytes]) -> bytes:
    if len(arrays) == 1:
        return arrays[0]
    # Without the brackets of each; memoryviews spare a copy of every element.
    return b"[" + b",".join(memoryview(a)[1:-1] for a in arrays) + b"]"


def content_type_headers(batch: bool) -> list[tuple[str, bytes]]:
    """Kafka headers announcing the record's CloudEvents content mode."""
    kind = BATCH_CONTENT_TYPE if batch else SINGLE_CONTENT_TYPE
    return [(CONTENT_TYPE_HEADER, kind.encode())]
