"""HTTP ingest gateway: services that cannot embed the SDK POST CloudEvents here.

API
    POST /v1/events     one CloudEvent or a batch (JSON array) of them
    GET  /healthz       200 {"status": "ok", "kafka": "connected" | "spooling", ...}
    GET  /metrics       Prometheus text format

Decisions
- **Auth.** `Authorization: Bearer <token>`; `tokens` maps each token to a service name.
  The service name is the allowed `source` prefix: an event's `source` must be the
  service name or start with "<service>/", so one service cannot publish as another.
  An event without `source` gets the service name. Missing or unknown token: 401.
- **Content types.** `application/cloudevents+json` (one event object),
  `application/cloudevents-batch+json` (an array), or `application/json`, told apart by
  the first non-blank byte (`{` or `[`). Anything else: 415. A body of the wrong shape
  for its declared type, or that is not JSON: 400 `{"error": ...}`.
- **Mixed batches: partial acceptance.** Valid events are published, invalid ones are
  reported; the answer is 202 when at least one event was accepted, 400 when none was.
  Both carry the same body::

      {"accepted": 2, "rejected": 1,
       "errors": [{"index": 1, "id": "...", "problems": [{"field": "data.quantity",
                                                          "message": "..."}]}]}

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
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
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

_PRODUCER_KEY = web.AppKey("producer", UsageProducer)
_TOKENS_KEY = web.AppKey("tokens", dict)
_MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
_MAX_FUTURE_KEY = web.AppKey("max_future", timedelta)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: object, status: int) -> web.Response:
    return web.Response(body=codec.dumps(body), status=status, content_type=JSON_CONTENT_TYPE)


def _error(status: int, message: str, **headers: str) -> web.Response:
    response = _json({"error": message}, status)
    response.headers.update(headers)
    return response


def _service_for(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    token = token.strip()
    service = None
    # Compare against every token in constant time: no timing hint of a near miss.
    for known, name in request.app[_TOKENS_KEY].items():
        if hmac.compare_digest(known.encode(), token.encode()):
            service = name
    return service


def _parse_event(raw: Any, service: str,
                 max_future: timedelta) -> TallyEvent | list[dict[str, str]]:
    """The validated event, or its problems (every one the model finds; a usage event's
    time is also held to `max_future` ahead of the wall clock, schemas/validation.py)."""
    if not isinstance(raw, dict):
        return [{"field": "", "message": "an event must be a JSON object"}]
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
        return [{"field": "type", "message": f"unknown event type {kind!r}; one of: {allowed}"}]
    try:
        event = model.model_validate(raw)
    except ValidationError as e:
        return [
            {"field": ".".join(str(p) for p in item["loc"]), "message": item["msg"]}
            for item in e.errors()
        ]
    if event.source != service and not event.source.startswith(service + "/"):
        return [{"field": "source",
                 "message": f"source must be {service!r} or start with {service + '/'!r}"}]
    if isinstance(event, UsageEvent) and (
        problem := future_problem(event.time, datetime.now(UTC), max_future)
    ) is not None:
        return [{"field": "time", "message": problem}]
    return event


async def _post_events(request: web.Request) -> web.Response:
    service = _service_for(request)
    if service is None:
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
        return _error(400, f"malformed JSON: {e}")
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

    accepted: list[TallyEvent] = []
    errors = []
    for index, raw in enumerate(raws):
        result = _parse_event(raw, service, request.app[_MAX_FUTURE_KEY])
        if isinstance(result, list):
            event_id = raw.get("id") if isinstance(raw, dict) else None
            errors.append({"index": index, "id": event_id, "problems": result})
        else:
            accepted.append(result)
    metrics.GATEWAY_EVENTS.labels("accepted").inc(len(accepted))
    metrics.GATEWAY_EVENTS.labels("rejected").inc(len(errors))
    if accepted:
        try:
            # Returns once each batch is acknowledged by Kafka or in the spool (see above).
            await request.app[_PRODUCER_KEY].publish(accepted, wait=True)
        except ProducerError as e:
            log.error("ingest: %d events not stored: %s", len(accepted), e)
            return _error(503, f"events could not be stored, retry with the same ids: {e}",
                          **{"Retry-After": RETRY_AFTER_SECONDS})
    body_out = {"accepted": len(accepted), "rejected": len(errors), "errors": errors}
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


@web.middleware
async def _count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as e:
        metrics.GATEWAY_REQUESTS.labels(request.path, str(e.status)).inc()
        raise
    metrics.GATEWAY_REQUESTS.labels(request.path, str(response.status)).inc()
    return response


def create_gateway_app(
    producer: UsageProducer, tokens: Mapping[str, str],
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> web.Application:
    """The gateway's aiohttp application, publishing through a started `producer`.

    `tokens` maps bearer token -> service name. The caller owns the producer's lifecycle.
    """
    # aiohttp enforces the limit itself too, for bodies without a Content-Length.
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_count_requests])
    app[_PRODUCER_KEY] = producer
    app[_TOKENS_KEY] = dict(tokens)
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
    settings: Settings, host: str, port: int, tokens: dict[str, str], *,
    options: ProducerOptions | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Run the gateway until cancelled or SIGTERM/SIGINT; then stop accepting and flush.

    Shutdown order: flush the producer, so requests in flight (each waits for its events
    to be acknowledged or spooled) can answer; stop listening and let them finish; close
    the producer (flush again, fsync the spool).
    """
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


__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_gateway_app", "default_gateway_options", "serve"]

