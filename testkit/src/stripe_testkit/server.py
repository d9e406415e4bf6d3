"""The double's HTTP server: authentication, dispatch, the idempotency and fault
steps every API request goes through, and the control endpoints (``/_double/...``).

An API request is answered in this order: count it, route it (404 if unknown),
authenticate it (401), draw a fault (an injected error leaves no effect and does not
consume the idempotency key), read and check its parameters (400), then, with the lock
held, replay the response stored under its idempotency key or run the handler and store
its response under the key. A ``timeout`` fault lets the request through and holds
the answer back afterwards.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType, TracebackType
from typing import Any
from urllib.parse import urlsplit

from stripe_testkit.errors import JSON, ApiError, Response
from stripe_testkit.faults import FaultInjector, FaultPlan, fault_error
from stripe_testkit.idempotency import ReplayStore, fingerprint
from stripe_testkit.invoices import render_invoice
from stripe_testkit.params import parse_form
from stripe_testkit.routes import Route, find_route
from stripe_testkit.state import Call, State, new_id

__all__ = ["DoubleSnapshot", "StripeDouble"]

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
        self, host: str = "127.0.0.1", port: int = 0, clock: Callable[[], float] = time.time
    ) -> None:
        self._address = (host, port)
        self._clock = clock
        self._lock = threading.Lock()
        self._state = State()
        self._replays = ReplayStore()
        self._counts: Counter[str] = Counter()
        self._faults = FaultInjector()
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
            self._faults.use(plan)
        return plan

    def reset(self) -> None:
        """Forget every object, idempotency key, count and fault plan."""
        with self._lock:
            self._state = State()
            self._replays.clear()
            self._counts.clear()
            self._faults = FaultInjector()

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
                    tuple(live.dropped_stream_events),
                )
            )
            counts, faults_injected = dict(self._counts), self._faults.injected
        customers, meters, meter_events, invoice_items, prices, invoices, dropped = copied
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
        hold = self._maybe_fault()
        try:
            return self._apply(route, path_params, method, path, query, headers, body)
        finally:
            if hold:
                time.sleep(hold)  # a lost response: the effect is done, the answer comes late

    def _apply(
        self,
        route: Route,
        path_params: dict[str, str],
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> Response:
        params = self._params(route, method, query, body)
        route.spec.check(params)
        call = Call(params=params, path=path_params, now=int(self._clock()))
        key = headers.get("idempotency-key") if method == "POST" else None
        request = fingerprint(method, path, params)
        with self._lock:
            if key is not None:
                replayed = self._replays.replay(key, request)
                if replayed is not None:
                    return replayed
            try:
                response = Response(200, route.handler(self._state, call))
            except ApiError as error:
                response = error.response()
            # Snapshot the body: later requests mutate the live objects it came from.
            response = Response(response.status, copy.deepcopy(response.body), response.headers)
            if key is not None:
                self._replays.store(key, request, response)
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
            if expires_at <= self._clock():
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

    def _maybe_fault(self) -> float:
        """Raise an injected fault, or return how long to hold the response back."""
        with self._lock:
            plan = self._faults.plan
            kind = self._faults.draw()
        if plan.delay:
            time.sleep(plan.delay)  # outside the lock: a slow request must not stall others
        if kind == "timeout":
            return plan.timeout
        if kind is not None:
            raise fault_error(kind)
        return 0.0

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

