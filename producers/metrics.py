"""Prometheus metrics of the producer SDK and the ingest gateway.

Module-level on purpose: prometheus_client refuses to register a metric name twice, so
two producers in one process share these collectors (their counts add up).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_RECORDED = Counter(
    "tally_producer_events_recorded_total", "Events accepted by the SDK", ["topic"]
)
EVENTS_SENT = Counter(
    "tally_producer_events_sent_total", "Events acknowledged by Kafka (acks=all)", ["topic"]
)
EVENTS_FAILED = Counter(
    "tally_producer_events_failed_total",
    "Events whose send failed (then spooled, or lost when there is no spool)",
    ["topic"],
)
EVENTS_SPOOLED = Counter(
    "tally_producer_events_spooled_total", "Events written to the local spool", ["topic"]
)
EVENTS_REPLAYED = Counter(
    "tally_producer_events_replayed_total", "Spooled events replayed to Kafka and acknowledged",
    ["topic"],
)
RECORDS_REJECTED = Counter(
    "tally_producer_spool_rejected_records_total",
    "Spooled records the broker refused for good, moved to the spool's rejected file",
)
BATCH_EVENTS = Histogram(
    "tally_producer_batch_events", "Events per batch record",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 5000),
)
BATCH_BYTES = Histogram(
    "tally_producer_batch_bytes", "Bytes per batch record value",
    buckets=(1e3, 1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6),
)
SEND_SECONDS = Histogram(
    "tally_producer_send_seconds", "From sealing a batch to its acknowledgement by Kafka",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
)
BUFFERED_EVENTS = Gauge(
    "tally_producer_buffered_events", "Events held in memory, not yet acknowledged or spooled"
)
SPOOLED_RECORDS = Gauge(
    "tally_producer_spooled_records", "Records waiting in local spools for replay"
)
SPOOLED_BYTES = Gauge(
    "tally_producer_spooled_bytes", "Bytes of the records waiting in local spools for replay"
)
CONNECTED = Gauge(
    "tally_producer_connected", "Producers currently connected to Kafka (sum over producers)"
)

GATEWAY_REQUESTS = Counter(
    "tally_gateway_requests_total", "Ingest gateway requests by path and status",
    ["path", "status"],
)
GATEWAY_EVENTS = Counter(
    "tally_gateway_events_total", "Events posted to the ingest gateway by outcome", ["outcome"]
)
