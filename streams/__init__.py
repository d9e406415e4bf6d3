"""The stream processor: dedup, aggregation, quota evaluation, DLQ; and the QuotaView client."""
