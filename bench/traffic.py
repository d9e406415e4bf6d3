"""Steady usage traffic through both entrances, the producer SDK and the HTTP gateway,
keeping the books a fault run is judged by: every event accepted, and how often.

An event is *accepted* when its entrance promised to keep it: for the SDK, a `flush()`
that returned (every event acknowledged by Kafka or written to the spool); for the
gateway, a 202 that counts it. A send that was not accepted is retried with the same ids
until it is (a client's duty, README), so an event may reach Kafka more than once (the
worker dedups it) but is accepted once — except the deliberate re-sends: every
`resend_every`-th SDK event is recorded again later with its id, as a retrying service
does, and each such second acceptance is a *duplicate* the pipeline must not count.

Runs in a thread with its own event loop: the caller injects faults meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.pipeline import TOKEN, Pipeline
from producers import ProducerOptions, UsageProducer

TICK = 0.05
METERS = ("api_calls", "tokens")
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"


def usage_event(tenant: str, event_id: str, meter: str, quantity: int,
                source: str = "svc/faults-gateway") -> dict[str, Any]:
    return {"specversion": "1.0", "id": event_id, "source": source,
            "type": "tally.usage.v1", "subject": tenant,
            "time": datetime.now(UTC).isoformat(), "datacontenttype": "application/json",
            "data": {"meter": meter, "quantity": str(quantity), "dimensions": {}}}


@dataclass
class Books:
    """What was accepted, per (tenant, event id), and when the last acceptance was."""

    accepted: Counter[tuple[str, str]] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, keys: list[tuple[str, str]]) -> None:
        with self.lock:
            self.accepted.update(keys)

    def snapshot(self) -> Counter[tuple[str, str]]:
        with self.lock:
            return Counter(self.accepted)

    def distinct(self) -> int:
        with self.lock:
            return len(self.accepted)

    def published(self) -> int:
        with self.lock:
            return sum(self.accepted.values())

    def duplicates(self) -> int:
        with self.lock:
            return sum(n - 1 for n in self.accepted.values())


class Traffic:
    """`rate` events/s over `tenants`, half through the SDK, half through the gateway."""

    def __init__(self, pipe: Pipeline, rate: float, tenants: list[str], tag: str,
                 resend_every: int = 100, gateway_batch_max: int = 200) -> None:
        self.pipe = pipe
        self.rate = rate
        self.tenants = tenants
        self.tag = tag
        self.resend_every = resend_every
        self.gateway_batch_max = gateway_batch_max
        self.books = Books()
        self.unconfirmed = 0  # events never accepted when the run ended
        self.errors: Counter[str] = Counter()  # refusals and failures seen, by kind
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._serial = 0

    # -- control, from the caller's thread ---------------------------------------------

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def switch(self, tenants: list[str], tag: str) -> None:
        """Send to other tenants from now on (a broker restarted empty: what was
        published before is gone by definition; the new tenants count what comes after)."""
        self.tenants, self.tag = tenants, tag

    def stop(self, timeout: float = 180) -> None:
        """Stop generating; wait until every event sent is accepted (or `timeout`)."""
        self._stop.set()
        self._thread.join(timeout + 30)

    # -- the traffic -------------------------------------------------------------------

    def _next(self) -> tuple[str, str, str, int]:
        n = self._serial
        self._serial += 1
        tenants = self.tenants
        return (tenants[n % len(tenants)], f"{self.tag}-{n}", METERS[n % 2], 1 + n % 5)

    def _due(self, started: float, sent: int, share: float) -> int:
        due = int((time.monotonic() - started) * self.rate * share) - sent
        return min(due, int(self.rate * share * 2))  # after an outage: no burst beyond 2 s

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        await asyncio.gather(self._sdk(), self._gateway())

    async def _sdk(self) -> None:
        options = ProducerOptions(source="svc/faults-sdk",
                                  spool_dir=Path(self.pipe.home) / "sdk-spool")
        producer = UsageProducer(self.pipe.settings, options)
        await producer.start()
        pending: list[tuple[str, str]] = []
        resend: list[tuple[str, str, str, int]] = []
        started, sent = time.monotonic(), 0
        try:
            while not self._stop.is_set():
                for _ in range(max(self._due(started, sent, 0.5), 0)):
                    tenant, event_id, meter, quantity = event = self._next()
                    await producer.record(tenant, meter, quantity, event_id=event_id)
                    pending.append((tenant, event_id))
                    sent += 1
                    if sent % self.resend_every == 0:
                        resend.append(event)
                for tenant, event_id, meter, quantity in resend[:-1]:  # the newest waits
                    await producer.record(tenant, meter, quantity, event_id=event_id)
                    pending.append((tenant, event_id))
                del resend[:-1]
                if await self._flush(producer, 5):
                    self.books.add(pending)
                    pending = []
                await asyncio.sleep(TICK)
            deadline = time.monotonic() + 120
            while pending and time.monotonic() < deadline:
                if await self._flush(producer, 10):
                    self.books.add(pending)
                    pending = []
        finally:
            self.unconfirmed += len(pending)
            with contextlib.suppress(Exception):
                await producer.close(30)

    async def _flush(self, producer: UsageProducer, timeout: float) -> bool:
        try:
            await producer.flush(timeout)
            return True
        except Exception as e:  # TimeoutError, DeliveryError: not accepted yet
            self.errors[f"sdk flush: {type(e).__name__}"] += 1
            return False

    async def _gateway(self) -> None:
        url = f"http://127.0.0.1:{self.pipe.services['gateway'].port}/v1/events"
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": BATCH_CONTENT_TYPE}
        started, sent = time.monotonic(), 0
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self._stop.is_set():
                count = min(max(self._due(started, sent, 0.5), 0), self.gateway_batch_max)
                if count:
                    events = [self._next() for _ in range(count)]
                    body = [usage_event(t, i, m, q) for t, i, m, q in events]
                    sent += count
                    deadline = time.monotonic() + 120
                    while not await self.post(session, url, headers, body):
                        if time.monotonic() > deadline:
                            self.unconfirmed += count
                            break
                        await asyncio.sleep(0.2)  # the same ids again: counted once
                await asyncio.sleep(TICK)

    async def post(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                   body: list[dict[str, Any]]) -> bool:
        """POST a batch; True once the gateway accepted every event of it."""
        try:
            async with session.post(url, json=body, headers=headers) as r:
                answer = await r.json(content_type=None)
                if r.status == 202 and answer.get("accepted") == len(body):
                    self.books.add([(e["subject"], e["id"]) for e in body])
                    return True
                self.errors[f"gateway {r.status}"] += 1
                return False
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            self.errors[f"gateway {type(e).__name__}"] += 1
            return False
