"""How the worker names and describes a record it cannot count (DESIGN guarantee 3: a
dead letter with a reason, never a silent drop). The processor decides that a record or
event is dead (streams/processor.py); this module says with which reason and text.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError

from schemas.codec import dumps

DlqReason = Literal[
    "missing_key",
    "invalid_json",
    "invalid_event",
    "unknown_type",
    "subject_mismatch",
    "unknown_meter",
    "quantity_out_of_range",
    "time_in_future",
]

# A dead letter carries the offending event as text, cut to this many characters: the
# whole record stays in the source topic at the partition and offset the letter names.
MAX_DEAD_LETTER_TEXT = 64_000


def reason_of(error: ValidationError) -> DlqReason:
    """The reason for a usage event the model refused: a quantity out of range has its
    own, so producers can tell it from a malformed event."""
    for item in error.errors():
        if tuple(item["loc"][:2]) == ("data", "quantity"):
            return "quantity_out_of_range"
    return "invalid_event"


def detail_of(error: ValidationError) -> str:
    """Every problem the model found, on one line."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in error.errors()
    )


def as_text(raw: Any) -> str:
    """The offending record or event as a dead letter carries it (cut, see above)."""
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", "replace")
    else:
        try:
            text = dumps(raw).decode()
        except TypeError:
            text = repr(raw)
    if len(text) > MAX_DEAD_LETTER_TEXT:
        return text[:MAX_DEAD_LETTER_TEXT] + f"... [cut; {len(text)} characters in all]"
    return text
