"""Meters, meter events and their summaries (``/v1/billing/meters``,
``/v1/billing/meter_events``), and the v2 meter event session and stream.

A meter event identifier is unique within the double's memory window (Stripe: a
rolling window of at least 24 hours; the double forgets it after exactly ``memory``
seconds on its clock, 24 hours by default); a repeat within it is refused and not
stored, so summaries never double count. Everything else about a meter event — meter,
customer, value, timestamp — is checked asynchronously, as at Stripe: the request
succeeds and an invalid event is dropped and reported by a thin event
(:mod:`stripe_testkit.events`).
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from stripe_testkit.customers import find_customer
from stripe_testkit.errors import JSON, ApiError, missing, no_such
from stripe_testkit.events import Rejection, report_rejections, rfc3339
from stripe_testkit.params import get_dict, get_enum, get_int, get_str, page
from stripe_testkit.state import DAY, Call, State, new_id

__all__ = [
    "accept_meter_event",
    "create_meter",
    "create_meter_event",
    "create_meter_event_session",
    "create_meter_event_stream",
    "find_meter",
    "list_event_summaries",
    "list_meters",
    "retrieve_meter",
]

_METER_EVENT_MAX_AGE: Final = 35 * DAY
_METER_EVENT_MAX_SKEW: Final = 5 * 60
_SESSION_LIFETIME: Final = 15 * 60
_STREAM_MAX_EVENTS: Final = 100


# ------------------------------------------------------------ meters and meter events


def create_meter(state: State, call: Call) -> JSON:
    params = call.params
    event_name = get_str(params, "event_name", required=True)
    aggregation = get_dict(params, "default_aggregation") or {}
    formula = get_enum(aggregation, "formula", ("sum", "count", "last"), "")
    if not formula:
        raise missing("default_aggregation[formula]")
    mapping = get_dict(params, "customer_mapping") or {}
    value_settings = get_dict(params, "value_settings") or {}
    if any(
        m["event_name"] == event_name and m["status"] == "active" for m in state.meters.values()
    ):
        raise ApiError(
            400,
            f"An active meter with event_name '{event_name}' already exists.",
            code="resource_already_exists",
            param="event_name",
        )
    meter: JSON = {
        "id": new_id("mtr_test"),
        "object": "billing.meter",
        "created": call.now,
        "customer_mapping": {
            "event_payload_key": get_str(mapping, "event_payload_key") or "stripe_customer_id",
            "type": get_enum(mapping, "type", ("by_id",), "by_id"),
        },
        "default_aggregation": {"formula": formula},
        "display_name": get_str(params, "display_name", required=True),
        "event_name": event_name,
        "event_time_window": get_str(params, "event_time_window"),
        "livemode": False,
        "status": "active",
        "status_transitions": {"deactivated_at": None},
        "updated": call.now,
        "value_settings": {
            "event_payload_key": get_str(value_settings, "event_payload_key") or "value",
        },
    }
    state.meters[meter["id"]] = meter
    return meter


def retrieve_meter(state: State, call: Call) -> JSON:
    return find_meter(state, call.path["id"])


def list_meters(state: State, call: Call) -> JSON:
    status = get_str(call.params, "status")
    found = [
        m for m in reversed(state.meters.values()) if status is None or m["status"] == status
    ]
    return page(found, call.params, "/v1/billing/meters")


def find_meter(state: State, meter_id: str) -> JSON:
    meter = state.meters.get(meter_id)
    if meter is None:
        raise no_such("billing meter", meter_id, "id", 404)
    return meter


def create_meter_event(state: State, call: Call) -> JSON:
    params = call.params
    timestamp = get_int(params, "timestamp")
    event, rejection = accept_meter_event(
        state,
        event_name=get_str(params, "event_name", required=True) or "",
        payload=get_dict(params, "payload") or {},
        identifier=get_str(params, "identifier"),
        timestamp=call.now if timestamp is None else timestamp,
        now=call.now,
    )
    if rejection is not None:
        report_rejections(state, [rejection], call.now)
    return event


def accept_meter_event(
    state: State,
    *,
    event_name: str,
    payload: JSON,
    identifier: str | None,
    timestamp: int,
    now: int,
) -> tuple[JSON, Rejection | None]:
    """Take one meter event, as the v1 endpoint and the v2 stream do.

    Synchronously, only a repeated identifier is refused (400). Everything else Stripe
    checks asynchronously: an invalid event is accepted, then dropped — kept in
    :attr:`State.rejected_meter_events` — and returned as a rejection for the caller to
    report (:func:`~stripe_testkit.events.report_rejections`).
    """
    identifier = identifier or new_id("evt_ident")
    if state.identifier_seen(identifier, now):
        raise ApiError(
            400,
            f"An event already exists with identifier {identifier}.",
            code="resource_already_exists",
            param="identifier",
            should_retry=False,
        )
    event: JSON = {
        "object": "billing.meter_event",
        "created": now,
        "event_name": event_name,
        "identifier": identifier,
        "livemode": False,
        "payload": {key: str(value) for key, value in payload.items()},
        "timestamp": timestamp,
    }
    meter = next(
        (
            m
            for m in state.meters.values()
            if m["event_name"] == event_name and m["status"] == "active"
        ),
        None,
    )
    invalid = _invalid(state, meter, event_name, payload, timestamp, now)
    if invalid is not None:
        code, message = invalid
        state.rejected_meter_events.append({"event": event, "code": code, "message": message})
        return event, (meter["id"] if meter else None, code, message, identifier)
    state.identifiers[identifier] = now
    state.meter_events.append(event)
    return event, None


def _invalid(
    state: State, meter: JSON | None, event_name: str, payload: JSON, timestamp: int, now: int
) -> tuple[str, str] | None:
    """Stripe's asynchronous checks of one meter event: (error-report code, message)."""
    if meter is None:
        return "no_meter", f"No active meter was found with event_name '{event_name}'."
    if timestamp < now - _METER_EVENT_MAX_AGE:
        return "timestamp_too_far_in_past", "Timestamp must be within the past 35 calendar days."
    if timestamp > now + _METER_EVENT_MAX_SKEW:
        return "timestamp_in_future", "Timestamp must not be more than 5 minutes in the future."
    customer_key = meter["customer_mapping"]["event_payload_key"]
    customer_id = payload.get(customer_key)
    if not isinstance(customer_id, str) or not customer_id:
        return "meter_event_no_customer_defined", f"The payload must contain `{customer_key}`."
    if customer_id not in state.customers:
        return "meter_event_customer_not_found", f"No such customer: '{customer_id}'"
    value_key = meter["value_settings"]["event_payload_key"]
    raw_value = payload.get(value_key)
    if raw_value is None and meter["default_aggregation"]["formula"] != "count":
        return "meter_event_invalid_value", f"The payload must contain `{value_key}`."
    if raw_value is not None and not re.fullmatch(r"-?\d+", str(raw_value)):
        # Stripe's docs: "The numerical usage value in the payload only accepts whole
        # number values."
        return "meter_event_invalid_value", f"Invalid value '{raw_value}': must be a whole number."
    return None


def list_event_summaries(state: State, call: Call) -> JSON:
    params = call.params
    meter = find_meter(state, call.path["id"])
    customer_id = get_str(params, "customer", required=True) or ""
    find_customer(state, customer_id, param="customer")
    start = get_int(params, "start_time", required=True) or 0
    end = get_int(params, "end_time", required=True) or 0
    window = get_enum(params, "value_grouping_window", ("hour", "day"), "")
    step = {"hour": 3600, "day": DAY}.get(window, 60)
    for name, bound in (("start_time", start), ("end_time", end)):
        if bound % step:
            raise ApiError(
                400, f"{name} must be aligned to {window or 'minute'} boundaries.", param=name
            )
    if start >= end:
        raise ApiError(400, "start_time must be before end_time.", param="start_time")
    windows = (
        [(s, min(s + step, end)) for s in range(start, end, step)] if window else [(start, end)]
    )
    summaries = []
    for window_start, window_end in windows:
        value = _aggregate(state, meter, customer_id, window_start, window_end)
        if value is None and window:
            continue  # grouped summaries cover only windows that had events
        digest = hashlib.sha256(
            f"{meter['id']}|{customer_id}|{window_start}|{window_end}".encode()
        ).hexdigest()[:24]
        summaries.append(
            {
                "id": f"mtrusg_{digest}",
                "object": "billing.meter_event_summary",
                "aggregated_value": _number(value or Decimal(0)),
                "end_time": window_end,
                "livemode": False,
                "meter": meter["id"],
                "start_time": window_start,
            }
        )
    return page(summaries, params, f"/v1/billing/meters/{meter['id']}/event_summaries")


def _aggregate(
    state: State, meter: JSON, customer_id: str, start: int, end: int
) -> Decimal | None:
    customer_key = meter["customer_mapping"]["event_payload_key"]
    value_key = meter["value_settings"]["event_payload_key"]
    events = [
        e
        for e in state.meter_events
        if e["event_name"] == meter["event_name"]
        and e["payload"].get(customer_key) == customer_id
        and start <= e["timestamp"] < end
    ]
    if not events:
        return None
    formula = meter["default_aggregation"]["formula"]
    if formula == "count":
        return Decimal(len(events))
    values = [Decimal(e["payload"][value_key]) for e in events]
    if formula == "last":
        # Stable sort: among equal timestamps the later-received event wins.
        latest = max(range(len(events)), key=lambda i: (events[i]["timestamp"], i))
        return values[latest]
    return sum(values, Decimal(0))


# ------------------------------------------------------------ v2 meter event stream


def create_meter_event_session(state: State, call: Call) -> JSON:
    token = new_id("mes_auth_test")
    expires_at = call.now + _SESSION_LIFETIME
    state.sessions[token] = expires_at
    return {
        "id": new_id("mes_test"),
        "object": "v2.billing.meter_event_session",
        "authentication_token": token,
        "created": rfc3339(call.now),
        "expires_at": rfc3339(expires_at),
        "livemode": False,
    }


def create_meter_event_stream(state: State, call: Call) -> JSON:
    events = call.params["events"]
    if not isinstance(events, list) or not 1 <= len(events) <= _STREAM_MAX_EVENTS:
        raise ApiError(
            400, f"events must be a list of 1 to {_STREAM_MAX_EVENTS} events.", param="events"
        )
    parsed = [
        (event, _parse_rfc3339(event.get("timestamp"), index, call.now))
        for index, event in enumerate(events)
    ]
    # Stripe validates stream events asynchronously: the request succeeds, an invalid
    # event is dropped and reported by webhook, and a repeated identifier is dropped.
    rejections: list[Rejection] = []
    for event, timestamp in parsed:
        try:
            _, rejection = accept_meter_event(
                state,
                event_name=str(event["event_name"]),
                payload=event["payload"],
                identifier=event.get("identifier"),
                timestamp=timestamp,
                now=call.now,
            )
        except ApiError:
            continue  # already there: the stream drops repeats silently
        if rejection is not None:
            rejections.append(rejection)
    if rejections:
        report_rejections(state, rejections, call.now)
    return {}


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def _parse_rfc3339(value: Any, index: int, default: int) -> int:
    if value is None:
        return default
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError:
        stamp = None
    if stamp is None or stamp.tzinfo is None:
        raise ApiError(400, f"Invalid timestamp: {value}", param=f"events[{index}].timestamp")
    return int(stamp.timestamp())
