"""Builders and probes shared by the projection tests.

The projector's input contract is `tally.usage.accepted`: key = tenant, value = a JSON
array of AcceptedEvent. Tests write those records directly, as the worker does, and
compute what the tables must hold with the worker's own counter (domain.aggregation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from domain.aggregation import Counter
from runtime.settings import Settings
from schemas.codec import dumps
from schemas.records import AcceptedEvent
from tests.kafka_helpers import publish, wait_for

PERIOD_START = datetime(2026, 11, 1, tzinfo=UTC)
PERIOD_END = datetime(2026, 12, 1, tzinfo=UTC)

# One meter per aggregation, as a catalog would declare them.
AGGREGATION_OF = {
    "api_calls": "sum",
    "executions": "count",
    "storage_mb": "max",
    "seats": "unique_count",
    "gpu_temp": "latest",
}


def accepted(tenant: str, event_id: str, meter: str = "api_calls", quantity: Any = "1", *,
             at: datetime | None = None, unique_value: str | None = None,
             plan_id: str = "starter", **extra: Any) -> AcceptedEvent:
    """An accepted event as the worker writes it (period = November 2026)."""
    at = at or PERIOD_START + timedelta(days=3)
    aggregation = AGGREGATION_OF.get(meter, "sum")
    if aggregation == "unique_count" and unique_value is None:
        unique_value = f"user-{int(Decimal(quantity))}"
    return AcceptedEvent(
        tenant_id=tenant, event_id=event_id, meter=meter, aggregation=aggregation,
        unique_value=unique_value, quantity=Decimal(quantity), event_time=at,
        ingested_at=at + timedelta(seconds=1), period_start=PERIOD_START,
        period_end=PERIOD_END, plan_id=plan_id,
        **{"source": "svc/test", "dimensions": {"region": "eu"}, **extra},
    )


def publish_accepted(settings: Settings, batches: Iterable[Sequence[AcceptedEvent]]) -> None:
    """One batch record per sequence, keyed by its tenant (all events share it)."""
    publish(settings, settings.topics.usage_accepted,
            [(batch[0].tenant_id, dumps(list(batch))) for batch in batches])


def expected_by_period(log: Iterable[AcceptedEvent]) -> dict[tuple[str, str], tuple[Any, int]]:
    """(tenant, meter) -> (quantity, event_count) per the worker's counter, folding each
    (tenant, event id) once, in log order."""
    counters: dict[tuple[str, str], Counter] = {}
    seen: set[tuple[str, str]] = set()
    for e in log:
        if (e.tenant_id, e.event_id) in seen:
            continue
        seen.add((e.tenant_id, e.event_id))
        c = counters.setdefault((e.tenant_id, e.meter), Counter(
            e.tenant_id, e.meter, e.period_start, e.period_end, e.aggregation))  # type: ignore[arg-type]
        c.fold(e.quantity, e.unique_value, e.event_time)
    return {k: (c.value, c.event_count) for k, c in counters.items()}


def query(url: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def by_period(url: str) -> dict[tuple[str, str], tuple[Any, int]]:
    return {(t, m): (q, n) for t, m, q, n in query(
        url, "SELECT tenant_id, meter, quantity, event_count FROM tally.usage_by_period")}


def ledger_count(url: str) -> int:
    return int(query(url, "SELECT count(*) FROM tally.usage_events")[0][0])


def wait_for_ledger(url: str, rows: int, timeout: float = 60) -> None:
    wait_for(lambda: ledger_count(url), lambda n: n >= rows, timeout=timeout,
             what=f"{rows} ledger rows")


def wait_for_offsets(url: str, topic: str, records: int, timeout: float = 60) -> None:
    """Until the projector has committed past `records` records of `topic` in total."""
    sql = ("SELECT coalesce(sum(next_offset), 0) FROM tally.projection_offsets"
           " WHERE projection = 'read_models' AND topic = %s")
    wait_for(lambda: int(query(url, sql, (topic,))[0][0]), lambda n: n >= records,
             timeout=timeout, what=f"offsets past {records} records of {topic}")


