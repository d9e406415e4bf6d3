"""Prometheus metrics of the worker."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("tally_worker_events_total", "Usage events by outcome", ["outcome"])
DEAD_LETTERS = Counter("tally_worker_dead_letters_total", "Records sent to the DLQ", ["reason"])
RECORDS = Counter("tally_worker_records_total", "Source records processed", ["topic"])
BATCH_RECORDS = Histogram(
    "tally_worker_batch_records", "Records per processed micro-batch",
    buckets=(1, 10, 50, 100, 500, 1000, 5000),
)
BATCH_SECONDS = Histogram(
    "tally_worker_batch_seconds", "Time to process one micro-batch and encode its effects",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
DEDUP_IDS = Gauge("tally_worker_dedup_ids", "Event ids held in the dedup window", ["partition"])
RECOVERY_SECONDS = Histogram("tally_worker_recovery_seconds", "Time to restore a partition")
PREBATCH_RECORDS = Counter("tally_worker_prebatch_records_total",
                           "tally.usage records repacked into frames")
PREBATCH_CHECKED = Counter(
    "tally_worker_prebatch_checked_total",
    "tally.usage records the pre-batching stage checked into rows (the agent reads the rest "
    "itself, which costs its core more)",
)
PREBATCH_FRAMES = Counter("tally_worker_prebatch_frames_total", "Frames written")
CATALOG_PLANS = Gauge("tally_worker_catalog_plans", "Plans in the catalog the worker uses")
OFFSETS_OUTSIDE_LOG = Counter(
    "tally_worker_offsets_outside_log_total",
    "Times the worker found a log it had read lost by the broker (restarted empty, topic "
    "recreated) and started again from what the broker holds (streams/log_watch.py)",
)
RESTARTS = Counter("tally_worker_restarts_total",
                   "Restarts of the worker in place, by reason (log_lost, broker_error, stalled)",
                   ["reason"])
