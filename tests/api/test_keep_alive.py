"""An idle client connection stays open longer than a load balancer's idle pauses
(api/server.py KEEP_ALIVE_SECONDS): uvicorn's default closed it after 5 s."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

from tests.api.conftest import ApiServer

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n"


def answer(conn: socket.socket) -> bytes:
    """One response's bytes (headers and the small JSON body); b"" if the API closed."""
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = conn.recv(4096)
        if not chunk:
            return data
        data += chunk
    return data


def test_an_idle_connection_is_still_open_after_seven_seconds(api: ApiServer) -> None:
    url = urlparse(api.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as conn:
        conn.sendall(REQUEST)
        assert answer(conn).startswith(b"HTTP/1.1 200")
        time.sleep(7)
        conn.sendall(REQUEST)
        assert answer(conn).startswith(b"HTTP/1.1 200")
