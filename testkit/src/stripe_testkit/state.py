"""The double's objects, and what a handler sees of one request."""

from __future__ import annotations

import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from stripe_testkit.errors import JSON

__all__ = ["DAY", "Call", "State", "new_id"]

DAY: Final = 86_400


class State:
    """Stripe's objects, by resource; the handlers in the resource modules change them.

    Not thread-safe by itself: :class:`~stripe_testkit.StripeDouble` calls every handler
    with its one lock held, so each request is atomic and requests are linearizable.
    """

    def __init__(self, memory: int = DAY) -> None:
        self.memory = memory
        """Seconds idempotency keys and meter event identifiers are remembered (Stripe:
        at least 24 hours, so a client may rely neither on remembering nor forgetting)."""
        self.customers: dict[str, JSON] = {}
        self.meters: dict[str, JSON] = {}
        self.meter_events: list[JSON] = []
        self.identifiers: dict[str, int] = {}  # identifier -> when its event was accepted
        self.invoice_items: dict[str, JSON] = {}
        self.invoices: dict[str, JSON] = {}
        self.prices: dict[str, JSON] = {}
        self.products: dict[str, JSON] = {}
        self.sessions: dict[str, float] = {}
        self.checkout_sessions: dict[str, JSON] = {}
        self.portal_sessions: dict[str, JSON] = {}
        self.rejected_meter_events: list[JSON] = []
        self.events: dict[str, JSON] = {}  # v2 (thin) events, as GET /v2/core/events/{id}
        self.outbox: list[JSON] = []  # thin event notifications not yet handed to delivery

    def identifier_seen(self, identifier: str, now: int) -> bool:
        """Was a meter event with ``identifier`` accepted within the memory window?"""
        seen = self.identifiers.get(identifier)
        if seen is not None and now - seen >= self.memory:
            del self.identifiers[identifier]
            return False
        return seen is not None


@dataclass(frozen=True)
class Call:
    """What a handler sees of one request."""

    params: JSON
    path: Mapping[str, str]
    now: int


def new_id(prefix: str) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "_" + "".join(secrets.choice(alphabet) for _ in range(24))
