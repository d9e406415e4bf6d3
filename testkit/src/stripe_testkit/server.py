"""The double's HTTP server: authentication, dispatch, the idempotency and fault
steps every API request goes through, webhook delivery, and the control endpoints
(``/_double/...``).

An API request is answered in this order: count it, route it (404 if unknown),
authenticate it (401), check its ``Stripe-Version`` (400 unless it is of the release the
OpenAPI document describes), read its parameters and check them against Stripe's OpenAPI
document and documented limits (every problem is recorded in
:attr:`DoubleSnapshot.invalid_requests`), draw a fault (an injected error leaves no effect
and does not consume the idempotency key, except the ``stored_500`` kinds), refuse the
request with its first problem (400), then, with the lock held, replay the response
stored under its idempotency key or run the handler and store its response under the
key. A ``timeout`` fault lets the request through and holds the answer back afterwards.

Time is the double's clock: ``clock()`` (wall time by default) plus what
:meth:`StripeDouble.advance` added. Idempotency keys and meter event identifiers are
forgotten ``memory`` seconds (24 hours) after their first use on that clock.

Thin events (meter error reports) are delivered to the webhook URL set by
:meth:`StripeDouble.webhooks`, signed like Stripe's (``Stripe-Signature: t=...,v1=...``,
HMAC-SHA256 with the endpoint secret; the signature's ``t`` is wall time, so a receiver's
tolerance check passes whatever the double's clock says), from a background thread,
retried a few times; each delivery is in :attr:`DoubleSnapshot.webhook_deliveries`.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType, TracebackType
from typing import Any
from urllib.parse import urlsplit

from stripe_testkit.errors import JSON, ApiError, Response
from stripe_testkit.faults import STORED_KINDS, FaultInjector, FaultPlan, fault_error
from stripe_testkit.idempotency import ReplayStore, fingerprint
from stripe_testkit.invoices import render_invoice
from stripe_testkit.openapi import Problem, check_idempotency_key, check_version
from stripe_testkit.params import parse_form
from stripe_testkit.routes import Route, find_route
from stripe_testkit.state import DAY, Call, State, new_id

__all__ = ["DoubleSnapshot", "StripeDouble", "sign"]

_log = logging.getLogger("stripe_testkit")


@dataclass(frozen=True)
class DoubleSnapshot:
    """A deep copy of the double's state, for assertions; changing it changes nothing."""

    customers: tuple[JSON, ...]
    meters: tuple[JSON, ...]
    meter_events: tuple[JSON, ...]
    invoice_items: tuple[JSON, ...]
    prices: tuple[JSON, ...]
    invoices: tuple[JSON, ...]
    rejected_meter_events: tuple[JSON, ...]
    """Meter events accepted, then dropped by the asynchronous checks (v1 and v2 stream):
    ``{"event", "code", "message"}``."""
    events: tuple[JSON, ...]
    """The v2 (thin) events, with their data (meter error reports)."""
    webhook_deliveries: tuple[JSON, ...]
    """``{"event", "type", "url", "status", "attempts"}`` per notification handed to the
    delivery thread (status None while undelivered or when no URL answered)."""
    invalid_requests: tuple[JSON, ...]
    """Every request that broke the OpenAPI document or a documented limit:
    ``{"request", "problems": [{"param", "message"}]}``."""
    request_counts: Mapping[str, int]
    """Requests received per route (``"POST /v1/billing/meter_events"``), faulted or not;
    unrouted requests are counted under ``"<METHOD> <path>"``."""
    faults_injected: int
    now: int
    """The double's clock when the snapshot was taken."""

    def to_json(self) -> JSON:
        """The snapshot as plain JSON, as served by ``GET /_double/state``."""
        return {
            "customers": list(self.customers),
            "meters": list(self.meters),
            "meter_events": list(self.meter_events),
            "invoice_items": list(self.invoice_items),
            "prices": list(self.prices),
            "invoices": list(self.invoices),
            "rejected_meter_events": list(self.rejected_meter_events),
            "events": list(self.events),
            "webhook_deliveries": list(self.webhook_deliveries),
            "invalid_requests": list(self.invalid_requests),
            "request_counts": dict(self.request_counts),
            "faults_injected": self.faults_injected,
            "now": self.now,
        }


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
    """An in-memory Stripe served over HTTP on 127.0.0.1; see the package docstring.

    ``StripeDouble(port=0)`` binds a free port on :meth:`start`; use it as a context
    manager in tests. All state sits behind one lock, so concurrent requests are safe
    and each is applied atomically.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        *,
        memory: int = DAY,
        webhook_url: str | None = None,
        webhook_secret: str = "whsec_stripe_double",
    ) -> None:
        """``clock`` is the double's time (see :meth:`advance`); ``memory`` how long, in
        seconds on it, idempotency keys and meter event identifiers are remembered
        (Stripe: at least 24 hours); ``webhook_url`` where thin events are delivered."""
        self._address = (host, port)
        self._clock = clock
        self._offset = 0.0
        self._memory = memory
        self._lock = threading.Lock()
        self._state = State(memory)
        self._replays = ReplayStore(memory=memory)
        self._counts: Counter[str] = Counter()
        self._faults = FaultInjector()
        self._invalid: list[JSON] = []
        self._webhook = (webhook_url, webhook_secret)
        self._deliveries: list[JSON] = []
        self._outbox: queue.Queue[JSON | None] = queue.Queue()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._deliverer: threading.Thread | None = None

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
        self._deliverer = threading.Thread(
            target=self._deliver_forever, name="stripe-double-webhooks", daemon=True
        )
        self._deliverer.start()
        _log.info("stripe double listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and release the port; state is kept (see :meth:`reset`)."""
        server, thread, deliverer = self._server, self._thread, self._deliverer
        self._server = self._thread = self._deliverer = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()
        if deliverer is not None:
            self._outbox.put(None)
            deliverer.join()

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

    def now(self) -> int:
        """The double's clock, in whole seconds."""
        return int(self._clock() + self._offset)

    def advance(self, seconds: float) -> int:
        """Move the double's clock forward (24 hours: every key and identifier is
        forgotten); returns the new time."""
        if seconds < 0:
            raise ValueError("the double's clock only moves forward")
        with self._lock:
            self._offset += seconds
        return self.now()

    def webhooks(self, url: str | None, secret: str | None = None) -> None:
        """Deliver thin events to ``url`` (None: keep them undelivered), signed with
        ``secret`` (default: the one given before)."""
        with self._lock:
            self._webhook = (url, secret or self._webhook[1])

    def faults(
        self,
        rate: float = 0.0,
        kinds: Sequence[str] = ("429", "500"),
        seed: int | None = None,
        delay: float = 0.0,
        timeout: float = 2.0,
        routes: Sequence[str] = (),
        limit: int | None = None,
    ) -> FaultPlan:
        """Inject faults into API requests from now on; ``faults()`` turns them off.

        ``kinds`` is drawn from :data:`FAULT_KINDS`. A faulted request has no effect,
        except ``timeout`` (it takes effect and its response is held ``timeout`` seconds)
        and ``stored_500_applied``. ``routes`` (``"POST /v1/invoiceitems"``) limits the
        faults to those routes, ``limit`` their number.
        """
        plan = FaultPlan(rate=rate, kinds=tuple(kinds), seed=seed, delay=delay, timeout=timeout,
                         routes=tuple(routes), limit=limit)
        with self._lock:
            self._faults.use(plan)
        return plan

    def reset(self) -> None:
        """Forget every object, idempotency key, count, recorded problem and fault plan
        (the clock and the webhook URL stay)."""
        with self._lock:
            self._state = State(self._memory)
            self._replays.clear()
            self._counts.clear()
            self._faults = FaultInjector()
            self._invalid.clear()
            self._deliveries.clear()

    def inspect(self) -> DoubleSnapshot:
        """A consistent deep copy of the current state."""
        with self._lock:
            live = self._state
            copied = copy.deepcopy(
                (
                    tuple(live.customers.values()),
                    tuple(live.meters.values()),
                    tuple(live.meter_events),
                    tuple(live.invoice_items.values()),
                    tuple(live.prices.values()),
                    tuple(render_invoice(live, i) for i in live.invoices.values()),
                    tuple(live.rejected_meter_events),
                    tuple(live.events.values()),
                    tuple(self._deliveries),
                    tuple(self._invalid),
                )
            )
            counts, faults_injected = dict(self._counts), self._faults.injected
        (customers, meters, meter_events, invoice_items, prices, invoices, rejected, events,
         deliveries, invalid) = copied
        return DoubleSnapshot(
            customers=customers,
            meters=meters,
            meter_events=meter_events,
            invoice_items=invoice_items,
            prices=prices,
            invoices=invoices,
            rejected_meter_events=rejected,
            events=events,
            webhook_deliveries=deliveries,
            invalid_requests=invalid,
            request_counts=MappingProxyType(counts),
            faults_injected=faults_injected,
            now=self.now(),
        )

    # -- request handling

    def _handle(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> Response:
        """Answer one HTTP request (``headers`` keyed in lower case). Never raises."""
        try:
            if path.startswith("/_double/"):
                response = self._control(method, path, body)
            else:
                response = self._api_request(method, path, query, headers, body)
        except ApiError as error:
            response = error.response()
        except Exception:
            _log.exception("stripe double failed on %s %s", method, path)
            response = ApiError(
                500, "The Stripe double crashed; see its log.", type_="api_error"
            ).response()
        return Response(
            response.status, response.body, {"Request-Id": new_id("req"), **response.headers}
        )

    def _api_request(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> Response:
        route, path_params = find_route(method, path)
        with self._lock:
            self._counts[route.key if route else f"{method} {path}"] += 1
        if route is None:
            raise ApiError(404, f"Unrecognized request URL ({method}: {path}).")
        self._authenticate(route, headers)
        version_problem = check_version(headers.get("stripe-version"))
        if version_problem is not None:
            self._record_invalid(method, path, [version_problem])
            raise version_problem.error()
        params = self._params(route, method, query, body)
        key = headers.get("idempotency-key") if method == "POST" else None
        problems = route.operation.problems(params)
        key_problem = check_idempotency_key(key)
        if key_problem is not None:
            problems.insert(0, key_problem)
        if problems:
            self._record_invalid(method, path, problems)
        hold, stored = self._maybe_fault(route.key)
        if problems:
            raise problems[0].error()
        try:
            return self._apply(route, path_params, method, path, params, key, stored)
        finally:
            if hold:
                time.sleep(hold)  # a lost response: the effect is done, the answer comes late

    def _record_invalid(self, method: str, path: str, problems: list[Problem]) -> None:
        with self._lock:
            self._invalid.append(
                {
                    "request": f"{method} {path}",
                    "problems": [{"param": p.param, "message": p.message} for p in problems],
                }
            )

    def _apply(
        self,
        route: Route,
        path_params: dict[str, str],
        method: str,
        path: str,
        params: JSON,
        key: str | None,
        stored_fault: str | None,
    ) -> Response:
        request = fingerprint(method, path, params)
        with self._lock:
            call = Call(params=params, path=path_params, now=self.now())
            if key is not None:
                replayed = self._replays.replay(key, request, call.now)
                if replayed is not None:
                    return replayed
            try:
                if stored_fault == "stored_500":
                    raise fault_error(stored_fault)  # the API method failed before any effect
                response = Response(200, route.handler(self._state, call))
                if stored_fault == "stored_500_applied":
                    raise fault_error(stored_fault)  # ... or after it
            except ApiError as error:
                response = error.response()
            # Snapshot the body: later requests mutate the live objects it came from.
            response = Response(response.status, copy.deepcopy(response.body), response.headers)
            if key is not None:
                self._replays.store(key, request, response, call.now)
            self._hand_over_notifications()
        if key is not None:
            return Response(
                response.status, response.body, {**response.headers, "Idempotency-Key": key}
            )
        return response

    def _authenticate(self, route: Route, headers: Mapping[str, str]) -> None:
        token = _bearer(headers.get("authorization", ""))
        if route.auth == "meter_event_session":
            with self._lock:
                expires_at = self._state.sessions.get(token or "")
            if expires_at is None:
                raise ApiError(
                    401,
                    "A valid meter event session authentication token is required.",
                    code="authentication_failed",
                )
            if expires_at <= self.now():
                raise ApiError(
                    401, "The meter event session has expired.", type_="temporary_session_expired"
                )
            return
        if not token:
            raise ApiError(
                401,
                "You did not provide an API key. You need to provide your "
                "API key in the Authorization header, using Bearer auth "
                "(e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
            )
        if not token.startswith("sk_test_"):
            raise ApiError(401, f"Invalid API Key provided: {token[:8]}****{token[-4:]}")

    def _maybe_fault(self, route: str) -> tuple[float, str | None]:
        """Raise an injected fault, or return how long to hold the response back and
        which stored fault the API method meets (None: none)."""
        with self._lock:
            plan = self._faults.plan
            kind = self._faults.draw(route)
        if plan.delay:
            time.sleep(plan.delay)  # outside the lock: a slow request must not stall others
        if kind == "timeout":
            return plan.timeout, None
        if kind in STORED_KINDS:
            return 0.0, kind
        if kind is not None:
            raise fault_error(kind)
        return 0.0, None

    # -- webhooks

    def _hand_over_notifications(self) -> None:
        """Queue the thin events the last request raised (called with the lock held)."""
        url, secret = self._webhook
        for notification in self._state.outbox:
            delivery: JSON = {"event": notification["id"], "type": notification["type"],
                              "url": url, "status": None, "attempts": 0}
            self._deliveries.append(delivery)
            if url is not None:
                self._outbox.put({"notification": notification, "delivery": delivery,
                                  "url": url, "secret": secret})
        self._state.outbox.clear()

    def _deliver_forever(self) -> None:
        while (job := self._outbox.get()) is not None:
            body = json.dumps(job["notification"]).encode()
            for attempt in range(5):
                status = _post_signed(job["url"], body, job["secret"])
                with self._lock:
                    job["delivery"]["attempts"] = attempt + 1
                    job["delivery"]["status"] = status
                if status is not None and 200 <= status < 300:
                    break
                time.sleep(0.1 * 2**attempt)

    @staticmethod
    def _params(route: Route, method: str, query: str, body: bytes) -> JSON:
        if method != "POST":
            return parse_form(query)
        text = body.decode("utf-8", errors="replace")
        if route.body == "form":
            return parse_form(text)
        try:
            decoded = json.loads(text or "{}")
        except json.JSONDecodeError as error:
            raise ApiError(400, f"Invalid JSON body: {error}") from error
        if not isinstance(decoded, dict):
            raise ApiError(400, "The JSON body must be an object.")
        return decoded

    def _control(self, method: str, path: str, body: bytes) -> Response:
        """The double's own endpoints, for demos and other processes (no auth)."""
        if (method, path) == ("GET", "/_double/state"):
            return Response(200, self.inspect().to_json())
        if (method, path) == ("POST", "/_double/reset"):
            self.reset()
            return Response(200, {"reset": True})
        if (method, path) == ("POST", "/_double/clock"):
            try:
                advance = float(json.loads(body or b"{}").get("advance", 0))
                return Response(200, {"now": self.advance(advance)})
            except (ValueError, TypeError, AttributeError) as error:
                raise ApiError(400, f"Invalid clock change: {error}") from error
        if (method, path) == ("POST", "/_double/webhooks"):
            try:
                spec = json.loads(body or b"{}")
                self.webhooks(spec.get("url"), spec.get("secret"))
            except (ValueError, AttributeError) as error:
                raise ApiError(400, f"Invalid webhook settings: {error}") from error
            return Response(200, {"url": spec.get("url")})
        if (method, path) == ("POST", "/_double/faults"):
            try:
                spec = json.loads(body or b"{}")
                plan = self.faults(
                    rate=float(spec.get("rate", 0.0)),
                    kinds=tuple(spec.get("kinds", ("429", "500"))),
                    seed=spec.get("seed"),
                    delay=float(spec.get("delay", 0.0)),
                    timeout=float(spec.get("timeout", 2.0)),
                    routes=tuple(spec.get("routes", ())),
                    limit=spec.get("limit"),
                )
            except (ValueError, TypeError, AttributeError) as error:
                raise ApiError(400, f"Invalid fault plan: {error}") from error
            return Response(
                200,
                {
                    "rate": plan.rate,
                    "kinds": list(plan.kinds),
                    "seed": plan.seed,
                    "delay": plan.delay,
                },
            )
        raise ApiError(404, f"Unrecognized request URL ({method}: {path}).")


def sign(body: bytes, secret: str, at: int | None = None) -> str:
    """The ``Stripe-Signature`` header Stripe sends with a webhook: ``t=...,v1=...``."""
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def _post_signed(url: str, body: bytes, secret: str) -> int | None:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Stripe-Signature": sign(body, secret)},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


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

