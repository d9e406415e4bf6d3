"""The producer SDK services import, and the HTTP ingest gateway.

    from producers import ProducerOptions, UsageProducer

This package's namespace is the SDK's public API. Its modules: `producers.producer` (the
async `UsageProducer` and its delivery guarantees), `producers.sync` (the blocking facade),
`producers.options`, `producers.encoding` (validation and the wire form), `producers.ids`
(UUIDv7 event ids), `producers.batching` and `producers.delivery` (the producer's two
halves), `producers.spool`; `producers.gateway` is the HTTP API.
"""

from producers.encoding import (
    SubscriptionKind,
    TallyEvent,
    build_subscription_event,
    build_usage_event,
)
from producers.errors import (
    DeliveryError,
    InvalidEventError,
    PayloadTooLargeError,
    Problem,
    ProducerClosedError,
    ProducerError,
    ProducerUnavailableError,
    SpoolError,
    SpoolFullError,
)
from producers.ids import new_event_id, uuid7
from producers.options import ProducerOptions
from producers.producer import UsageProducer
from producers.sync import SyncUsageProducer

__all__ = [
    "DeliveryError",
    "InvalidEventError",
    "PayloadTooLargeError",
    "Problem",
    "ProducerClosedError",
    "ProducerError",
    "ProducerOptions",
    "ProducerUnavailableError",
    "SpoolError",
    "SpoolFullError",
    "SubscriptionKind",
    "SyncUsageProducer",
    "TallyEvent",
    "UsageProducer",
    "build_subscription_event",
    "build_usage_event",
    "new_event_id",
    "uuid7",
]
