"""Fault injection: which API requests fail, how, and the errors they fail with.

Most faults are decided before a request has any effect: nothing is stored and its
idempotency key is not consumed, so a retry with the same key is safe. The exceptions:

- ``timeout``, a lost response: the request takes effect (and its key is stored), then
  the answer is held back ``FaultPlan.timeout`` seconds, past the client's timeout, so
  the client must retry with the same key to learn what happened;
- ``stored_500``: the request reaches the API method, which fails with a 500 before any
  effect; Stripe stores that 500 under the idempotency key, and so does the double, so
  every retry with the same key gets the same 500 until the key is forgotten;
- ``stored_500_applied``: the same, except the request took effect before the 500 — the
  client cannot tell the two apart and must look up what Stripe has.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from stripe_testkit.errors import ApiError

__all__ = ["FAULT_KINDS", "STORED_KINDS", "FaultInjector", "FaultPlan", "fault_error"]

FAULT_KINDS: Final = frozenset(
    {"429", "lock_timeout", "500", "timeout", "stored_500", "stored_500_applied"}
)
"""Injectable faults: a rate-limit 429, a lock-timeout 429 (retryable), a 500 before the
API method, a response lost after the request took effect (``timeout``), and a 500 stored
under the idempotency key without or after the effect (``stored_500``,
``stored_500_applied``)."""
STORED_KINDS: Final = frozenset({"stored_500", "stored_500_applied"})


@dataclass(frozen=True)
class FaultPlan:
    """Which requests fail, and how: each API request (to ``routes``, when given) fails
    with probability ``rate``, with a kind drawn from ``kinds``, up to ``limit`` faults;
    every API request first waits ``delay`` seconds. A seeded plan fails the same
    requests in the same order on every run."""

    rate: float = 0.0
    kinds: tuple[str, ...] = ("429", "500")
    seed: int | None = None
    delay: float = 0.0
    timeout: float = 2.0  # how long a `timeout` fault holds the response back
    routes: tuple[str, ...] = ()
    """Only requests to these routes (``"POST /v1/invoiceitems"``) may fail; () = all."""
    limit: int | None = None
    """At most this many faults from this plan (None: no limit)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate must be within [0, 1], got {self.rate}")
        if not self.kinds or not set(self.kinds) <= FAULT_KINDS:
            raise ValueError(
                f"fault kinds must be a non-empty subset of {sorted(FAULT_KINDS)}, got {self.kinds}"
            )
        if self.delay < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay}")


def fault_error(kind: str) -> ApiError:
    if kind == "lock_timeout":
        # Stripe asks clients to retry lock timeouts, and the SDK obeys the header.
        return ApiError(
            429,
            "This object cannot be accessed right now because another API "
            "request or Stripe process is currently accessing it.",
            code="lock_timeout",
            should_retry=True,
        )
    if kind == "429":
        # A rate limit is not retried by the SDK (it would add to the contention); the
        # caller must back off. Stripe answers `rate_limit` under invalid_request_error.
        return ApiError(
            429,
            "Request rate limit exceeded. (injected by the Stripe double)",
            code="rate_limit",
            should_retry=False,
        )
    if kind in STORED_KINDS:
        return ApiError(
            500,
            "An unknown error occurred while processing the request "
            "(injected by the Stripe double; stored under the idempotency key).",
            type_="api_error",
        )
    # The fault happened before any effect, so a retry with the same key is safe.
    return ApiError(
        500,
        "An unknown error occurred (injected by the Stripe double).",
        type_="api_error",
        should_retry=True,
    )


class FaultInjector:
    """Draws the faults of the current plan, and counts them.

    Not thread-safe by itself: :class:`~stripe_testkit.StripeDouble` draws with its lock
    held. A new plan restarts the random sequence from the plan's seed.
    """

    def __init__(self) -> None:
        self.plan = FaultPlan()
        self.injected = 0
        self._from_plan = 0
        self._rng = random.Random()

    def use(self, plan: FaultPlan) -> None:
        """Fail requests by ``plan`` from now on; the count of faults so far is kept."""
        self.plan = plan
        self._from_plan = 0
        self._rng = random.Random(plan.seed)

    def draw(self, route: str = "") -> str | None:
        """The kind of fault for the next API request (to ``route``), or None if it goes
        through."""
        plan = self.plan
        if plan.routes and route not in plan.routes:
            return None
        if plan.limit is not None and self._from_plan >= plan.limit:
            return None
        if plan.rate and self._rng.random() < plan.rate:
            self.injected += 1
            self._from_plan += 1
            return self._rng.choice(plan.kinds)
        return None
