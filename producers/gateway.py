"""HTTP ingest gateway: services that cannot embed the SDK POST CloudEvents here.

API
    POST /v1/events     one CloudEvent or a batch (JSON array) of them
    GET  /healthz       200 {"status": "ok", "kafka": "connected" | "spooling", ...}
    GET  /metrics       Prometheus text format

Decisions
- **Auth.** `Authorization: Bearer <token>`, looked up in the tokens file
  (runtime/credentials.py: a token names its service, its tenants and its scopes). Missing
  or unknown token: 401. The service name is the allowed `source` prefix: an event's
  `source` must be the service name or start with "<service>/", so one service cannot
  publish as another. An event without `source` gets the service name.
- **Tenants and scopes: all or nothing.** Every event must be for one of the token's
  tenants (`subject`) and of a kind its scopes allow (`usage` for tally.usage.v1,
  `subscriptions` for tally.subscription.*.v1). One event outside them and the whole
  request is refused with 403, nothing published, every offending event listed by index
  with the rules it breaks (`tenant_not_allowed`, `scope_missing`)::

      {"error": "forbidden: ...", "accepted": 0, "rejected": 3, "forbidden": 1,
       "errors": [{"index": 1, "id": "...", "problems": [{"field": "subject",
                   "rule": "tenant_not_allowed", "message": "tenant not allowed: ..."}]}],
       "errors_omitted": 0}

  Unlike invalid events (below), a forbidden one is not a slip to fix and resend alone: it
  means the client holds the wrong token or is not what it claims, and publishing the
  rest of its request would act on a request Tally refuses.
- **Content types.** `application/cloudevents+json` (one event object),
  `application/cloudevents-batch+json` (an array), or `application/json`, told apart by
  the first non-blank byte (`{` or `[`). Anything else: 415. A body of the wrong shape
  for its declared type, or that is not JSON: 400 `{"error": ...}`.
- **Mixed batches: partial acceptance.** Valid events are published, invalid ones are
  reported; the answer is 202 when at least one event was accepted, 400 when none was.
  Both carry the same body::

      {"accepted": 2, "rejected": 1,
       "errors": [{"index": 1, "id": "...", "problems": [{"field": "data.quantity",
                                                          "message": "..."}]}],
       "errors_omitted": 0}

  A client fixes and resends only the rejected events; resending the whole batch is
  also safe, because consumers dedup by (tenant, event id).
- **What 202 promises.** The gateway publishes through the SDK (`UsageProducer`), so
  events are batched per tenant and spooled when Kafka is away. The answer is sent only
  after every accepted event was acknowledged by Kafka (acks=all) or written to the
  gateway's local spool — never merely buffered in memory. When neither can take them
  (Kafka away and the spool at `spool_max_bytes`), the answer is 503 with `Retry-After`;
  the client resends with the same ids (any event of the request that was taken counts
  once).
- **Size limit.** A body over `max_body_bytes` is refused with 413 (from Content-Length
  before reading, or while reading when there is none).
- **Bounded answers.** An error body lists the first MAX_REPORTED_EVENTS events at fault
  (`errors_omitted` counts the rest), at most MAX_PROBLEMS_PER_EVENT problems each, and
  clips every echoed text to MAX_ECHO_CHARS: a body of half a million bad items gets a
  few kilobytes back, not fifty megabytes.
- **Metrics.** `tally_gateway_requests_total` is labelled by route (`/v1/events`,
  `/healthz`, `/metrics`, or `other` for any path the gateway does not serve) and status,
  so random paths cannot create new series.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from producers import metrics
from producers.encoding import TallyEvent
from producers.errors import ProducerError
from producers.options import ProducerOptions
from producers.producer import UsageProducer
from runtime.credentials import Credential, Tokens, authorize, scope_to_publish
from runtime.settings import Settings, state_dir
from schemas import codec
from schemas.events import SUBSCRIPTION_TYPES, USAGE_TYPE, SubscriptionEvent, UsageEvent
from schemas.validation import future_problem

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20
JSON_CONTENT_TYPE = "application/json"
# Told to clients refused with 503 (Kafka away, and the spool full or absent): about the
# longest wait between the producer's reconnection attempts.
RETRY_AFTER_SECONDS = "5"
_ACCEPTED_TYPES = (codec.SINGLE_CONTENT_TYPE, codec.BATCH_CONTENT_TYPE, JSON_CONTENT_TYPE)
# Bounds of an error body (see "Bounded answers" above).
MAX_REPORTED_EVENTS = 20
MAX_PROBLEMS_PER_EVENT = 10
MAX_ECHO_CHARS = 200
OTHER_ROUTE = "other"

_PRODUCER_KEY = web.AppKey("producer", UsageProducer)
_TOKENS_KEY = web.AppKey("tokens", Tokens)
_MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
_MAX_FUTURE_KEY = web.AppKey("max_future", timedelta)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: object, status: int) -> web.Response:
    return web.Response(body=codec.dumps(body), status=status, content_type=JSON_CONTENT_TYPE)


def _error(status: int, message: str, **headers: str) -> web.Response:
    response = _json({"error": message}, status)
    response.headers.update(headers)
    return response


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "..."


def _problem(field: str, message: str, **extra: str) -> dict[str, str]:
    return {"field": _clip(field), **extra, "message": _clip(message)}


def _event_id(raw: Any) -> str | None:
    event_id = raw.get("id") if isinstance(raw, dict) else None
    return _clip(event_id) if isinstance(event_id, str) else None


def _report(index: int, raw: Any, problems: list[dict[str, str]]) -> dict[str, Any]:
    """One event's entry in an error body, its problems bounded."""
    shown = problems[:MAX_PROBLEMS_PER_EVENT]
    if len(problems) > len(shown):
        shown.append(_problem("", f"and {len(problems) - len(shown)} more problems"))
    return {"index": index, "id": _event_id(raw), "problems": shown}


def _parse_event(raw: Any, service: str,
                 max_future: timedelta) -> TallyEvent | list[dict[str, str]]:
    """The validated event, or its problems (every one the model finds; a usage event's
    time is also held to `max_future` ahead of the wall clock, schemas/validation.py)."""
    if not isinstance(raw, dict):
        return [_problem("", "an event must be a JSON object")]
    if "source" not in raw:
        raw = {**raw, "source": service}
    kind = raw.get("type")
    model: type[UsageEvent] | type[SubscriptionEvent]
    if kind == USAGE_TYPE:
        model = UsageEvent
    elif kind in SUBSCRIPTION_TYPES:
        model = SubscriptionEvent
    else:
        allowed = ", ".join((USAGE_TYPE, *SUBSCRIPTION_TYPES))
        shown = repr(kind) if isinstance(kind, str) else "missing or not a string"
        return [_problem("type", f"unknown event type {shown}; one of: {allowed}")]
    try:
        event = model.model_validate(raw)
    except ValidationError as e:
        return [_problem(".".join(str(p) for p in item["loc"]), item["msg"])
                for item in e.errors()]
    if event.source != service and not event.source.startswith(service + "/"):
        return [_problem("source",
                         f"source must be {service!r} or start with {service + '/'!r}")]
    if isinstance(event, UsageEvent) and (
        problem := future_problem(event.time, datetime.now(UTC), max_future)
    ) is not None:
        return [_problem("time", problem)]
    return event


def _forbidden(raw: Any, credential: Credential) -> list[dict[str, str]]:
    """The rules publishing `raw` breaks. Judged on the raw fields, before validation, so
    an event for a tenant the token lacks is refused whatever else is wrong with it."""
    if not isinstance(raw, dict):
        return []
    subject, kind = raw.get("subject"), raw.get("type")
    scope = scope_to_publish(kind) if isinstance(kind, str) else None
    if not isinstance(subject, str) or scope is None:
        return []  # not an event Tally could publish: validation reports it
    return [_problem("subject" if d.rule == "tenant_not_allowed" else "type", d.message,
                     rule=d.rule)
            for d in authorize(credential, subject, scope)]


class _Faults:
    """Events at fault in a request: the first MAX_REPORTED_EVENTS reported in full, the
    rest only counted, so neither the answer nor the memory behind it grows with them."""

    def __init__(self) -> None:
        self.count = 0
        self.reports: list[dict[str, Any]] = []

    def add(self, index: int, raw: Any, problems: list[dict[str, str]]) -> None:
        self.count += 1
        if len(self.reports) < MAX_REPORTED_EVENTS:
            self.reports.append(_report(index, raw, problems))

    def body(self) -> dict[str, Any]:
        return {"errors": self.reports, "errors_omitted": self.count - len(self.reports)}


async def _post_events(request: web.Request) -> web.Response:
    credential = request.app[_TOKENS_KEY].authenticate(request.headers.get("Authorization"))
    if credential is None:
        return _error(401, "missing or unknown bearer token",
                      **{"WWW-Authenticate": 'Bearer realm="tally"'})
    content_type = request.content_type
    if content_type not in _ACCEPTED_TYPES:
        return _error(415, f"content type must be one of {', '.join(_ACCEPTED_TYPES)}")
    limit = request.app[_MAX_BODY_KEY]
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"body larger than {limit} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"body larger than {limit} bytes")
    head = body.lstrip(b" \t\r\n")[:1]
    try:
        parsed = codec.loads(body)
    except ValueError as e:
        return _error(400, f"malformed JSON: {_clip(str(e))}")
    if content_type == codec.SINGLE_CONTENT_TYPE and head != b"{":
        return _error(400, f"{codec.SINGLE_CONTENT_TYPE} needs one event object")
    if content_type == codec.BATCH_CONTENT_TYPE and head != b"[":
        return _error(400, f"{codec.BATCH_CONTENT_TYPE} needs a JSON array of events")
    if isinstance(parsed, dict):
        raws: list[Any] = [parsed]
    elif isinstance(parsed, list) and parsed:
        raws = parsed
    else:
        return _error(400, "body must be an event object or a non-empty array of events")

    forbidden = _Faults()
    for index, raw in enumerate(raws):
        if denials := _forbidden(raw, credential):
            forbidden.add(index, raw, denials)
    if forbidden.count:
        metrics.GATEWAY_EVENTS.labels("forbidden").inc(len(raws))
        log.warning("ingest: token of %s refused for %d of %d events (tenants or scopes)",
                    credential.service, forbidden.count, len(raws))
        return _json({"error": f"forbidden: {forbidden.count} of {len(raws)} events are "
                               "outside this token's tenants or scopes; nothing was published",
                      "accepted": 0, "rejected": len(raws), "forbidden": forbidden.count,
                      **forbidden.body()}, 403)

    accepted: list[TallyEvent] = []
    invalid = _Faults()
    for index, raw in enumerate(raws):
        result = _parse_event(raw, credential.service, request.app[_MAX_FUTURE_KEY])
        if isinstance(result, list):
            invalid.add(index, raw, result)
        else:
            accepted.append(result)
    metrics.GATEWAY_EVENTS.labels("accepted").inc(len(accepted))
    metrics.GATEWAY_EVENTS.labels("rejected").inc(invalid.count)
    if accepted:
        try:
            # Returns once each batch is acknowledged by Kafka or in the spool (see above).
            await request.app[_PRODUCER_KEY].publish(accepted, wait=True)
        except ProducerError as e:
            log.error("ingest: %d events not stored: %s", len(accepted), e)
            return _error(503, f"events could not be stored, retry with the same ids: {e}",
                          **{"Retry-After": RETRY_AFTER_SECONDS})
    body_out = {"accepted": len(accepted), "rejected": invalid.count, **invalid.body()}
    return _json(body_out, 202 if accepted else 400)


async def _healthz(request: web.Request) -> web.Response:
    producer = request.app[_PRODUCER_KEY]
    return _json(
        {
            "status": "ok",
            # Spooling is degraded, not down: events are still accepted durably.
            "kafka": "connected" if producer.connected else "spooling",
            "spooled_records": producer.spooled_records,
            "buffered_events": producer.buffered_events,
        },
        200,
    )


async def _metrics(request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def _route(request: web.Request) -> str:
    """The metric label of a request: its route's path, from the fixed set the gateway
    serves, or OTHER_ROUTE (never the path asked for: each would be a new series)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else OTHER_ROUTE


@web.middleware
async def _count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as e:
        metrics.GATEWAY_REQUESTS.labels(_route(request), str(e.status)).inc()
        raise
    metrics.GATEWAY_REQUESTS.labels(_route(request), str(response.status)).inc()
    return response


def create_gateway_app(
    producer: UsageProducer, tokens: Tokens, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> web.Application:
    """The gateway's aiohttp application, publishing through a started `producer`.

    `tokens`: the credentials it accepts. The caller owns the producer's lifecycle.
    """
    # aiohttp enforces the limit itself too, for bodies without a Content-Length.
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_count_requests])
    app[_PRODUCER_KEY] = producer
    app[_TOKENS_KEY] = tokens
    app[_MAX_BODY_KEY] = max_body_bytes
    app[_MAX_FUTURE_KEY] = producer.settings.max_future
    app.router.add_post("/v1/events", _post_events)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app


def default_gateway_options() -> ProducerOptions:
    """Producer options of a gateway started by `serve`: a spool under the state dir."""
    return ProducerOptions(
        source="tally/ingest-gateway", spool_dir=state_dir() / "spool" / "ingest-gateway"
    )


async def serve(
    settings: Settings, port: int, tokens: Tokens, *, host: str | None = None,
    options: ProducerOptions | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Run the gateway until cancelled or SIGTERM/SIGINT; then stop accepting and flush.

    It listens on `host`, by default the setting `gateway_host` (loopback unless set).

    Shutdown order: flush the producer, so requests in flight (each waits for its events
    to be acknowledged or spooled) can answer; stop listening and let them finish; close
    the producer (flush again, fsync the spool).
    """
    host = host or settings.gateway_host
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        async with UsageProducer(settings, options or default_gateway_options()) as producer:
            runner = web.AppRunner(create_gateway_app(producer, tokens, max_body_bytes))
            await runner.setup()
            try:
                await web.TCPSite(runner, host, port).start()
                log.info("ingest gateway listening on %s:%d", host, port)
                await stop.wait()
            finally:
                log.info("ingest gateway stopping")
                # Flush first: requests in flight are waiting for their events' acks, and
                # the cleanup below waits for those requests.
                await producer.flush()
                await runner.cleanup()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


__all__ = ["DEFAULT_MAX_BODY_BYTES", "MAX_REPORTED_EVENTS", "create_gateway_app",
           "default_gateway_options", "serve"]

