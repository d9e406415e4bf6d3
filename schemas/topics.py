"""The one place that knows topic names and their cleanup policies (DESIGN.md, Topics)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "tally."


@dataclass(frozen=True)
class TopicSpec:
    """A topic Tally owns: its name below the prefix and how the broker keeps it."""

    suffix: str
    compacted: bool
    # None keeps the broker's default retention; -1 keeps records forever.
    retention_ms: int | None

    def name(self, prefix: str) -> str:
        return f"{prefix}{self.suffix}"

    def configs(self) -> dict[str, str]:
        configs = {"cleanup.policy": "compact" if self.compacted else "delete"}
        if self.retention_ms is not None:
            configs["retention.ms"] = str(self.retention_ms)
        return configs


_YEAR_MS = 400 * 24 * 3600 * 1000
_MONTH_MS = 31 * 24 * 3600 * 1000

USAGE = TopicSpec("usage", compacted=False, retention_ms=_YEAR_MS)
SUBSCRIPTIONS = TopicSpec("subscriptions", compacted=False, retention_ms=-1)
PLANS = TopicSpec("plans", compacted=True, retention_ms=-1)
COUNTERS = TopicSpec("counters", compacted=True, retention_ms=-1)
QUOTA_STATE = TopicSpec("quota-state", compacted=True, retention_ms=-1)
USAGE_ACCEPTED = TopicSpec("usage.accepted", compacted=False, retention_ms=_YEAR_MS)
USAGE_DLQ = TopicSpec("usage.dlq", compacted=False, retention_ms=_MONTH_MS)
NOTIFICATIONS = TopicSpec("notifications", compacted=False, retention_ms=_MONTH_MS)
# Internal: tally.usage and tally.subscriptions records repacked into frames by the
# worker's pre-batching stage (streams/prebatch.py), each on its tenant's owner partition.
# Kept as long as tally.usage: a stopped worker must find them.
USAGE_BATCHED = TopicSpec("usage.batched", compacted=False, retention_ms=_YEAR_MS)
# Internal: the worker's changelog (counters with applied offsets, dedup windows,
# subscription state), partition-aligned with tally.usage.batched. Not for services to read.
WORKER_STATE = TopicSpec("worker-state", compacted=True, retention_ms=-1)

ALL = (
    USAGE,
    SUBSCRIPTIONS,
    PLANS,
    COUNTERS,
    QUOTA_STATE,
    USAGE_ACCEPTED,
    USAGE_DLQ,
    NOTIFICATIONS,
    USAGE_BATCHED,
    WORKER_STATE,
)


@dataclass(frozen=True)
class Topics:
    """Resolved topic names for one prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def usage(self) -> str:
        return USAGE.name(self.prefix)

    @property
    def subscriptions(self) -> str:
        return SUBSCRIPTIONS.name(self.prefix)

    @property
    def plans(self) -> str:
        return PLANS.name(self.prefix)

    @property
    def counters(self) -> str:
        return COUNTERS.name(self.prefix)

    @property
    def quota_state(self) -> str:
        return QUOTA_STATE.name(self.prefix)

    @property
    def usage_accepted(self) -> str:
        return USAGE_ACCEPTED.name(self.prefix)

    @property
    def usage_dlq(self) -> str:
        return USAGE_DLQ.name(self.prefix)

    @property
    def notifications(self) -> str:
        return NOTIFICATIONS.name(self.prefix)

    @property
    def usage_batched(self) -> str:
        return USAGE_BATCHED.name(self.prefix)

    @property
    def worker_state(self) -> str:
        return WORKER_STATE.name(self.prefix)
