"""What tests of the notifier share: a local chat webhook and `tally notify serve` as a
child process (the `chat` fixture is in tests/streams/conftest.py)."""

from __future__ import annotations

import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

from devtools.child import start_tally
from devtools.devstack import free_port
from runtime.settings import Settings


@dataclass
class ChatReceiver:
    """A Slack-compatible incoming webhook on 127.0.0.1 (a thread): paths in `refuse`
    answer that status; every other POST is taken."""

    refuse: dict[str, int] = field(default_factory=dict)
    posts: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def texts(self, path: str) -> list[str]:
        return sorted(orjson.loads(body)["text"] for p, _, body in self.posts
                      if p == path and p not in self.refuse)


def serve_chat() -> Iterator[ChatReceiver]:
    receiver = ChatReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            receiver.posts.append((self.path, dict(self.headers), body))
            self.send_response(receiver.refuse.get(self.path, 200))
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


class NotifierProcess:
    """`tally notify serve` as a child process, configured through its environment."""

    def __init__(self, settings: Settings, log_path: Path, *extra: str) -> None:
        self.web_port = free_port()
        self.proc = start_tally(settings, ["notify", "serve", "--web-port", str(self.web_port),
                                           "--channel-max-attempts", "3", *extra], log_path)
        self.log_path = log_path

    def metric(self, sample: str) -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/metrics",
                                        timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(sample))

    def health(self) -> int:
        """The status of /healthz (0: not answering)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/healthz",
                                        timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def log(self) -> str:
        return self.log_path.read_text()[-5000:]

    def alive(self) -> None:
        assert self.proc.poll() is None, f"the notifier exited\n{self.log()}"

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"notifier did not stop\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
