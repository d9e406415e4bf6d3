"""v2 (thin) events: meter error reports, ``GET /v2/core/events/{id}``.

Stripe validates v1 meter events and v2 stream events asynchronously: a request is
accepted, and an event that fails validation later is dropped and reported by a thin
event — ``v1.billing.meter.error_report_triggered`` (its ``related_object`` the meter),
or ``v1.billing.meter.no_meter_found`` when no active meter has the event name. The
notification an event destination receives carries no data; the receiver fetches the
event (``GET /v2/core/events/{id}``) for ``data.reason``: per error code, the count and
sample errors naming each rejected request's ``identifier``.

The double reports each request's rejected events in one event per meter (Stripe
aggregates over a window and samples; the double lists every rejected event as a sample),
and queues its notification in :attr:`State.outbox` for the server to deliver.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Final

from stripe_testkit.errors import JSON, ApiError
from stripe_testkit.state import Call, State, new_id

__all__ = ["ERROR_REPORT", "NO_METER_FOUND", "Rejection", "report_rejections", "retrieve_event"]

ERROR_REPORT: Final = "v1.billing.meter.error_report_triggered"
NO_METER_FOUND: Final = "v1.billing.meter.no_meter_found"

Rejection = tuple[str | None, str, str, str]
"""One rejected meter event: (meter id or None, error code, message, identifier)."""


def rfc3339(epoch: float) -> str:
    stamp = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def report_rejections(state: State, rejections: list[Rejection], now: int) -> None:
    """Record the thin events reporting ``rejections`` and queue their notifications."""
    by_meter: dict[str | None, list[Rejection]] = defaultdict(list)
    for rejection in rejections:
        by_meter[rejection[0]].append(rejection)
    for meter_id, rejected in by_meter.items():
        by_code: dict[str, list[Rejection]] = defaultdict(list)
        for rejection in rejected:
            by_code[rejection[1]].append(rejection)
        notification: JSON = {
            "id": new_id("evt_test"),
            "object": "v2.core.event",
            "type": ERROR_REPORT if meter_id else NO_METER_FOUND,
            "livemode": False,
            "created": rfc3339(now),
            "context": None,
        }
        if meter_id:
            notification["related_object"] = {
                "id": meter_id,
                "type": "billing.meter",
                "url": f"/v1/billing/meters/{meter_id}",
            }
        codes = ", ".join(sorted(by_code))
        event: JSON = {
            **notification,
            "reason": None,
            "data": {
                "developer_message_summary": f"{len(rejected)} meter event(s) failed "
                f"validation: {codes}",
                "validation_start": rfc3339(now),
                "validation_end": rfc3339(now + 1),
                "reason": {
                    "error_count": len(rejected),
                    "error_types": [
                        {
                            "code": code,
                            "error_count": len(items),
                            "sample_errors": [
                                {"error_message": message, "request": {"identifier": identifier}}
                                for _, _, message, identifier in items
                            ],
                        }
                        for code, items in sorted(by_code.items())
                    ],
                },
            },
        }
        state.events[event["id"]] = event
        state.outbox.append(notification)


def retrieve_event(state: State, call: Call) -> JSON:
    event = state.events.get(call.path["id"])
    if event is None:
        raise ApiError(404, f"No such event: '{call.path['id']}'", code="resource_missing",
                       param="id")
    return event
