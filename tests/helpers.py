"""Builders shared by tests: events in the documented wire format."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson


def usage(tenant: str, meter: str = "api_calls", quantity: Any = "1", *,
          event_id: str | None = None, time: datetime | None = None,
          dimensions: dict[str, str] | None = None, source: str = "svc/test") -> dict[str, Any]:
    """A usage event as a plain dict, exactly as DESIGN.md shows it."""
    return {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": "tally.usage.v1",
        "subject": tenant,
        "time": (time or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": {"meter": meter, "quantity": quantity, "dimensions": dimensions or {}},
    }


def subscription(tenant: str, kind: str, plan_id: str, start: datetime, end: datetime, *,
                 time: datetime | None = None, **extra: Any) -> dict[str, Any]:
    data = {"plan_id": plan_id, "period_start": start.isoformat(),
            "period_end": end.isoformat(), **extra}
    for k, v in list(data.items()):
        if isinstance(v, datetime):
            data[k] = v.isoformat()
    return {
        "specversion": "1.0", "id": str(uuid.uuid4()), "source": "svc/billing",
        "type": f"tally.subscription.{kind}.v1", "subject": tenant,
        "time": (time or start).isoformat(), "data": data,
    }


def record(*events: dict[str, Any]) -> bytes:
    """A batch record value (or a single-event value for one event)."""
    if len(events) == 1:
        return orjson.dumps(events[0])
    return orjson.dumps(list(events))


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def accepted_events(effects: Any, tenant: str) -> list[dict[str, Any]]:
    """The accepted events a processor's drain produced for `tenant`, decoded."""
    return [event for array in effects.accepted[tenant] for event in orjson.loads(array)]
