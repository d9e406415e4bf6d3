"""The producer SDK services import, and the HTTP ingest gateway.

    from producers import ProducerOptions, UsageProducer

See `producers.sdk` for the delivery guarantees and `producers.gateway` for the HTTP API.
"""

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
from producers.sdk import (
    ProducerOptions,
    SyncUsageProducer,
    UsageProducer,
    build_subscription_event,
    build_usage_event,
    new_event_id,
    uuid7,
)

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
    "SyncUsageProducer",
    "UsageProducer",
    "build_subscription_event",
    "build_usage_event",
    "new_event_id",
    "uuid7",
]
