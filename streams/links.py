"""Whether the notifier reaches what it depends on: the broker and (with tenants' channels)
Postgres. One `Links` per notifier: what saw a dependency fail calls `down`, what saw it
work calls `up`; the gauges, the reconnect counter and the readiness of `/healthz` follow.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

# The label values: a fixed set.
DEPENDENCIES = ("kafka", "postgres")

UP = Gauge("tally_notifier_up",
           "1 while the notifier reaches the dependency; 0 while it waits for it (at start,"
           " or after losing it: it retries with backoff and delivers nothing meanwhile)",
           ["dependency"])
RECONNECTS = Counter("tally_notifier_reconnects_total",
                     "Times the notifier reached a dependency again after failing to",
                     ["dependency"])


class Links:
    """The state of each dependency: up, or down with the last error."""

    def __init__(self, *names: str) -> None:
        unknown = set(names) - set(DEPENDENCIES)
        assert not unknown, f"not a notifier dependency: {unknown}"
        # None: up. A text: down, why. Nothing is up before it has been reached once.
        self._down: dict[str, str | None] = dict.fromkeys(names, "not reached yet")
        self._failed: set[str] = set()
        for name in names:
            UP.labels(name).set(0)

    def up(self, name: str) -> None:
        if self._down.get(name, None) is None:
            return
        if name in self._failed:
            RECONNECTS.labels(name).inc()
            log.warning("%s reached again; resuming", name)
            self._failed.discard(name)
        self._down[name] = None
        UP.labels(name).set(1)

    def down(self, name: str, error: str) -> None:
        if name not in self._down:
            return
        if name not in self._failed:
            log.warning("%s not reachable (%s): waiting for it, with backoff", name, error)
        self._failed.add(name)
        self._down[name] = error
        UP.labels(name).set(0)

    def is_up(self, name: str) -> bool:
        return self._down.get(name, None) is None

    @property
    def ready(self) -> bool:
        return all(why is None for why in self._down.values())

    def waiting_for(self) -> dict[str, str]:
        """Each dependency that is down, with why."""
        return {name: why for name, why in self._down.items() if why is not None}
