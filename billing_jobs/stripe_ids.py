"""The names Tally gives its Stripe calls, within Stripe's limits.

Stripe's limits (its OpenAPI document and its docs): a meter event `identifier` at most
100 characters, an `Idempotency-Key` at most 255, metadata keys at most 40 characters,
values at most 500, at most 50 keys.

Every name is a pure function of what it names, so a retry or a re-run sends the same
one. The readable form is used when it fits; when it does not (a 128-character tenant id
in a meter event identifier), the name is its first characters, `~`, and the SHA-256 of
the whole readable form: still deterministic, still collision-free for distinct readable
forms (no readable form contains `~`: tenant ids, meter names and periods cannot).

A call that must be sent again under a NEW key (its first try is older than Stripe's
24-hour memory, or its key holds a stored error: see `journal.py`) gets generation `n`:
the readable form plus `#n`, again bounded. `#` appears in no readable form either.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Final

IDENTIFIER_MAX: Final = 100
IDEMPOTENCY_KEY_MAX: Final = 255
METADATA_KEY_MAX: Final = 40
METADATA_VALUE_MAX: Final = 500
METADATA_KEYS_MAX: Final = 50
_DIGEST_CHARS: Final = 64


def bounded(readable: str, limit: int) -> str:
    """`readable` if it fits in `limit` characters, else a prefix of it and its hash."""
    if len(readable) <= limit:
        return readable
    digest = hashlib.sha256(readable.encode()).hexdigest()
    return f"{readable[:limit - _DIGEST_CHARS - 1]}~{digest}"


def generation(readable: str, n: int) -> str:
    """The readable name of the `n`th new key of a call (0: the call's first key)."""
    return readable if n == 0 else f"{readable}#{n}"


def idempotency_key(readable: str, n: int = 0) -> str:
    """An `Idempotency-Key` (at most 255 characters) for generation `n` of a call."""
    return bounded(generation(readable, n), IDEMPOTENCY_KEY_MAX)


def period_tag(period_start: datetime) -> str:
    return period_start.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def meter_series(tenant: str, meter: str, period_start: datetime) -> str:
    """What the meter events of one tenant, meter and period share (the journal groups
    them by it)."""
    return f"{tenant}:{meter}:{period_tag(period_start)}"


def meter_event_identifier(tenant: str, meter: str, period_start: datetime, reading: str,
                           n: int = 0) -> str:
    """A meter event's `identifier` (at most 100 characters), also its idempotency key.

    `reading` names what the event reports within its period: for summed meters the
    cumulative total it brings Stripe to (`130`), for gauges the reading's position and
    value (`g3=5`, the third reading, 5), so a gauge returning to an earlier value is a
    new event. Tally's tenant ids and meter names contain no `~` or `#`, and the reading
    no `:`, so distinct (tenant, meter, period, reading, n) never share a readable form.
    """
    readable = f"{meter_series(tenant, meter, period_start)}:{reading}"
    return bounded(generation(readable, n), IDENTIFIER_MAX)


def metadata(values: dict[str, str]) -> dict[str, str]:
    """Metadata within Stripe's limits. Keys are Tally's own names (a longer one is a bug);
    a value over 500 characters is bounded like a name, so lookups compare the same form."""
    if len(values) > METADATA_KEYS_MAX:
        raise ValueError(f"Stripe metadata holds at most {METADATA_KEYS_MAX} keys")
    for key in values:
        if len(key) > METADATA_KEY_MAX:
            raise ValueError(f"Stripe metadata key {key!r} is over {METADATA_KEY_MAX} chars")
    return {key: bounded(value, METADATA_VALUE_MAX) for key, value in values.items()}
