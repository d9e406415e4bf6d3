"""Prometheus metrics of the projector."""

from prometheus_client import Counter, Gauge, Histogram

ROWS = Counter("tally_projection_rows_total", "Ledger rows inserted (new events)")
RECORDS = Counter("tally_projection_records_total", "Records projected", ["topic"])
ERRORS = Counter(
    "tally_projection_errors_total",
    "Records (or events of batch records) reported to tally.projection_errors, not applied",
    ["topic", "reason"],
)
FENCED = Counter(
    "tally_projection_fenced_total",
    "Batches discarded because the stored offsets moved under the projector (a rebuild swap"
    " or a second projector); it re-seeks to the stored offsets",
)
BATCH_RECORDS = Histogram(
    "tally_projection_batch_records", "Records per transaction",
    buckets=(1, 10, 100, 1000, 5000, 20000, 50000),
)
BATCH_EVENTS = Histogram(
    "tally_projection_batch_events", "Accepted events per transaction",
    buckets=(1, 10, 100, 1000, 10000, 50000, 100000, 500000),
)
WRITE_SECONDS = Histogram(
    "tally_projection_write_seconds", "Duration of one projection transaction",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LAG_RECORDS = Gauge("tally_projection_lag_records",
                    "Records still to read: log end offset - the consumer's position, never"
                    " negative; the whole log when the position lies outside it (after a log"
                    " loss). Measured every 2 s, fetching or not (projections/lag.py)",
                    ["topic", "partition"])
LAG_SECONDS = Gauge("tally_projection_lag_seconds",
                    "Age of the last projected record (0 when caught up)", ["topic"])
UP = Gauge("tally_projector_up",
           "1 while the projector holds a Postgres connection and projects; 0 while it"
           " waits for Postgres or the broker (at start, or after losing Postgres: it"
           " retries with backoff, resuming from the offsets in Postgres)")
RECONNECTS = Counter("tally_projector_reconnects_total",
                     "Failed attempts to reach a dependency (postgres, kafka), each followed"
                     " by a backoff: at start before it is up, or after losing it",
                     ["dependency"])
OFFSETS_OUTSIDE_LOG = Counter(
    "tally_projection_offsets_outside_log_total",
    "Partitions whose stored offset lay outside the log (past its end: the broker lost"
    " records or the topic was recreated; before its start: retention); the projector"
    " resets them to the log start and goes on",
    ["topic", "partition"],
)
