"""What the projector keeps for billing, in the caller's (the batch's) transaction.

- The subscription history (`subscription_events`): every `tally.subscription.*` event
  with its Kafka record timestamp and log position. Invoices are derived from the whole
  history (docs/billing.md, rule 1), and the record timestamp tells an event that arrived
  after an invoice it affects was issued. Keyed by (tenant, event id), first write wins:
  a redelivery adds nothing and a replay of the log gives the same rows.
- The ledger's ingestion watermark (`ingestion_watermarks`): per partition of the accepted
  topic, the greatest `ingested_at` projected. Written with the rows and offsets it covers,
  so it never claims more than the ledger holds; it only moves forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import NamedTuple

from psycopg.types.json import Jsonb

from projections.ledger import Accepted
from runtime.postgres import Connection
from schemas.events import SubscriptionEvent


class HistoryRow(NamedTuple):
    """One subscription event as `subscription_events` stores it."""

    tenant_id: str
    event_id: str
    type: str
    source: str
    event_time: datetime
    data: Jsonb
    record_timestamp: datetime
    topic: str
    partition: int
    offset: int
    item: int


def history_row(event: SubscriptionEvent, record_timestamp: datetime, topic: str,
                partition: int, offset: int, item: int) -> HistoryRow:
    """The stored form of an event read at (topic, partition, offset), item `item`."""
    return HistoryRow(event.subject, event.id, event.type, event.source, event.time,
                      Jsonb(event.data.model_dump(mode="json", exclude_none=True)),
                      record_timestamp, topic, partition, offset, item)


def write_history(conn: Connection, rows: Sequence[HistoryRow], schema: str = "tally") -> None:
    """Store the events not stored yet (by tenant and event id)."""
    if not rows:
        return
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {schema}.subscription_events (tenant_id, event_id, type, source,"
            ' event_time, data, record_timestamp, topic, partition, "offset", item)'
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
            rows,
        )


def ingested_through(
    accepted: Iterable[tuple[str, int, Iterable[Accepted]]],
) -> dict[tuple[str, int], datetime]:
    """Per (topic, partition), the greatest ingestion time among the events given as
    (topic, partition, events of one record)."""
    marks: dict[tuple[str, int], datetime] = {}
    for topic, partition, events in accepted:
        for event in events:
            key = (topic, partition)
            if key not in marks or event.ingested_at > marks[key]:
                marks[key] = event.ingested_at
    return marks


def write_watermarks(conn: Connection, projection: str,
                     marks: dict[tuple[str, int], datetime], schema: str = "tally") -> None:
    """Move each partition's ingestion watermark forward (never back: a replayed suffix
    of the log after a rebuild swap carries older times)."""
    if not marks:
        return
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {schema}.ingestion_watermarks AS w (projection, topic, partition,"
            " ingested_through) VALUES (%s,%s,%s,%s)"
            " ON CONFLICT (projection, topic, partition) DO UPDATE SET"
            " ingested_through = greatest(w.ingested_through, excluded.ingested_through)",
            [(projection, topic, partition, at) for (topic, partition), at in marks.items()],
        )
