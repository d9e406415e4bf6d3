"""Tests of the producer SDK, its spool and the ingest gateway; shared helpers below."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools import devstack
from runtime import kafka
from runtime.settings import Settings
from schemas import codec


@dataclass(frozen=True)
class Received:
    """One record read back from a topic."""

    key: str
    headers: dict[str, bytes]
    events: list[dict[str, Any]]
    partition: int
    value_bytes: int


async def consume(settings: Settings, topic: str, expected_events: int, *,
                  timeout: float = 20.0, linger: float = 0.5) -> list[Received]:
    """Read `topic` from the start until `expected_events` events arrived, then `linger`
    seconds more to catch extras (duplicates). End offsets are not used: on the embedded
    broker they undercount (DESIGN.md)."""
    consumer = kafka.consumer(settings, topic)
    await consumer.start()
    received: list[Received] = []
    count = 0
    try:
        deadline = time.monotonic() + timeout
        extra_until: float | None = None
        while time.monotonic() < deadline:
            if count >= expected_events:
                if extra_until is None:
                    extra_until = time.monotonic() + linger
                elif time.monotonic() >= extra_until:
                    break
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for r in records:
                    events = codec.decode_record(r.value)
                    count += len(events)
                    received.append(Received(
                        key=r.key.decode(), headers={k: v for k, v in r.headers},
                        events=events, partition=r.partition, value_bytes=len(r.value),
                    ))
    finally:
        await consumer.stop()
    return received


def all_events(received: list[Received]) -> list[dict[str, Any]]:
    return [e for r in received for e in r.events]


def dead_address() -> str:
    """A loopback address where nothing listens (connections are refused)."""
    return f"127.0.0.1:{devstack.free_port()}"


def start_tansu_on(port: int, home: Path) -> int:
    """Start Tansu on a given port (devstack.start_kafka picks a free one); return its pid.

    Same command line as devstack.start_kafka: a restarted broker must be reachable at
    the address a producer already knows.
    """
    url = f"tcp://127.0.0.1:{port}"
    with (home / "tansu.log").open("ab") as out:
        proc = subprocess.Popen(
            [str(devstack.tansu_binary()), "broker", "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return proc.pid
        time.sleep(0.05)
    kill_tansu(proc.pid)
    raise RuntimeError(f"Tansu did not start on port {port}")


def kill_tansu(pid: int) -> None:
    """SIGKILL a Tansu this test process started, and reap it.

    A crash, not a clean stop; and reaping matters: devstack.stop_kafka polls for the pid
    to vanish, which a zombie child never does, so it would wait its full 5 s.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def run(coro: Any) -> Any:
    """Run a coroutine to completion (the suite has no asyncio plugin)."""
    return asyncio.run(coro)
