"""Idempotency keys: the responses stored under them, replayed on a repeat.

A POST whose ``Idempotency-Key`` was seen before with the same method, path and
parameters replays the stored response with ``Idempotent-Replayed: true``; different
parameters give 400 ``idempotency_error``. Like Stripe, only requests that reached the
API method are stored — their 200s, their business 400s, and their 500s (a stored 500 is
replayed for as long as the key is remembered, so retrying with the same key cannot get
past it); requests refused earlier (authentication, unknown or missing parameters,
injected faults other than the stored ``stored_500`` kinds) are not, so the key stays
usable for a retry. A key is forgotten ``memory`` seconds (24 hours, as at Stripe) after
its first use, on the double's clock: the same key then runs the request again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from stripe_testkit.errors import JSON, ApiError, Response
from stripe_testkit.state import DAY

__all__ = ["ReplayStore", "fingerprint"]

# Stripe forgets idempotency keys after 24 hours; the double keeps the newest ones, so a
# long demo run holds bounded memory for them (every SDK POST carries a fresh key).
_MAX_REMEMBERED_KEYS: Final = 200_000


def fingerprint(method: str, path: str, params: JSON) -> str:
    """What a repeat must match to be replayed: method, path and parameters."""
    return json.dumps([method, path, params], sort_keys=True)


@dataclass
class _Replay:
    fingerprint: str
    response: Response
    stored_at: int


class ReplayStore:
    """The newest responses by idempotency key, oldest forgotten first.

    Not thread-safe by itself: :class:`~stripe_testkit.StripeDouble` looks a key up and
    stores its response with its one lock held, so two requests with one key never both
    run the handler.
    """

    def __init__(self, capacity: int = _MAX_REMEMBERED_KEYS, memory: int = DAY) -> None:
        self._capacity = capacity
        self._memory = memory
        self._replays: dict[str, _Replay] = {}

    def replay(self, key: str, fingerprint: str, now: int) -> Response | None:
        """The stored response for ``key``, marked replayed; None if the key is new or
        forgotten (first used ``memory`` seconds or more before ``now``).

        Raises the ``idempotency_error`` if the key was first used with other parameters.
        """
        replay = self._replays.get(key)
        if replay is not None and now - replay.stored_at >= self._memory:
            del self._replays[key]
            replay = None
        if replay is None:
            return None
        if replay.fingerprint != fingerprint:
            raise ApiError(
                400,
                "Keys for idempotent requests can only be used with the same "
                "parameters they were first used with. Try using a key other "
                f"than '{key}' if you meant to execute a different request.",
                type_="idempotency_error",
            )
        stored = replay.response
        return Response(
            stored.status,
            stored.body,
            {**stored.headers, "Idempotent-Replayed": "true", "Idempotency-Key": key},
        )

    def store(self, key: str, fingerprint: str, response: Response, now: int) -> None:
        """Remember ``response`` (a snapshot the caller no longer changes) under ``key``."""
        self._replays.pop(key, None)  # a forgotten key used again is the newest
        self._replays[key] = _Replay(fingerprint, response, now)
        if len(self._replays) > self._capacity:
            del self._replays[next(iter(self._replays))]  # dicts keep insertion order

    def clear(self) -> None:
        """Forget every key."""
        self._replays.clear()
