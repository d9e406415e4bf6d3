"""Waiting out a dependency that is down (Postgres, the broker): exponential backoff with
jitter, cut short by a stop request.

Long-running services (projector, notifier, worker) wait for what they need at start and
after losing it, instead of exiting; commands a person runs by hand still fail fast with a
one-line message (`runtime.commands.explain`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random


class Backoff:
    """Delays of `first`, 2*first, 4*first ... up to `longest`, each with "equal jitter"
    (half fixed, half random) so that many services retrying at once do not hit a
    recovering server in step. `reset()` after a success starts again from `first`."""

    def __init__(self, first: float = 0.5, longest: float = 30.0,
                 rng: random.Random | None = None) -> None:
        self.first = first
        self.longest = longest
        self.failures = 0
        self._rng = rng or random.Random()

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        """The wait after one more failure."""
        self.failures += 1
        ceiling = min(self.longest, self.first * 2.0 ** (self.failures - 1))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    async def sleep(self, stopping: asyncio.Event, delay: float | None = None) -> bool:
        """Wait `delay` (default: the next delay); False when `stopping` was set meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(),
                                   self.next_delay() if delay is None else delay)
        return not stopping.is_set()


def first_line(error: BaseException) -> str:
    """An error as one short line for a log (drivers' messages run over several)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
