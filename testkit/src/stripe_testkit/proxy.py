"""A recording proxy in front of real Stripe: every request checked against the OpenAPI
document the double uses, then forwarded unchanged.

The contract suite runs against Stripe test mode (``make test-stripe``) with Tally's
``STRIPE_API_BASE`` pointing here, so each request Tally sends is checked exactly as the
double checks it (:mod:`stripe_testkit.openapi`: parameters, nested names, limits,
``Stripe-Version``) while Stripe answers it. Problems are recorded, not refused — Stripe
is the judge of what it accepts — and a test asserts :attr:`RecordingProxy.invalid_requests`
is empty. The v2 meter event stream goes to Stripe's meter-events host, everything else to
the API host.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit

from stripe_testkit.errors import JSON, ApiError
from stripe_testkit.openapi import Problem, check_idempotency_key, check_version, operation
from stripe_testkit.params import parse_form

__all__ = ["RecordingProxy", "problems_of"]

_HOP_BY_HOP: Final = frozenset({"connection", "keep-alive", "transfer-encoding", "te",
                                "trailer", "upgrade", "proxy-authorization",
                                "proxy-authenticate", "host", "content-length",
                                "content-encoding", "accept-encoding"})
# (accept-encoding: ask Stripe for plain bodies, which pass through unchanged)


def problems_of(method: str, path: str, query: str, headers: dict[str, str],
                body: bytes) -> list[Problem]:
    """Every way one request breaks the document (``headers`` keyed in lower case)."""
    problems: list[Problem] = []
    version = check_version(headers.get("stripe-version"))
    if version is not None:
        problems.append(version)
    key = check_idempotency_key(headers.get("idempotency-key"))
    if key is not None:
        problems.append(key)
    found = operation(method, path)
    if found is None:
        return [*problems, Problem(None, path, f"{method} {path} is not in the document")]
    try:
        if method != "POST":
            params = parse_form(query)
        elif found.body == "json":
            decoded = json.loads(body or b"{}")
            params = decoded if isinstance(decoded, dict) else {"": decoded}
        else:
            params = parse_form(body.decode("utf-8", errors="replace"))
    except (ApiError, json.JSONDecodeError) as error:
        return [*problems, Problem(None, path, f"unreadable parameters: {error}")]
    return problems + found.problems(params)


class RecordingProxy:
    """``RecordingProxy().start()`` serves on 127.0.0.1; point the SDK's base addresses
    (``api`` and ``meter_events``) at :attr:`url`."""

    def __init__(self, api: str = "https://api.stripe.com",
                 meter_events: str = "https://meter-events.stripe.com",
                 host: str = "127.0.0.1", port: int = 0, timeout: float = 80.0) -> None:
        self.api, self.meter_events, self.timeout = api, meter_events, timeout
        self._address = (host, port)
        self._lock = threading.Lock()
        self._requests: list[JSON] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> list[JSON]:
        """``{"request", "status", "problems"}`` per request forwarded, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def invalid_requests(self) -> list[JSON]:
        return [r for r in self.requests if r["problems"]]

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("RecordingProxy is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> RecordingProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy._forward(self)

            def do_POST(self) -> None:
                proxy._forward(self)

            def do_DELETE(self) -> None:
                proxy._forward(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(self._address, Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="stripe-recording-proxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> RecordingProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in handler.headers.items()}
        problems = problems_of(handler.command, url.path, url.query, headers, body)
        base = self.meter_events if url.path.startswith("/v2/billing/meter_event_stream") \
            else self.api
        upstream = urllib.request.Request(
            base + handler.path, data=body if handler.command == "POST" else None,
            method=handler.command,
            headers={k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP})
        try:
            with urllib.request.urlopen(upstream, timeout=self.timeout) as response:
                status, answer, reply = response.status, response.read(), response.headers
        except urllib.error.HTTPError as error:
            status, answer, reply = error.code, error.read(), error.headers
        except OSError as error:
            status, reply = 502, None
            answer = json.dumps({"error": {"type": "api_error",
                                           "message": f"proxy: {error}"}}).encode()
        with self._lock:
            self._requests.append({
                "request": f"{handler.command} {url.path}", "status": status,
                "problems": [{"param": p.param, "message": p.message} for p in problems]})
        handler.send_response(status)
        for name, value in (reply.items() if reply is not None else []):
            if name.lower() not in _HOP_BY_HOP:
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(answer)))
        handler.end_headers()
        handler.wfile.write(answer)
