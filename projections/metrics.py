"""Prometheus metrics of the projector."""

from prometheus_client import Counter, Gauge, Histogram

ROWS = Counter("tally_projection_rows_total", "Ledger rows inserted (new events)")
RECORDS = Counter("tally_projection_records_total", "Records projected", ["topic"])
BATCH_RECORDS = Histogram(
    "tally_projection_batch_records", "Records per transaction",
    buckets=(1, 10, 100, 1000, 5000, 20000, 50000),
)
WRITE_SECONDS = Histogram(
    "tally_projection_write_seconds", "Duration of one projection transaction",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LAG_RECORDS = Gauge("tally_projection_lag_records", "Records behind the log end (clamped >= 0)",
                    ["topic", "partition"])
LAG_SECONDS = Gauge("tally_projection_lag_seconds", "Age of the last projected record",
                    ["topic"])
