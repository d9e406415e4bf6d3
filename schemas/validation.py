"""What Tally accepts: the one definition of the rules every stage holds events to.

An event is accepted only if every stage after it can store it, so that nothing accepted
at the edge crashes or vanishes further on (README, "What Tally accepts"):

- **Times** (event time, subscription periods) carry a UTC offset, convert to UTC without
  overflow, and are at or after 1970-01-01T00:00:00Z. A usage event's time is at most the
  allowed future skew (`Settings.max_future_seconds`) after "now": the wall clock for the
  SDK and the gateway, the record's ingestion time for the worker.
- **Text** holds no NUL character (Postgres text cannot) and no unpaired surrogate (it has
  no UTF-8 form, so it cannot be sent).
- **Quantities** are JSON numbers, or strings in JSON's number grammar with ASCII digits
  only (no sign, `+`, `_`, blanks, `5.` or `.5`); non-negative (not even `-0`), at most
  1e15, with at most 12 digits after the point, and an exponent of at most 15 (`0e16` is
  refused too). A JSON number is read through its shortest float text, as orjson reads it.

The pydantic models (schemas/events.py) call these functions; so do the fast paths that
skip the models for plain input (schemas/fast_usage.py for the pre-batching stage and the
worker, producers/encoding.py for the SDK): a fast path may decline anything and leave it
to the model, but never accepts what these rules refuse.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation

EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_MAX_FUTURE = timedelta(minutes=5)
MAX_QUANTITY = Decimal("1e15")
MAX_QUANTITY_PLACES = 12
_MAX_EXPONENT = 15
_MAX_INT_QUANTITY = int(MAX_QUANTITY)

# JSON's number grammar (RFC 8259, section 6) without the minus sign: a quantity is never
# negative. ASCII digits only; Python's `\d` would also match other scripts' digits.
QUANTITY_TEXT = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?", re.ASCII)
# The quantity rules as far as JSON Schema can say them (the exported contract).
QUANTITY_JSON_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0, "maximum": int(MAX_QUANTITY)},
        {"type": "string", "pattern": f"^{QUANTITY_TEXT.pattern}$"},
    ],
    "description": "A non-negative decimal, at most 1e15, at most 12 digits after the point;"
                   " as a string, in JSON's number grammar without a sign.",
}
# NUL, and any surrogate code point: a str from JSON never holds one (orjson refuses lone
# surrogates), but a str built in Python may.
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")


# --- times -------------------------------------------------------------------------------


def time_problem(moment: datetime) -> str | None:
    """Why an event's time is refused, or None when it is acceptable."""
    offset = moment.utcoffset()
    if offset is None:
        return "time must carry a UTC offset"
    try:
        in_utc = moment.astimezone(UTC)
    except OverflowError:
        return "time is out of range once converted to UTC"
    if in_utc < EARLIEST_TIME:
        return "time must be at or after 1970-01-01T00:00:00Z"
    return None


def check_time(moment: datetime) -> datetime:
    """`moment` if acceptable; else ValueError saying why (pydantic validators call it)."""
    problem = time_problem(moment)
    if problem is not None:
        raise ValueError(problem)
    return moment


def time_text_only(value: object) -> object:
    """`value` if it can be a time: RFC 3339 text (or a datetime, from Python callers);
    else ValueError (a number is not read as seconds since 1970)."""
    if isinstance(value, str | datetime):
        return value
    raise ValueError("time must be RFC 3339 text with a UTC offset")


def future_problem(moment: datetime, now: datetime, max_future: timedelta) -> str | None:
    """Why a usage event timed `moment` is refused when it arrives at `now` (it is more
    than `max_future` ahead), or None. Both are acceptable aware times."""
    if moment > now + max_future:
        return (f"event time {moment.isoformat()} is more than {max_future} after "
                f"{now.isoformat()}")
    return None


# --- text --------------------------------------------------------------------------------


def text_problem(text: str) -> str | None:
    """Why a text field is refused (NUL or an unpaired surrogate), or None."""
    if text.isascii():
        return "text must not contain a NUL character" if "\x00" in text else None
    found = _BAD_TEXT.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "text must not contain a NUL character"
    return "text must not contain an unpaired surrogate"


def check_text(text: str) -> str:
    """`text` if acceptable; else ValueError saying why."""
    problem = text_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


def texts_acceptable(*texts: str) -> bool:
    """Whether every one of these texts is acceptable (the fast paths' check)."""
    for text in texts:
        if "\x00" in text or (not text.isascii() and _BAD_TEXT.search(text)):
            return False
    return True


# --- quantities --------------------------------------------------------------------------


def amount_problem(amount: Decimal) -> str | None:
    """Why a decimal quantity is refused, or None."""
    if not amount.is_finite():
        return "quantity must be a finite number"
    if amount.is_signed():
        return "quantity must not be negative (nor -0)"
    if amount > MAX_QUANTITY:
        return f"quantity must be at most {MAX_QUANTITY}"
    exponent = amount.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    if exponent < -MAX_QUANTITY_PLACES:
        return f"quantity must have at most {MAX_QUANTITY_PLACES} digits after the point"
    if exponent > _MAX_EXPONENT:
        return f"quantity's exponent must be at most {_MAX_EXPONENT}"
    return None


def quantity_of(value: object) -> Decimal:
    """The quantity `value` stands for: a str in JSON's number grammar, an int, a float
    (through its shortest text) or a Decimal; ValueError saying why it is refused."""
    kind = type(value)
    if kind is str:
        assert isinstance(value, str)
        if QUANTITY_TEXT.fullmatch(value) is None:
            raise ValueError("quantity must be a decimal number in JSON's number grammar "
                             "(ASCII digits; no sign, blanks or underscores; digits on both "
                             "sides of a point)")
        try:
            amount = Decimal(value)
        except InvalidOperation:  # pragma: no cover - the grammar is Decimal's subset
            raise ValueError("quantity is not a number") from None
    elif kind is int:
        assert isinstance(value, int)
        if not 0 <= value <= _MAX_INT_QUANTITY:
            raise ValueError(f"quantity must be between 0 and {MAX_QUANTITY}")
        return Decimal(value)
    elif kind is float:
        assert isinstance(value, float)
        amount = Decimal(repr(value))
    elif isinstance(value, Decimal):
        amount = value
    elif isinstance(value, bool):
        raise ValueError("quantity must be a decimal string or number, not a boolean")
    else:
        raise ValueError("quantity must be a decimal string or number")
    problem = amount_problem(amount)
    if problem is not None:
        raise ValueError(problem)
    return amount


# Texts already read, and what they read as: most quantities are a few small numbers.
# Emptied when full, so it stays small.
_CACHE_LIMIT = 4096
_amounts: dict[str, Decimal] = {}


def read_quantity(value: object) -> Decimal | None:
    """`quantity_of(value)`, or None where it raises: the fast paths' reading."""
    if isinstance(value, str):
        amount = _amounts.get(value)
        if amount is not None:
            return amount
    elif type(value) is int:
        return Decimal(value) if 0 <= value <= _MAX_INT_QUANTITY else None
    try:
        amount = quantity_of(value)
    except ValueError:
        return None
    if isinstance(value, str):
        if len(_amounts) >= _CACHE_LIMIT:
            _amounts.clear()
        _amounts[value] = amount
    return amount
