"""Meter error reports: Stripe's late rejections of meter events, into the journal.

Stripe checks v1 meter events and v2 stream events asynchronously: a request is accepted
(and journaled `succeeded`), and an event that fails the checks later (unknown customer,
a meter archived since, a bad value or timestamp) is dropped and reported by a thin
event, `v1.billing.meter.error_report_triggered` (or `v1.billing.meter.no_meter_found`),
delivered to an event destination: `POST /stripe/events` (`webhooks.py`). Its data —
fetched from Stripe by event id, as thin events carry none — counts the errors per code
and samples them, each sample naming the rejected request's `identifier`, which is the
journal key of Tally's meter event.

Each sampled rejection turns its journal row `failed`, with Stripe's code and message,
and spends its key (`journal.record_rejection`): `tally jobs journal` lists it, the
`tally_billing_meter_event_rejections_total` metric counts it, and the next push-usage
run looks up the period's summary and sends what is missing under a new identifier.
Errors a report counts but does not sample cannot be tied to an event: they are journaled
as one failed `meter_error_report` row naming the report, so they show too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from billing_jobs import journal
from runtime.postgres import Connection

EVENT_TYPES: Final = ("v1.billing.meter.error_report_triggered",
                      "v1.billing.meter.no_meter_found")


@dataclass(frozen=True)
class Recorded:
    """What a report changed: rejected events journaled (Tally's or not), unsampled
    errors."""

    tallys: int
    foreign: int
    unsampled: int

    def outcome(self) -> str:
        return (f"meter errors: {self.tallys} journaled, {self.foreign} unknown identifiers,"
                f" {self.unsampled} unsampled")


def record_report(conn: Connection, event_id: str, event: dict[str, Any]) -> Recorded:
    """Journal one fetched meter error report (`event` as Stripe's v2 event JSON)."""
    data = event.get("data") or {}
    reason = data.get("reason") or {}
    meter = (event.get("related_object") or {}).get("id", "")
    tallys = foreign = sampled = 0
    for error_type in reason.get("error_types") or []:
        code = str(error_type.get("code", "unknown"))
        for sample in error_type.get("sample_errors") or []:
            identifier = str((sample.get("request") or {}).get("identifier", ""))
            if not identifier:
                continue
            sampled += 1
            if journal.record_rejection(conn, identifier=identifier, code=code,
                                        message=str(sample.get("error_message", "")),
                                        report=event_id):
                tallys += 1
            else:
                foreign += 1
    unsampled = max(0, int(reason.get("error_count") or 0) - sampled)
    if unsampled:
        journal.record_failure(
            conn, key=f"stripe-meter-error-report-{event_id}", kind="meter_error_report",
            tenant_id="*", summary={"event": event_id, "meter": meter},
            error=f"{unsampled} meter event(s) rejected by Stripe without a sample: "
                  f"{data.get('developer_message_summary', '')}",
            reason="meter_error_report")
    return Recorded(tallys, foreign, unsampled)
