"""How the worker names and describes a record it cannot count (DESIGN guarantee 3: a
dead letter with a reason, never a silent drop). The processor decides that a record or
event is dead (streams/processor.py); this module says with which reason and text
(the dead letter itself, and its text, are `schemas.records.DeadLetter`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import ValidationError

DlqReason = Literal[
    "missing_key",
    "invalid_json",
    "invalid_event",
    "unknown_type",
    "subject_mismatch",
    "unknown_meter",
    "quantity_out_of_range",
    "time_in_future",
    "invalid_timestamp",
]

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
