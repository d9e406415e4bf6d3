"""A Stripe double: an HTTP server speaking the slice of Stripe's API that Tally uses.

Tests and the demo drive the real ``stripe`` SDK against it by overriding the SDK's
base addresses::

    with StripeDouble() as double:
        client = stripe.StripeClient(
            "sk_test_tally",
            base_addresses={"api": double.url, "meter_events": double.url},
            max_network_retries=0,
        )
        customer = client.v1.customers.create({"email": "ops@acme.test"})

Behaviour that Tally's guarantees lean on, and how the double provides it:

1. Parameter checking. Each endpoint accepts exactly the top-level parameters of the
   SDK's generated ``*Params`` TypedDict for that call (read from its annotations, not
   typed by hand), so a misspelt parameter in a Tally call fails a test the way it
   would fail against Stripe: 400 ``parameter_unknown``, "Received unknown parameter".
2. Idempotency keys. A POST whose ``Idempotency-Key`` was seen before with the same
   method, path and parameters replays the stored response with
   ``Idempotent-Replayed: true``; different parameters give 400 ``idempotency_error``.
   Like Stripe, only requests that reached the API method are stored (their 200s and
   their business 400s); requests refused earlier (authentication, unknown or missing
   parameters, injected faults) are not, so the key stays usable for a retry.
3. Meter event identifiers are unique for the life of the double (Stripe: a rolling
   window of at least 24 hours). A repeat is refused the way Stripe refuses it: 400
   ``invalid_request_error``, "An event already exists with identifier <id>.", with
   ``Stripe-Should-Retry: false``. Stripe's ``code`` for this case is not documented;
   the double sends ``resource_already_exists`` and ``param=identifier``. The event is
   not stored twice, so summaries never double count.
4. Injected faults (see :meth:`StripeDouble.faults`) are decided before a request has
   any effect: nothing is stored and the idempotency key is not consumed. The one
   exception is ``timeout``, a lost response: the request takes effect (and its key is
   stored), then the answer is held back ``FaultPlan.timeout`` seconds, past the client's
   timeout, so the client must retry with the same key to learn what happened.
5. Prices (``POST /v1/prices``, with ``product_data`` for their product) are checked the
   way Stripe checks them: a tiered price needs ``tiers_mode`` and an open last tier, a
   metered price needs an existing meter, a ``lookup_key`` is unique among prices.

Deliberate differences from Stripe, all stricter: meter event checks that Stripe runs
asynchronously (meter exists, customer mapping, whole-number value) run synchronously
and refuse the request with the error-report code Stripe would use; parameters the
double does not model (subscriptions, discounts, currency options) are refused with a message
saying so instead of being ignored; payments always succeed. On the v2 meter event
stream Stripe validates asynchronously, so there the double accepts the request and
drops invalid events into :attr:`DoubleSnapshot.dropped_stream_events`.
"""

from __future__ import annotations

import argparse
import base64
import copy
import difflib
import hashlib
import json
import logging
import random
import re
import secrets
import signal
import string
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, MappingProxyType, TracebackType
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlsplit

import stripe.params as v1_params
import stripe.params.billing as billing_params
import stripe.params.v2.billing as v2_billing_params
from stripe import RequestOptions

__all__ = ["FAULT_KINDS", "DoubleSnapshot", "FaultPlan", "StripeDouble", "main"]

_log = logging.getLogger(__name__)

JSON = dict[str, Any]
"""A Stripe object or request body as decoded JSON / parsed form data."""

FAULT_KINDS: Final = frozenset({"429", "lock_timeout", "500", "timeout"})
"""Injectable faults: a rate-limit 429, a lock-timeout 429 (retryable), a 500, and a
response lost after the request took effect (``timeout``)."""

_DAY: Final = 86_400
_METER_EVENT_MAX_AGE: Final = 35 * _DAY
_METER_EVENT_MAX_SKEW: Final = 5 * 60
_SESSION_LIFETIME: Final = 15 * 60
# Stripe forgets idempotency keys after 24 hours; the double keeps the newest ones, so a
# long demo run holds bounded memory for them (every SDK POST carries a fresh key).
_MAX_REMEMBERED_KEYS: Final = 200_000
_STREAM_MAX_EVENTS: Final = 100
_MAX_METADATA_KEYS: Final = 50
_DOC_URL: Final = "https://stripe.com/docs/error-codes"

# The SDK's per-request options (api_key, idempotency_key, ...) are mixed into some of
# its *Params TypedDicts for the legacy resource API; they travel as headers, never as
# body parameters, so they are not parameters of any endpoint.
_REQUEST_OPTION_KEYS: Final = frozenset(RequestOptions.__annotations__)


# --------------------------------------------------------------------------- errors


class _ApiError(Exception):
    """An error response in Stripe's JSON shape, raised anywhere below the HTTP layer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.should_retry = should_retry

    def response(self) -> _Response:
        error: JSON = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = f"{_DOC_URL}/{self.code.replace('_', '-')}"
        if self.param is not None:
            error["param"] = self.param
        headers = {}
        if self.should_retry is not None:
            headers["Stripe-Should-Retry"] = "true" if self.should_retry else "false"
        return _Response(self.status, {"error": error}, headers)


def _missing(param: str) -> _ApiError:
    return _ApiError(
        400, f"Missing required param: {param}.", code="parameter_missing", param=param
    )


def _no_such(kind: str, object_id: str, param: str, status: int = 400) -> _ApiError:
    return _ApiError(status, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


def _unsupported(param: str) -> _ApiError:
    return _ApiError(
        400,
        f"The Stripe double does not model `{param}`; Tally should not "
        "need it (extend billing_jobs/stripe_double.py if it does).",
        param=param,
    )


@dataclass(frozen=True)
class _Response:
    status: int
    body: JSON
    headers: Mapping[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------ parameter reading


def parse_form(body: str) -> JSON:
    """Parse a Stripe form body (``a[b][0][c]=x``) into nested dicts and lists.

    Every leaf stays a string, as on the wire; handlers convert what they read.
    """
    root: JSON = {}
    for raw_key, value in parse_qsl(body, keep_blank_values=True):
        path = _split_key(raw_key)
        node = root
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise _ApiError(400, f"Invalid object: {raw_key}", param=path[0])
            node = child
        # `expand[]=a&expand[]=b` is the bracket-only array form some clients send.
        leaf = path[-1] if path[-1] else str(len(node))
        node[leaf] = value
    listified = _listify(root)
    assert isinstance(listified, dict)
    return listified


def _split_key(raw_key: str) -> list[str]:
    head, bracket, rest = raw_key.partition("[")
    if not bracket or not rest.endswith("]"):
        return [raw_key]
    return [head, *rest[:-1].split("][")]


def _listify(node: Any) -> Any:
    """Turn dicts keyed ``"0".."n"`` (how the SDK encodes lists) back into lists."""
    if not isinstance(node, dict):
        return node
    converted = {key: _listify(value) for key, value in node.items()}
    if converted and all(key.isdigit() for key in converted):
        return [converted[key] for key in sorted(converted, key=int)]
    return converted


def _get_str(params: JSON, key: str, *, required: bool = False) -> str | None:
    value = params.get(key)
    if value is None or value == "":
        if required:
            raise _missing(key)
        return None
    if not isinstance(value, str):
        raise _ApiError(400, f"Invalid string: {key}", code="parameter_invalid_string", param=key)
    return value


def _get_int(params: JSON, key: str, *, required: bool = False) -> int | None:
    value = params.get(key)
    if value is None or value == "":
        if required:
            raise _missing(key)
        return None
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    raise _ApiError(400, f"Invalid integer: {value}", code="parameter_invalid_integer", param=key)


def _get_bool(params: JSON, key: str) -> bool | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if value in (True, "true"):
        return True
    if value in (False, "false"):
        return False
    raise _ApiError(400, f"Invalid boolean: {value}", param=key)


def _get_decimal(params: JSON, key: str) -> Decimal | None:
    value = _get_str(params, key)
    if value is None:
        return None
    try:
        number = Decimal(value)
    except InvalidOperation:
        number = Decimal("NaN")
    if not number.is_finite():
        raise _ApiError(
            400, f"Invalid decimal: {value}", code="parameter_invalid_string", param=key
        )
    return number


def _get_enum(params: JSON, key: str, choices: Sequence[str], default: str) -> str:
    value = _get_str(params, key)
    if value is None:
        return default
    if value not in choices:
        raise _ApiError(400, f"Invalid {key}: must be one of {', '.join(choices)}", param=key)
    return value


def _get_dict(params: JSON, key: str) -> JSON | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, list):  # a dict whose keys all happened to be digits
        value = {str(index): item for index, item in enumerate(value)}
    if not isinstance(value, dict):
        raise _ApiError(400, f"Invalid object: {key}", param=key)
    return value


def _get_metadata(params: JSON) -> dict[str, str]:
    """Read ``metadata`` with Stripe's limits; an empty value unsets a key, as in Stripe."""
    raw = _get_dict(params, "metadata") or {}
    metadata: dict[str, str] = {}
    for key, value in raw.items():
        param = f"metadata[{key}]"
        if not isinstance(value, str):
            raise _ApiError(400, f"Invalid string: {param}", param=param)
        if len(key) > 40:
            raise _ApiError(400, "Metadata keys can have up to 40 characters.", param=param)
        if len(value) > 500:
            raise _ApiError(400, "Metadata values can have up to 500 characters.", param=param)
        if value:
            metadata[key] = value
    if len(metadata) > _MAX_METADATA_KEYS:
        raise _ApiError(400, "Metadata can have up to 50 keys.", param="metadata")
    return metadata


def _reject(params: JSON, *names: str) -> None:
    for name in names:
        if name in params:
            raise _unsupported(name)


def _created_filter(params: JSON) -> Callable[[JSON], bool]:
    """Stripe's ``created`` list filter: an exact timestamp or ``gt/gte/lt/lte`` bounds."""
    raw = params.get("created")
    if raw is None or raw == "":
        return lambda _obj: True
    if isinstance(raw, str):
        exact = _get_int(params, "created")
        return lambda obj: obj["created"] == exact
    bounds = _get_dict(params, "created") or {}
    checks = {
        "gt": lambda a, b: a > b,
        "gte": lambda a, b: a >= b,
        "lt": lambda a, b: a < b,
        "lte": lambda a, b: a <= b,
    }
    active: list[tuple[Callable[[int, int], bool], int]] = []
    for op in bounds:
        if op not in checks:
            raise _ApiError(
                400,
                f"Received unknown parameter: created[{op}]",
                code="parameter_unknown",
                param=f"created[{op}]",
            )
        value = _get_int(bounds, op)
        assert value is not None
        active.append((checks[op], value))
    return lambda obj: all(check(obj["created"], bound) for check, bound in active)


def _page(items: Sequence[JSON], params: JSON, url: str) -> JSON:
    """One page of a Stripe list, newest first as given; cursors are object ids."""
    limit = _get_int(params, "limit")
    limit = 10 if limit is None else limit
    if not 1 <= limit <= 100:
        raise _ApiError(
            400,
            "Invalid limit: must be between 1 and 100",
            code="parameter_invalid_integer",
            param="limit",
        )
    ids = [item["id"] for item in items]
    after, before = _get_str(params, "starting_after"), _get_str(params, "ending_before")
    if after is not None:
        if after not in ids:
            raise _no_such("object", after, "starting_after")
        start = ids.index(after) + 1
        data, has_more = items[start : start + limit], len(items) > start + limit
    elif before is not None:
        if before not in ids:
            raise _no_such("object", before, "ending_before")
        end = ids.index(before)
        data, has_more = items[max(0, end - limit) : end], end - limit > 0
    else:
        data, has_more = items[:limit], len(items) > limit
    return {"object": "list", "data": list(data), "has_more": has_more, "url": url}


# ------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class ParamSpec:
    """The top-level parameters an endpoint accepts, taken from the SDK's TypedDict."""

    allowed: frozenset[str]
    required: frozenset[str]

    @classmethod
    def of(cls, typed_dict: Any) -> ParamSpec:
        """Build from a generated ``*Params`` TypedDict (annotations include bases)."""
        annotations = frozenset(typed_dict.__annotations__)
        required = frozenset(typed_dict.__required_keys__)
        return cls(annotations - _REQUEST_OPTION_KEYS, required - _REQUEST_OPTION_KEYS)

    def check(self, params: JSON, prefix: str = "") -> None:
        """Refuse unknown parameters first (a typo also looks like a missing one)."""
        for key in params:
            if key not in self.allowed:
                message = f"Received unknown parameter: {prefix}{key}"
                close = difflib.get_close_matches(key, sorted(self.allowed), n=1)
                if close:
                    message += f". Did you mean {close[0]}?"
                raise _ApiError(400, message, code="parameter_unknown", param=prefix + key)
        for key in sorted(self.required):
            if params.get(key) in (None, ""):
                raise _missing(prefix + key)


@dataclass(frozen=True)
class _Call:
    """What a handler sees of one request."""

    params: JSON
    path: Mapping[str, str]
    now: int


_Handler = Callable[["_Api", _Call], JSON]


@dataclass(frozen=True)
class _Route:
    """One endpoint: method and path template, its parameter spec, its handler."""

    method: str
    template: str
    params_type: Any
    handler: _Handler
    body: Literal["form", "json"] = "form"
    auth: Literal["secret_key", "meter_event_session"] = "secret_key"
    spec: ParamSpec = field(init=False)
    pattern: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template)
        object.__setattr__(self, "spec", ParamSpec.of(self.params_type))
        object.__setattr__(self, "pattern", re.compile(f"^{regex}$"))

    @property
    def key(self) -> str:
        """The name requests are counted under, e.g. ``POST /v1/customers``."""
        return f"{self.method} {self.template}"


# --------------------------------------------------------------------- the API state


def _new_id(prefix: str) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "_" + "".join(secrets.choice(alphabet) for _ in range(24))


def _rfc3339(epoch: float) -> str:
    stamp = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


class _Api:
    """Stripe's objects and the handlers that change them.

    Not thread-safe by itself: :class:`StripeDouble` calls every handler with its one
    lock held, so each request is atomic and requests are linearizable.
    """

    def __init__(self) -> None:
        self.customers: dict[str, JSON] = {}
        self.meters: dict[str, JSON] = {}
        self.meter_events: list[JSON] = []
        self.identifiers: set[str] = set()
        self.invoice_items: dict[str, JSON] = {}
        self.invoices: dict[str, JSON] = {}
        self.prices: dict[str, JSON] = {}
        self.products: dict[str, JSON] = {}
        self.sessions: dict[str, float] = {}
        self.dropped_stream_events: list[JSON] = []

    # -- customers

    def create_customer(self, call: _Call) -> JSON:
        params = call.params
        _reject(params, "source", "payment_method", "tax_id_data", "test_clock", "cash_balance")
        customer: JSON = {
            "id": _new_id("cus"),
            "object": "customer",
            "created": call.now,
            "livemode": False,
            "address": _get_dict(params, "address"),
            "balance": _get_int(params, "balance") or 0,
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": _get_str(params, "description"),
            "discount": None,
            "email": _get_str(params, "email"),
            "invoice_prefix": _get_str(params, "invoice_prefix")
            or "".join(secrets.choice(string.ascii_uppercase) for _ in range(8)),
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            },
            "metadata": _get_metadata(params),
            "name": _get_str(params, "name"),
            "next_invoice_sequence": _get_int(params, "next_invoice_sequence") or 1,
            "phone": _get_str(params, "phone"),
            "preferred_locales": params.get("preferred_locales") or [],
            "shipping": _get_dict(params, "shipping"),
            "tax_exempt": _get_enum(params, "tax_exempt", ("none", "exempt", "reverse"), "none"),
            "test_clock": None,
        }
        self.customers[customer["id"]] = customer
        return customer

    def retrieve_customer(self, call: _Call) -> JSON:
        return self._customer(call.path["id"], param="id", status=404)

    def list_customers(self, call: _Call) -> JSON:
        email = _get_str(call.params, "email")
        created = _created_filter(call.params)
        found = [
            c
            for c in reversed(self.customers.values())
            if (email is None or c["email"] == email) and created(c)
        ]
        return _page(found, call.params, "/v1/customers")

    def search_customers(self, call: _Call) -> JSON:
        query = _get_str(call.params, "query", required=True)
        assert query is not None
        clauses = [_parse_search_clause(clause) for clause in query.split(" AND ")]
        found = [
            c
            for c in reversed(self.customers.values())
            if all(_search_value(c, path) == value for path, value in clauses)
        ]
        limit = _get_int(call.params, "limit") or 10
        return {
            "object": "search_result",
            "data": found[:limit],
            "has_more": len(found) > limit,
            "next_page": None,
            "url": "/v1/customers/search",
        }

    def _customer(self, customer_id: str, *, param: str, status: int = 400) -> JSON:
        customer = self.customers.get(customer_id)
        if customer is None:
            raise _no_such("customer", customer_id, param, status)
        return customer

    # -- meters and meter events

    def create_meter(self, call: _Call) -> JSON:
        params = call.params
        event_name = _get_str(params, "event_name", required=True)
        aggregation = _get_dict(params, "default_aggregation") or {}
        formula = _get_enum(aggregation, "formula", ("sum", "count", "last"), "")
        if not formula:
            raise _missing("default_aggregation[formula]")
        mapping = _get_dict(params, "customer_mapping") or {}
        value_settings = _get_dict(params, "value_settings") or {}
        if any(
            m["event_name"] == event_name and m["status"] == "active" for m in self.meters.values()
        ):
            raise _ApiError(
                400,
                f"An active meter with event_name '{event_name}' already exists.",
                code="resource_already_exists",
                param="event_name",
            )
        meter: JSON = {
            "id": _new_id("mtr_test"),
            "object": "billing.meter",
            "created": call.now,
            "customer_mapping": {
                "event_payload_key": _get_str(mapping, "event_payload_key") or "stripe_customer_id",
                "type": _get_enum(mapping, "type", ("by_id",), "by_id"),
            },
            "default_aggregation": {"formula": formula},
            "display_name": _get_str(params, "display_name", required=True),
            "event_name": event_name,
            "event_time_window": _get_str(params, "event_time_window"),
            "livemode": False,
            "status": "active",
            "status_transitions": {"deactivated_at": None},
            "updated": call.now,
            "value_settings": {
                "event_payload_key": _get_str(value_settings, "event_payload_key") or "value",
            },
        }
        self.meters[meter["id"]] = meter
        return meter

    def retrieve_meter(self, call: _Call) -> JSON:
        return self._meter(call.path["id"])

    def list_meters(self, call: _Call) -> JSON:
        status = _get_str(call.params, "status")
        found = [
            m for m in reversed(self.meters.values()) if status is None or m["status"] == status
        ]
        return _page(found, call.params, "/v1/billing/meters")

    def _meter(self, meter_id: str) -> JSON:
        meter = self.meters.get(meter_id)
        if meter is None:
            raise _no_such("billing meter", meter_id, "id", 404)
        return meter

    def create_meter_event(self, call: _Call) -> JSON:
        params = call.params
        timestamp = _get_int(params, "timestamp")
        return self.record_meter_event(
            event_name=_get_str(params, "event_name", required=True) or "",
            payload=_get_dict(params, "payload") or {},
            identifier=_get_str(params, "identifier"),
            timestamp=call.now if timestamp is None else timestamp,
            now=call.now,
        )

    def record_meter_event(
        self,
        *,
        event_name: str,
        payload: JSON,
        identifier: str | None,
        timestamp: int,
        now: int,
    ) -> JSON:
        """Validate and store one meter event; shared by the v1 endpoint and v2 stream."""
        meter = next(
            (
                m
                for m in self.meters.values()
                if m["event_name"] == event_name and m["status"] == "active"
            ),
            None,
        )
        if meter is None:
            raise _ApiError(
                400,
                f"No active meter was found with event_name '{event_name}'.",
                code="no_meter",
                param="event_name",
            )
        if timestamp < now - _METER_EVENT_MAX_AGE:
            raise _ApiError(
                400,
                "Timestamp must be within the past 35 calendar days.",
                code="timestamp_too_far_in_past",
                param="timestamp",
            )
        if timestamp > now + _METER_EVENT_MAX_SKEW:
            raise _ApiError(
                400,
                "Timestamp must not be more than 5 minutes in the future.",
                code="timestamp_in_future",
                param="timestamp",
            )
        customer_key = meter["customer_mapping"]["event_payload_key"]
        customer_id = payload.get(customer_key)
        if not isinstance(customer_id, str) or not customer_id:
            raise _ApiError(
                400,
                f"The payload must contain `{customer_key}`.",
                code="meter_event_no_customer_defined",
                param=f"payload[{customer_key}]",
            )
        if customer_id not in self.customers:
            raise _ApiError(
                400,
                f"No such customer: '{customer_id}'",
                code="meter_event_customer_not_found",
                param=f"payload[{customer_key}]",
            )
        value_key = meter["value_settings"]["event_payload_key"]
        raw_value = payload.get(value_key)
        if raw_value is None and meter["default_aggregation"]["formula"] != "count":
            raise _ApiError(
                400,
                f"The payload must contain `{value_key}`.",
                code="meter_event_value_not_found",
                param=f"payload[{value_key}]",
            )
        if raw_value is not None and not re.fullmatch(r"-?\d+", str(raw_value)):
            # Stripe's docs: "The numerical usage value in the payload only accepts whole
            # number values."
            raise _ApiError(
                400,
                f"Invalid value '{raw_value}': must be a whole number.",
                code="meter_event_invalid_value",
                param=f"payload[{value_key}]",
            )
        identifier = identifier or _new_id("evt_ident")
        if identifier in self.identifiers:
            raise _ApiError(
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
        self.identifiers.add(identifier)
        self.meter_events.append(event)
        return event

    def list_event_summaries(self, call: _Call) -> JSON:
        params = call.params
        meter = self._meter(call.path["id"])
        customer_id = _get_str(params, "customer", required=True) or ""
        self._customer(customer_id, param="customer")
        start = _get_int(params, "start_time", required=True) or 0
        end = _get_int(params, "end_time", required=True) or 0
        window = _get_enum(params, "value_grouping_window", ("hour", "day"), "")
        step = {"hour": 3600, "day": _DAY}.get(window, 60)
        for name, bound in (("start_time", start), ("end_time", end)):
            if bound % step:
                raise _ApiError(
                    400, f"{name} must be aligned to {window or 'minute'} boundaries.", param=name
                )
        if start >= end:
            raise _ApiError(400, "start_time must be before end_time.", param="start_time")
        windows = (
            [(s, min(s + step, end)) for s in range(start, end, step)] if window else [(start, end)]
        )
        summaries = []
        for window_start, window_end in windows:
            value = self._aggregate(meter, customer_id, window_start, window_end)
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
        return _page(summaries, params, f"/v1/billing/meters/{meter['id']}/event_summaries")

    def _aggregate(self, meter: JSON, customer_id: str, start: int, end: int) -> Decimal | None:
        customer_key = meter["customer_mapping"]["event_payload_key"]
        value_key = meter["value_settings"]["event_payload_key"]
        events = [
            e
            for e in self.meter_events
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

    # -- v2 meter event stream

    def create_meter_event_session(self, call: _Call) -> JSON:
        token = _new_id("mes_auth_test")
        expires_at = call.now + _SESSION_LIFETIME
        self.sessions[token] = expires_at
        return {
            "id": _new_id("mes_test"),
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": _rfc3339(call.now),
            "expires_at": _rfc3339(expires_at),
            "livemode": False,
        }

    def create_meter_event_stream(self, call: _Call) -> JSON:
        events = call.params["events"]
        if not isinstance(events, list) or not 1 <= len(events) <= _STREAM_MAX_EVENTS:
            raise _ApiError(
                400, f"events must be a list of 1 to {_STREAM_MAX_EVENTS} events.", param="events"
            )
        parsed = []
        for index, event in enumerate(events):
            if not isinstance(event, dict):
                raise _ApiError(400, f"Invalid object: events[{index}]", param="events")
            _STREAM_EVENT_SPEC.check(event, prefix=f"events[{index}].")
            if not isinstance(event["payload"], dict):
                raise _ApiError(400, "Invalid object", param=f"events[{index}].payload")
            parsed.append((event, _parse_rfc3339(event.get("timestamp"), index, call.now)))
        # Stripe validates stream events asynchronously: the request succeeds and an
        # invalid event is dropped (reported later by webhook). Keep them for inspection.
        for event, timestamp in parsed:
            try:
                self.record_meter_event(
                    event_name=str(event["event_name"]),
                    payload=event["payload"],
                    identifier=event.get("identifier"),
                    timestamp=timestamp,
                    now=call.now,
                )
            except _ApiError as error:
                self.dropped_stream_events.append(
                    {"event": event, "code": error.code, "message": error.message}
                )
        return {}

    # -- prices (each with its own product, from `product_data`)

    def create_price(self, call: _Call) -> JSON:
        params = call.params
        _reject(params, "currency_options", "custom_unit_amount")
        currency = (_get_str(params, "currency", required=True) or "").lower()
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise _ApiError(400, f"Invalid currency: {currency}", param="currency")
        product_id = _get_str(params, "product")
        product_data = _get_dict(params, "product_data")
        if (product_id is None) == (product_data is None):
            raise _ApiError(
                400, "You must specify exactly one of product or product_data.", param="product"
            )
        if product_id is not None:
            if product_id not in self.products:
                raise _no_such("product", product_id, "product")
        else:
            assert product_data is not None
            product_id = _get_str(product_data, "id") or _new_id("prod")
            if product_id in self.products:
                raise _ApiError(
                    400,
                    f"Product already exists: {product_id}",
                    code="resource_already_exists",
                    param="product_data[id]",
                )
            self.products[product_id] = {
                "id": product_id,
                "object": "product",
                "name": _get_str(product_data, "name", required=True),
                "metadata": _get_metadata(product_data),
                "created": call.now,
            }
        scheme = _get_enum(params, "billing_scheme", ("per_unit", "tiered"), "per_unit")
        unit_amount = _get_int(params, "unit_amount")
        unit_amount_decimal = _get_decimal(params, "unit_amount_decimal")
        tiers = params.get("tiers")
        transform = _get_dict(params, "transform_quantity")
        if scheme == "per_unit":
            if tiers is not None:
                raise _ApiError(400, "tiers require billing_scheme=tiered.", param="tiers")
            if (unit_amount is None) == (unit_amount_decimal is None):
                raise _ApiError(
                    400,
                    "Exactly one of unit_amount and unit_amount_decimal is required.",
                    param="unit_amount",
                )
        else:
            tiers = self._tiers(tiers)
            if not _get_enum(params, "tiers_mode", ("graduated", "volume"), ""):
                raise _missing("tiers_mode")
            if transform is not None:
                raise _ApiError(
                    400, "transform_quantity cannot be combined with tiers.",
                    param="transform_quantity",
                )
        recurring = _get_dict(params, "recurring")
        if recurring is not None:
            if not _get_enum(recurring, "interval", ("day", "week", "month", "year"), ""):
                raise _missing("recurring[interval]")
            usage_type = _get_enum(recurring, "usage_type", ("licensed", "metered"), "licensed")
            meter_id = _get_str(recurring, "meter")
            if usage_type == "metered" and meter_id is None:
                raise _missing("recurring[meter]")
            if meter_id is not None and meter_id not in self.meters:
                raise _no_such("billing meter", meter_id, "recurring[meter]")
            recurring = {
                "interval": recurring["interval"],
                "interval_count": _get_int(recurring, "interval_count") or 1,
                "meter": meter_id,
                "usage_type": usage_type,
            }
        lookup_key = _get_str(params, "lookup_key")
        if lookup_key is not None:
            holder = next((p for p in self.prices.values() if p["lookup_key"] == lookup_key), None)
            if holder is not None and not _get_bool(params, "transfer_lookup_key"):
                raise _ApiError(
                    400,
                    f"A price (`{holder['id']}`) already uses that lookup key.",
                    code="lookup_key_exists",  # not documented; the double's name for it
                    param="lookup_key",
                )
            if holder is not None:
                holder["lookup_key"] = None
        price: JSON = {
            "id": _new_id("price"),
            "object": "price",
            "active": _get_bool(params, "active") is not False,
            "billing_scheme": scheme,
            "created": call.now,
            "currency": currency,
            "livemode": False,
            "lookup_key": lookup_key,
            "metadata": _get_metadata(params),
            "nickname": _get_str(params, "nickname"),
            "product": product_id,
            "recurring": recurring,
            "tax_behavior": _get_str(params, "tax_behavior") or "unspecified",
            "tiers": tiers,
            "tiers_mode": _get_str(params, "tiers_mode"),
            "transform_quantity": transform,
            "type": "recurring" if recurring is not None else "one_time",
            "unit_amount": unit_amount,
            "unit_amount_decimal": None
            if scheme == "tiered"
            else str(unit_amount_decimal if unit_amount_decimal is not None else unit_amount),
        }
        self.prices[price["id"]] = price
        return price

    @staticmethod
    def _tiers(raw: Any) -> list[JSON]:
        """Stripe's tier rules: at least one, increasing `up_to`, the last one `inf`."""
        if not isinstance(raw, list) or not raw:
            raise _missing("tiers")
        tiers: list[JSON] = []
        previous = 0
        for index, tier in enumerate(raw):
            if not isinstance(tier, dict):
                raise _ApiError(400, f"Invalid object: tiers[{index}]", param="tiers")
            last = index == len(raw) - 1
            bound = tier.get("up_to")
            if bound == "inf":
                if not last:
                    raise _ApiError(400, "Only the last tier may be `inf`.", param="tiers")
                up_to = None
            else:
                up_to = _get_int(tier, "up_to", required=True)
                assert up_to is not None
                if last:
                    raise _ApiError(400, "The last tier must have up_to=inf.", param="tiers")
                if up_to <= previous:
                    raise _ApiError(400, "Tier up_to values must increase.", param="tiers")
                previous = up_to
            unit = _get_decimal(tier, "unit_amount_decimal")
            flat = _get_decimal(tier, "flat_amount_decimal")
            tiers.append(
                {
                    "up_to": up_to,
                    "unit_amount": _get_int(tier, "unit_amount"),
                    "unit_amount_decimal": None if unit is None else str(unit),
                    "flat_amount": _get_int(tier, "flat_amount"),
                    "flat_amount_decimal": None if flat is None else str(flat),
                }
            )
        return tiers

    def retrieve_price(self, call: _Call) -> JSON:
        price = self.prices.get(call.path["id"])
        if price is None:
            raise _no_such("price", call.path["id"], "id", 404)
        return price

    def list_prices(self, call: _Call) -> JSON:
        lookup_keys = call.params.get("lookup_keys")
        wanted = set(lookup_keys) if isinstance(lookup_keys, list) else None
        found = [
            p
            for p in reversed(self.prices.values())
            if wanted is None or p["lookup_key"] in wanted
        ]
        return _page(found, call.params, "/v1/prices")

    # -- invoice items

    def create_invoice_item(self, call: _Call) -> JSON:
        params = call.params
        _reject(
            params,
            "price_data",
            "pricing",
            "subscription",
            "discounts",
            "tax_rates",
            "customer_account",
        )
        customer = self._customer(
            _get_str(params, "customer", required=True) or "", param="customer"
        )
        amount = _get_int(params, "amount")
        unit_amount = _get_decimal(params, "unit_amount_decimal")
        quantity = _get_int(params, "quantity")
        quantity_decimal = _get_decimal(params, "quantity_decimal")
        if quantity is not None and quantity_decimal is not None:
            raise _ApiError(
                400,
                "You may only specify one of these parameters: quantity, quantity_decimal.",
                param="quantity",
            )
        if amount is not None and unit_amount is not None:
            raise _ApiError(
                400,
                "You may only specify one of these parameters: amount, unit_amount_decimal.",
                param="amount",
            )
        units = Decimal(quantity) if quantity is not None else quantity_decimal or Decimal(1)
        if amount is not None:
            if units != 1:
                # `amount` is the line's total; a quantity beside it would be ambiguous.
                raise _ApiError(
                    400, "quantity can only be used with unit_amount_decimal.", param="quantity"
                )
        elif unit_amount is not None:
            exponent = unit_amount.as_tuple().exponent
            if isinstance(exponent, int) and exponent < -12:
                raise _ApiError(
                    400,
                    "unit_amount_decimal can have at most 12 decimal places.",
                    param="unit_amount_decimal",
                )
            # Stripe bills whole minor units: the line total is rounded, half up.
            amount = int((unit_amount * units).quantize(Decimal(1), ROUND_HALF_UP))
        else:
            raise _missing("amount")
        currency = (_get_str(params, "currency") or customer["currency"] or "").lower()
        if not currency:
            raise _missing("currency")
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise _ApiError(400, f"Invalid currency: {currency}", param="currency")
        invoice_id = _get_str(params, "invoice")
        if invoice_id is not None:
            invoice = self._invoice(invoice_id, param="invoice")
            if invoice["customer"] != customer["id"]:
                raise _ApiError(
                    400, "The invoice belongs to a different customer.", param="invoice"
                )
            self._require_draft(invoice, "add invoice items to")
            if invoice["currency"] != currency:
                raise _ApiError(
                    400,
                    f"The invoice's currency is {invoice['currency']}, not {currency}.",
                    param="currency",
                )
        period = _get_dict(params, "period") or {}
        item: JSON = {
            "id": _new_id("ii"),
            "object": "invoiceitem",
            "amount": amount,
            "currency": currency,
            "customer": customer["id"],
            "date": call.now,
            "description": _get_str(params, "description"),
            "discountable": _get_bool(params, "discountable") is not False,
            "discounts": [],
            "invoice": invoice_id,
            "livemode": False,
            "metadata": _get_metadata(params),
            "net_amount": amount,
            "parent": None,
            "period": {
                "start": _get_int(period, "start") or call.now,
                "end": _get_int(period, "end") or call.now,
            },
            "pricing": None
            if unit_amount is None
            else {
                "price_details": None,
                "type": "price_details",
                "unit_amount_decimal": str(unit_amount),
            },
            "proration": False,
            "quantity": int(units),
            "quantity_decimal": str(units),
            "tax_rates": [],
            "test_clock": None,
        }
        customer["currency"] = customer["currency"] or currency
        self.invoice_items[item["id"]] = item
        return item

    def retrieve_invoice_item(self, call: _Call) -> JSON:
        item = self.invoice_items.get(call.path["id"])
        if item is None:
            raise _no_such("invoiceitem", call.path["id"], "id", 404)
        return item

    def list_invoice_items(self, call: _Call) -> JSON:
        params = call.params
        customer, invoice = _get_str(params, "customer"), _get_str(params, "invoice")
        pending = _get_bool(params, "pending")
        created = _created_filter(params)
        found = [
            i
            for i in reversed(self.invoice_items.values())
            if (customer is None or i["customer"] == customer)
            and (invoice is None or i["invoice"] == invoice)
            and (pending is None or (i["invoice"] is None) == pending)
            and created(i)
        ]
        return _page(found, params, "/v1/invoiceitems")

    # -- invoices

    def create_invoice(self, call: _Call) -> JSON:
        params = call.params
        _reject(
            params,
            "subscription",
            "from_invoice",
            "discounts",
            "customer_account",
            "default_tax_rates",
            "shipping_cost",
        )
        customer = self._customer(
            _get_str(params, "customer", required=True) or "", param="customer"
        )
        collection = _get_enum(
            params,
            "collection_method",
            ("charge_automatically", "send_invoice"),
            "charge_automatically",
        )
        days_until_due = _get_int(params, "days_until_due")
        due_date = _get_int(params, "due_date")
        if collection == "send_invoice" and days_until_due is None and due_date is None:
            raise _missing("days_until_due")
        behavior = _get_enum(
            params, "pending_invoice_items_behavior", ("include", "exclude"), "exclude"
        )
        currency = (_get_str(params, "currency") or customer["currency"] or "usd").lower()
        invoice: JSON = {
            "id": _new_id("in"),
            "object": "invoice",
            "created": call.now,
            "livemode": False,
            "customer": customer["id"],
            "customer_email": customer["email"],
            "customer_name": customer["name"],
            "status": "draft",
            "auto_advance": bool(_get_bool(params, "auto_advance")),
            "collection_method": collection,
            "currency": currency,
            "days_until_due": days_until_due,
            "due_date": due_date,
            "description": _get_str(params, "description"),
            "footer": _get_str(params, "footer"),
            "metadata": _get_metadata(params),
            "number": _get_str(params, "number"),
            "period_start": call.now,
            "period_end": call.now,
            "effective_at": None,
            "attempted": False,
            "hosted_invoice_url": None,
            "invoice_pdf": None,
            "starting_balance": 0,
            "ending_balance": None,
            "status_transitions": {
                "finalized_at": None,
                "marked_uncollectible_at": None,
                "paid_at": None,
                "voided_at": None,
            },
            "amount_paid": 0,
        }
        self.invoices[invoice["id"]] = invoice
        if behavior == "include":
            for item in self.invoice_items.values():
                if (
                    item["customer"] == customer["id"]
                    and item["invoice"] is None
                    and item["currency"] == currency
                ):
                    item["invoice"] = invoice["id"]
        return self.render_invoice(invoice)

    def retrieve_invoice(self, call: _Call) -> JSON:
        return self.render_invoice(self._invoice(call.path["id"], param="id", status=404))

    def list_invoices(self, call: _Call) -> JSON:
        params = call.params
        customer, status = _get_str(params, "customer"), _get_str(params, "status")
        collection = _get_str(params, "collection_method")
        created = _created_filter(params)
        found = [
            self.render_invoice(i)
            for i in reversed(self.invoices.values())
            if (customer is None or i["customer"] == customer)
            and (status is None or i["status"] == status)
            and (collection is None or i["collection_method"] == collection)
            and created(i)
        ]
        return _page(found, params, "/v1/invoices")

    def list_invoice_lines(self, call: _Call) -> JSON:
        invoice = self._invoice(call.path["id"], param="id", status=404)
        return _page(self._lines(invoice), call.params, f"/v1/invoices/{invoice['id']}/lines")

    def finalize_invoice(self, call: _Call) -> JSON:
        invoice = self._invoice(call.path["id"], param="id", status=404)
        self._require_draft(invoice, "finalize")
        auto_advance = _get_bool(call.params, "auto_advance")
        self._finalize(invoice, call.now)
        if auto_advance is not None:
            invoice["auto_advance"] = auto_advance
        return self.render_invoice(invoice)

    def pay_invoice(self, call: _Call) -> JSON:
        _reject(call.params, "mandate", "payment_method", "source")
        invoice = self._invoice(call.path["id"], param="id", status=404)
        if invoice["status"] == "draft":
            self._finalize(invoice, call.now)  # Stripe finalizes a draft before paying it
        if invoice["status"] != "open":
            raise _ApiError(
                400, f"Invoice is already {invoice['status']}.", code="invoice_not_editable"
            )
        self._mark_paid(invoice, call.now)
        return self.render_invoice(invoice)

    def void_invoice(self, call: _Call) -> JSON:
        invoice = self._invoice(call.path["id"], param="id", status=404)
        if invoice["status"] != "open":
            raise _ApiError(
                400,
                f"You can only void an open invoice; this one is {invoice['status']}.",
                code="invoice_not_editable",
            )
        invoice["status"] = "void"
        invoice["status_transitions"]["voided_at"] = call.now
        return self.render_invoice(invoice)

    def _invoice(self, invoice_id: str, *, param: str, status: int = 400) -> JSON:
        invoice = self.invoices.get(invoice_id)
        if invoice is None:
            raise _no_such("invoice", invoice_id, param, status)
        return invoice

    @staticmethod
    def _require_draft(invoice: JSON, action: str) -> None:
        if invoice["status"] != "draft":
            raise _ApiError(
                400,
                f"You can only {action} a draft invoice; invoice "
                f"{invoice['id']} is {invoice['status']}.",
                code="invoice_not_editable",
            )

    def _finalize(self, invoice: JSON, now: int) -> None:
        customer = self.customers[invoice["customer"]]
        if invoice["number"] is None:
            invoice["number"] = (
                f"{customer['invoice_prefix']}-{customer['next_invoice_sequence']:04d}"
            )
            customer["next_invoice_sequence"] += 1
        invoice["status"] = "open"
        invoice["effective_at"] = now
        invoice["status_transitions"]["finalized_at"] = now
        if invoice["collection_method"] == "send_invoice" and invoice["days_until_due"]:
            invoice["due_date"] = now + invoice["days_until_due"] * _DAY
        if self._totals(invoice)["amount_due"] == 0:
            self._mark_paid(invoice, now)  # Stripe marks a zero-amount invoice paid

    def _mark_paid(self, invoice: JSON, now: int) -> None:
        invoice["status"] = "paid"
        invoice["amount_paid"] = self._totals(invoice)["amount_due"]
        invoice["attempted"] = True
        invoice["status_transitions"]["paid_at"] = now

    def _lines(self, invoice: JSON) -> list[JSON]:
        return [
            _line_item(item)
            for item in self.invoice_items.values()
            if item["invoice"] == invoice["id"]
        ]

    def _totals(self, invoice: JSON) -> dict[str, int]:
        subtotal = sum(line["amount"] for line in self._lines(invoice))
        amount_due = max(subtotal, 0)  # a negative total becomes customer credit
        return {
            "subtotal": subtotal,
            "subtotal_excluding_tax": subtotal,
            "total": subtotal,
            "total_excluding_tax": subtotal,
            "amount_due": amount_due,
            "amount_remaining": amount_due - invoice["amount_paid"],
        }

    def render_invoice(self, invoice: JSON) -> JSON:
        """The invoice as Stripe returns it: totals computed, first 10 lines embedded."""
        lines = self._lines(invoice)
        return {
            **invoice,
            **self._totals(invoice),
            "lines": {
                "object": "list",
                "data": lines[:10],
                "has_more": len(lines) > 10,
                "total_count": len(lines),
                "url": f"/v1/invoices/{invoice['id']}/lines",
            },
        }


def _line_item(item: JSON) -> JSON:
    return {
        "id": "il_" + item["id"].removeprefix("ii_"),
        "object": "line_item",
        "amount": item["amount"],
        "currency": item["currency"],
        "description": item["description"],
        "discount_amounts": [],
        "discountable": item["discountable"],
        "discounts": [],
        "invoice": item["invoice"],
        "livemode": False,
        "metadata": item["metadata"],
        "parent": {
            "type": "invoice_item_details",
            "subscription_item_details": None,
            "invoice_item_details": {
                "invoice_item": item["id"],
                "proration": False,
                "proration_details": {"credited_items": None},
                "subscription": None,
            },
        },
        "period": item["period"],
        "pricing": item["pricing"],
        "quantity": item["quantity"],
        "quantity_decimal": item["quantity_decimal"],
        "subtotal": item["amount"],
        "taxes": [],
    }


_SEARCH_CLAUSE: Final = re.compile(r"\s*(\w+)(?:\['([^']+)'\])?\s*:\s*'([^']*)'\s*")


def _parse_search_clause(clause: str) -> tuple[tuple[str, ...], str]:
    match = _SEARCH_CLAUSE.fullmatch(clause)
    if match is None or match.group(1) not in {"email", "name", "phone", "metadata"}:
        raise _ApiError(
            400,
            f"The Stripe double supports only `field:'value'` clauses on "
            f"email, name, phone and metadata['key'], joined by AND; got "
            f"{clause!r}.",
            param="query",
        )
    field_name, metadata_key, value = match.groups()
    path = (field_name, metadata_key) if field_name == "metadata" else (field_name,)
    return path, value


def _search_value(customer: JSON, path: tuple[str, ...]) -> Any:
    if path[0] == "metadata":
        return customer["metadata"].get(path[1])
    return customer[path[0]]


def _parse_rfc3339(value: Any, index: int, default: int) -> int:
    if value is None:
        return default
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError:
        stamp = None
    if stamp is None or stamp.tzinfo is None:
        raise _ApiError(400, f"Invalid timestamp: {value}", param=f"events[{index}].timestamp")
    return int(stamp.timestamp())


_STREAM_EVENT_SPEC: Final = ParamSpec.of(v2_billing_params.MeterEventStreamCreateParamsEvent)

_ROUTES: Final[tuple[_Route, ...]] = (
    _Route("POST", "/v1/customers", v1_params.CustomerCreateParams, _Api.create_customer),
    _Route("GET", "/v1/customers/search", v1_params.CustomerSearchParams, _Api.search_customers),
    _Route("GET", "/v1/customers", v1_params.CustomerListParams, _Api.list_customers),
    _Route("GET", "/v1/customers/{id}", v1_params.CustomerRetrieveParams, _Api.retrieve_customer),
    _Route("POST", "/v1/billing/meters", billing_params.MeterCreateParams, _Api.create_meter),
    _Route("GET", "/v1/billing/meters", billing_params.MeterListParams, _Api.list_meters),
    _Route(
        "GET", "/v1/billing/meters/{id}", billing_params.MeterRetrieveParams, _Api.retrieve_meter
    ),
    _Route(
        "GET",
        "/v1/billing/meters/{id}/event_summaries",
        billing_params.MeterEventSummaryListParams,
        _Api.list_event_summaries,
    ),
    _Route(
        "POST",
        "/v1/billing/meter_events",
        billing_params.MeterEventCreateParams,
        _Api.create_meter_event,
    ),
    _Route("POST", "/v1/prices", v1_params.PriceCreateParams, _Api.create_price),
    _Route("GET", "/v1/prices", v1_params.PriceListParams, _Api.list_prices),
    _Route("GET", "/v1/prices/{id}", v1_params.PriceRetrieveParams, _Api.retrieve_price),
    _Route("POST", "/v1/invoiceitems", v1_params.InvoiceItemCreateParams, _Api.create_invoice_item),
    _Route("GET", "/v1/invoiceitems", v1_params.InvoiceItemListParams, _Api.list_invoice_items),
    _Route(
        "GET",
        "/v1/invoiceitems/{id}",
        v1_params.InvoiceItemRetrieveParams,
        _Api.retrieve_invoice_item,
    ),
    _Route("POST", "/v1/invoices", v1_params.InvoiceCreateParams, _Api.create_invoice),
    _Route("GET", "/v1/invoices", v1_params.InvoiceListParams, _Api.list_invoices),
    _Route("GET", "/v1/invoices/{id}", v1_params.InvoiceRetrieveParams, _Api.retrieve_invoice),
    _Route(
        "GET",
        "/v1/invoices/{id}/lines",
        v1_params.InvoiceLineItemListParams,
        _Api.list_invoice_lines,
    ),
    _Route(
        "POST",
        "/v1/invoices/{id}/finalize",
        v1_params.InvoiceFinalizeInvoiceParams,
        _Api.finalize_invoice,
    ),
    _Route("POST", "/v1/invoices/{id}/pay", v1_params.InvoicePayParams, _Api.pay_invoice),
    _Route("POST", "/v1/invoices/{id}/void", v1_params.InvoiceVoidInvoiceParams, _Api.void_invoice),
    _Route(
        "POST",
        "/v2/billing/meter_event_session",
        v2_billing_params.MeterEventSessionCreateParams,
        _Api.create_meter_event_session,
        body="json",
    ),
    _Route(
        "POST",
        "/v2/billing/meter_event_stream",
        v2_billing_params.MeterEventStreamCreateParams,
        _Api.create_meter_event_stream,
        body="json",
        auth="meter_event_session",
    ),
)
"""The dispatch table: the first route whose method and path match handles a request."""


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class FaultPlan:
    """Which requests fail, and how: each API request fails with probability ``rate``,
    with a kind drawn from ``kinds``; every API request first waits ``delay`` seconds.
    A seeded plan fails the same requests in the same order on every run."""

    rate: float = 0.0
    kinds: tuple[str, ...] = ("429", "500")
    seed: int | None = None
    delay: float = 0.0
    timeout: float = 2.0  # how long a `timeout` fault holds the response back

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate must be within [0, 1], got {self.rate}")
        if not self.kinds or not set(self.kinds) <= FAULT_KINDS:
            raise ValueError(
                f"fault kinds must be a non-empty subset of {sorted(FAULT_KINDS)}, got {self.kinds}"
            )
        if self.delay < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay}")


def _fault_error(kind: str) -> _ApiError:
    if kind == "lock_timeout":
        # Stripe asks clients to retry lock timeouts, and the SDK obeys the header.
        return _ApiError(
            429,
            "This object cannot be accessed right now because another API "
            "request or Stripe process is currently accessing it.",
            code="lock_timeout",
            should_retry=True,
        )
    if kind == "429":
        # A rate limit is not retried by the SDK (it would add to the contention); the
        # caller must back off. Stripe answers `rate_limit` under invalid_request_error.
        return _ApiError(
            429,
            "Request rate limit exceeded. (injected by the Stripe double)",
            code="rate_limit",
            should_retry=False,
        )
    # The fault happened before any effect, so a retry with the same key is safe.
    return _ApiError(
        500,
        "An unknown error occurred (injected by the Stripe double).",
        type_="api_error",
        should_retry=True,
    )


# ------------------------------------------------------------------ public surface


@dataclass(frozen=True)
class DoubleSnapshot:
    """A deep copy of the double's state, for assertions; changing it changes nothing."""

    customers: tuple[JSON, ...]
    meters: tuple[JSON, ...]
    meter_events: tuple[JSON, ...]
    invoice_items: tuple[JSON, ...]
    prices: tuple[JSON, ...]
    invoices: tuple[JSON, ...]
    dropped_stream_events: tuple[JSON, ...]
    request_counts: Mapping[str, int]
    """Requests received per route (``"POST /v1/billing/meter_events"``), faulted or not;
    unrouted requests are counted under ``"<METHOD> <path>"``."""
    faults_injected: int

    def to_json(self) -> JSON:
        """The snapshot as plain JSON, as served by ``GET /_double/state``."""
        return {
            "customers": list(self.customers),
            "meters": list(self.meters),
            "meter_events": list(self.meter_events),
            "invoice_items": list(self.invoice_items),
            "prices": list(self.prices),
            "invoices": list(self.invoices),
            "dropped_stream_events": list(self.dropped_stream_events),
            "request_counts": dict(self.request_counts),
            "faults_injected": self.faults_injected,
        }


@dataclass
class _Replay:
    fingerprint: str
    response: _Response


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], double: StripeDouble) -> None:
        super().__init__(address, _RequestHandler)
        self.double = double


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's requests session expects
    # Headers and body go out in two writes; with Nagle on, the second waits for the
    # client's delayed ACK (~40 ms per request on keep-alive connections).
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {key.lower(): value for key, value in self.headers.items()}
        response = self.server.double._handle(self.command, url.path, url.query, headers, body)
        payload = json.dumps(response.body).encode()
        self.send_response(response.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        try:
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a `timeout` fault)

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("stripe-double %s", format % args)


class StripeDouble:
    """An in-memory Stripe served over HTTP on 127.0.0.1; see the module docstring.

    ``StripeDouble(port=0)`` binds a free port on :meth:`start`; use it as a context
    manager in tests. All state sits behind one lock, so concurrent requests are safe
    and each is applied atomically.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, clock: Callable[[], float] = time.time
    ) -> None:
        self._address = (host, port)
        self._clock = clock
        self._lock = threading.Lock()
        self._api = _Api()
        self._replays: dict[str, _Replay] = {}
        self._counts: Counter[str] = Counter()
        self._faults_injected = 0
        self._plan = FaultPlan()
        self._rng = random.Random()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> StripeDouble:
        """Bind and serve in a background thread; returns self."""
        if self._server is not None:
            raise RuntimeError("StripeDouble is already started")
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="stripe-double",
            daemon=True,
        )
        self._thread.start()
        _log.info("stripe double listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and release the port; state is kept (see :meth:`reset`)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> StripeDouble:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base address for the SDK, e.g. ``http://127.0.0.1:43127`` (no trailing slash)."""
        if self._server is None:
            raise RuntimeError("StripeDouble is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- test controls

    def faults(
        self,
        rate: float = 0.0,
        kinds: Sequence[str] = ("429", "500"),
        seed: int | None = None,
        delay: float = 0.0,
        timeout: float = 2.0,
    ) -> FaultPlan:
        """Inject faults into API requests from now on; ``faults()`` turns them off.

        ``kinds`` is drawn from :data:`FAULT_KINDS`. A faulted request has no effect,
        except ``timeout``: it takes effect and its response is held ``timeout`` seconds.
        """
        plan = FaultPlan(rate=rate, kinds=tuple(kinds), seed=seed, delay=delay, timeout=timeout)
        with self._lock:
            self._plan = plan
            self._rng = random.Random(seed)
        return plan

    def reset(self) -> None:
        """Forget every object, idempotency key, count and fault plan."""
        with self._lock:
            self._api = _Api()
            self._replays.clear()
            self._counts.clear()
            self._faults_injected = 0
            self._plan = FaultPlan()
            self._rng = random.Random()

    def inspect(self) -> DoubleSnapshot:
        """A consistent deep copy of the current state."""
        with self._lock:
            api = self._api
            state = copy.deepcopy(
                (
                    tuple(api.customers.values()),
                    tuple(api.meters.values()),
                    tuple(api.meter_events),
                    tuple(api.invoice_items.values()),
                    tuple(api.prices.values()),
                    tuple(api.render_invoice(i) for i in api.invoices.values()),
                    tuple(api.dropped_stream_events),
                )
            )
            counts, faults_injected = dict(self._counts), self._faults_injected
        customers, meters, meter_events, invoice_items, prices, invoices, dropped = state
        return DoubleSnapshot(
            customers=customers,
            meters=meters,
            meter_events=meter_events,
            invoice_items=invoice_items,
            prices=prices,
            invoices=invoices,
            dropped_stream_events=dropped,
            request_counts=MappingProxyType(counts),
            faults_injected=faults_injected,
        )

    # -- request handling

    def _handle(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> _Response:
        """Answer one HTTP request (``headers`` keyed in lower case). Never raises."""
        try:
            if path.startswith("/_double/"):
                response = self._control(method, path, body)
            else:
                response = self._api_request(method, path, query, headers, body)
        except _ApiError as error:
            response = error.response()
        except Exception:
            _log.exception("stripe double failed on %s %s", method, path)
            response = _ApiError(
                500, "The Stripe double crashed; see its log.", type_="api_error"
            ).response()
        return _Response(
            response.status, response.body, {"Request-Id": _new_id("req"), **response.headers}
        )

    def _api_request(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> _Response:
        route, path_params = _match(method, path)
        with self._lock:
            self._counts[route.key if route else f"{method} {path}"] += 1
        if route is None:
            raise _ApiError(404, f"Unrecognized request URL ({method}: {path}).")
        self._authenticate(route, headers)
        hold = self._maybe_fault()
        try:
            return self._apply(route, path_params, method, path, query, headers, body)
        finally:
            if hold:
                time.sleep(hold)  # a lost response: the effect is done, the answer comes late

    def _apply(
        self,
        route: _Route,
        path_params: dict[str, str],
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> _Response:
        params = self._params(route, method, query, body)
        route.spec.check(params)
        call = _Call(params=params, path=path_params, now=int(self._clock()))
        key = headers.get("idempotency-key") if method == "POST" else None
        fingerprint = json.dumps([method, path, params], sort_keys=True)
        with self._lock:
            if key is not None and key in self._replays:
                replay = self._replays[key]
                if replay.fingerprint != fingerprint:
                    raise _ApiError(
                        400,
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with. Try using a key other "
                        f"than '{key}' if you meant to execute a different request.",
                        type_="idempotency_error",
                    )
                stored = replay.response
                return _Response(
                    stored.status,
                    stored.body,
                    {**stored.headers, "Idempotent-Replayed": "true", "Idempotency-Key": key},
                )
            try:
                response = _Response(200, route.handler(self._api, call))
            except _ApiError as error:
                response = error.response()
            # Snapshot the body: later requests mutate the live objects it came from.
            response = _Response(response.status, copy.deepcopy(response.body), response.headers)
            if key is not None:
                self._replays[key] = _Replay(fingerprint, response)
                if len(self._replays) > _MAX_REMEMBERED_KEYS:
                    del self._replays[next(iter(self._replays))]  # dicts keep insertion order
        if key is not None:
            return _Response(
                response.status, response.body, {**response.headers, "Idempotency-Key": key}
            )
        return response

    def _authenticate(self, route: _Route, headers: Mapping[str, str]) -> None:
        token = _bearer(headers.get("authorization", ""))
        if route.auth == "meter_event_session":
            with self._lock:
                expires_at = self._api.sessions.get(token or "")
            if expires_at is None:
                raise _ApiError(
                    401,
                    "A valid meter event session authentication token is required.",
                    code="authentication_failed",
                )
            if expires_at <= self._clock():
                raise _ApiError(
                    401, "The meter event session has expired.", type_="temporary_session_expired"
                )
            return
        if not token:
            raise _ApiError(
                401,
                "You did not provide an API key. You need to provide your "
                "API key in the Authorization header, using Bearer auth "
                "(e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
            )
        if not token.startswith("sk_test_"):
            raise _ApiError(401, f"Invalid API Key provided: {token[:8]}****{token[-4:]}")

    def _maybe_fault(self) -> float:
        """Raise an injected fault, or return how long to hold the response back."""
        with self._lock:
            plan = self._plan
            kind = None
            if plan.rate and self._rng.random() < plan.rate:
                kind = self._rng.choice(plan.kinds)
                self._faults_injected += 1
        if plan.delay:
            time.sleep(plan.delay)  # outside the lock: a slow request must not stall others
        if kind == "timeout":
            return plan.timeout
        if kind is not None:
            raise _fault_error(kind)
        return 0.0

    @staticmethod
    def _params(route: _Route, method: str, query: str, body: bytes) -> JSON:
        if method != "POST":
            return parse_form(query)
        text = body.decode("utf-8", errors="replace")
        if route.body == "form":
            return parse_form(text)
        try:
            decoded = json.loads(text or "{}")
        except json.JSONDecodeError as error:
            raise _ApiError(400, f"Invalid JSON body: {error}") from error
        if not isinstance(decoded, dict):
            raise _ApiError(400, "The JSON body must be an object.")
        return decoded

    def _control(self, method: str, path: str, body: bytes) -> _Response:
        """The double's own endpoints, for demos and other processes (no auth)."""
        if (method, path) == ("GET", "/_double/state"):
            return _Response(200, self.inspect().to_json())
        if (method, path) == ("POST", "/_double/reset"):
            self.reset()
            return _Response(200, {"reset": True})
        if (method, path) == ("POST", "/_double/faults"):
            try:
                spec = json.loads(body or b"{}")
                plan = self.faults(
                    rate=float(spec.get("rate", 0.0)),
                    kinds=tuple(spec.get("kinds", ("429", "500"))),
                    seed=spec.get("seed"),
                    delay=float(spec.get("delay", 0.0)),
                    timeout=float(spec.get("timeout", 2.0)),
                )
            except (ValueError, TypeError, AttributeError) as error:
                raise _ApiError(400, f"Invalid fault plan: {error}") from error
            return _Response(
                200,
                {
                    "rate": plan.rate,
                    "kinds": list(plan.kinds),
                    "seed": plan.seed,
                    "delay": plan.delay,
                },
            )
        raise _ApiError(404, f"Unrecognized request URL ({method}: {path}).")


def _match(method: str, path: str) -> tuple[_Route | None, dict[str, str]]:
    for route in _ROUTES:
        if route.method == method and (match := route.pattern.match(path)):
            return route, match.groupdict()
    return None, {}


def _bearer(authorization: str) -> str | None:
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return credential.strip() or None
    if scheme.lower() == "basic":  # `curl -u sk_test_...:`
        try:
            return base64.b64decode(credential).decode().partition(":")[0] or None
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Run the double in the foreground until SIGTERM or SIGINT; exit 0."""
    parser = argparse.ArgumentParser(
        prog="python -m billing_jobs.stripe_double", description="Serve the Stripe double."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111, help="0 picks a free port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        _log.info("stripe double stopping on %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # Serve from a worker thread: shutdown() called from the serving thread deadlocks.
    with StripeDouble(host=args.host, port=args.port) as double:
        print(f"stripe double listening on {double.url}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
