"""The whole pipeline as real processes, for `make faults` and `make soak`.

An embedded Tansu and Postgres (devtools/devstack.py) in a temporary home, the Stripe
double as a child (`python -m stripe_testkit`, as the demo runs it), and the services as
an operator runs them (devtools/child.py): `tally ingest serve` (the gateway, with a
tokens file), `tally worker` (with its pre-batching child), `tally project` and
`tally notify serve`; `tally jobs push-usage` runs to completion when asked.

A supervisor thread restarts a service that exited, as systemd or Kubernetes would, and
records every exit it did not cause (`Pipeline.exits`): a service that dies on a fault is
a finding, not something to paper over.

It also measures what the fault table and the soak report: the ledger's event ids, the
dead letters (distinct positions), the meter events Stripe holds, resident memory of
each process tree and consumer lag (end offsets less committed offsets).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import TopicPartition

from bench.procs import postgres_pid, rss_bytes, tree
from devtools import devstack
from devtools.child import healthy, start_tally
from devtools.demo import stripe_double_process
from devtools.metrics import sample_sum
from runtime import kafka
from runtime.backoff import Backoff, first_line
from runtime.plans import publish_catalog
from runtime.postgres import migrate
from runtime.settings import Settings
from schemas.codec import loads
from schemas.plans import default_catalog_path, load_catalog

TOKEN = "faults-token-all"  # every tenant, usage and subscriptions
TENANT_A_TOKEN = "faults-token-tenant-a"  # tenant A only: the token A→B scenario
SERVICE = "svc"  # token service: events' sources are "svc/..."
SERVICES = ("gateway", "worker", "projector", "notifier")


def log(message: str) -> None:
    """Progress, on stderr (stdout carries the table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Service:
    name: str
    args: list[str]
    port: int
    proc: subprocess.Popen[bytes] | None = None
    planned_stop: bool = False  # a kill the harness made: not reported as an exit


@dataclass
class Exit:
    """A service that exited without being told to."""

    service: str
    code: int | None
    at: float  # time.monotonic()
    log_tail: str


@dataclass
class Pipeline:
    home: Path
    settings: Settings
    pg_data: Path
    kafka_pid: int
    services: dict[str, Service] = field(default_factory=dict)
    exits: list[Exit] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _stop: threading.Event = field(default_factory=threading.Event)

    # -- services ----------------------------------------------------------------------

    def _log_path(self, name: str) -> Path:
        return self.home / f"{name}.log"

    def start(self, name: str) -> None:
        with self._lock:
            s = self.services[name]
            s.proc = start_tally(self.settings, s.args, self._log_path(name))
            s.planned_stop = False

    def wait_ready(self, name: str, timeout: float = 90) -> float:
        """Seconds until `name` answers (healthz, or the projector's metrics)."""
        started = time.monotonic()
        while not self.ready(name):
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"{name} not ready after {timeout:.0f}s\n"
                                   f"{self.log_tail(name)}")
            time.sleep(0.2)
        return time.monotonic() - started

    def ready(self, name: str) -> bool:
        s = self.services[name]
        if s.proc is None or s.proc.poll() is not None:
            return False
        if name == "projector":
            return self.metric(name, "tally_projector_up") == 1
        return healthy(s.port)

    def kill(self, name: str) -> int:
        """SIGKILL the service (no flush, no commit: a crash); returns its pid."""
        with self._lock:
            s = self.services[name]
            assert s.proc is not None
            s.planned_stop = True
            pid = s.proc.pid
            s.proc.kill()
            s.proc.wait()
            return pid

    def kill_prebatch_child(self) -> int | None:
        """SIGKILL the worker's pre-batching child process; its pid (None if none)."""
        s = self.services["worker"]
        assert s.proc is not None
        children = tree(s.proc.pid)[1:]
        if not children:
            return None
        children[0].send_signal(signal.SIGKILL)
        return int(children[0].pid)

    def pid(self, name: str) -> int | None:
        s = self.services[name]
        return s.proc.pid if s.proc is not None and s.proc.poll() is None else None

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self._log_path(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def metric(self, name: str, sample: str) -> float:
        """Sum of the samples of a metric (name, or name{labels}) on a service's /metrics;
        -1 when the service does not answer."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.services[name].port}/metrics", timeout=2
            ) as r:
                text = r.read().decode()
        except OSError:
            return -1
        return sample_sum(text, sample)

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                for s in self.services.values():
                    if s.proc is None or s.proc.poll() is None:
                        continue
                    if not s.planned_stop:
                        self.exits.append(Exit(s.name, s.proc.returncode, time.monotonic(),
                                               self.log_tail(s.name, 1500)))
                        log(f"  ! {s.name} exited by itself (code {s.proc.returncode}); "
                            "restarting it")
                    self.start(s.name)

    def ensure_all_ready(self, timeout: float = 120) -> None:
        for name in self.services:
            self.wait_ready(name, timeout)

    # -- faults on the stack ----------------------------------------------------------

    def restart_postgres(self) -> None:
        devstack.restart_postgres(self.pg_data)

    def restart_broker_empty(self) -> None:
        """Stop Tansu and start a new one on the same port: memory-only, it comes back
        without a single topic (the log is lost). The topics are created again, as the
        deployment's topic job does; the services reconnect by themselves."""
        devstack.stop_kafka(self.kafka_pid)
        port = int(str(self.settings.kafka_bootstrap_servers).rsplit(":", 1)[1])
        for attempt in range(100):
            try:
                _, self.kafka_pid = devstack.start_kafka(self.home, port)
                break
            except devstack.DevStackError:
                if attempt == 99:
                    raise
                time.sleep(0.2)
        # As a deployment's topic job would: a broker just started may refuse its first
        # connections (seen once in ~12 restarts), so the creation is retried for a while.
        backoff = Backoff(first=0.2, longest=2.0)
        deadline = time.monotonic() + 30
        while True:
            try:
                asyncio.run(kafka.ensure_topics(self.settings))
                return
            except kafka.KafkaUnavailable as e:
                if time.monotonic() > deadline:
                    raise
                log(f"topics not created yet ({first_line(e)}); retrying")
                time.sleep(backoff.next_delay())

    def run_push(self, timeout: float = 180) -> tuple[int, float]:
        """`tally jobs push-usage` to completion: (exit code, seconds)."""
        started = time.monotonic()
        proc = start_tally(self.settings, ["jobs", "push-usage"], self._log_path("push"))
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        return code, time.monotonic() - started

    def start_push(self) -> subprocess.Popen[bytes]:
        return start_tally(self.settings, ["jobs", "push-usage"], self._log_path("push"))

    # -- measurements -----------------------------------------------------------------

    def ledger_ids(self, tenants: Iterable[str]) -> Counter[tuple[str, str]]:
        """(tenant, event id) of the ledger's rows for these tenants, with multiplicity."""
        with psycopg.connect(self.settings.require_database(), autocommit=True) as conn:
            rows = conn.execute("SELECT tenant_id, event_id FROM tally.usage_events"
                                " WHERE tenant_id = ANY(%s)", (list(tenants),)).fetchall()
        return Counter((t, e) for t, e in rows)

    def ledger_count(self, tenants: Iterable[str]) -> int:
        with psycopg.connect(self.settings.require_database(), autocommit=True,
                             connect_timeout=3) as conn:
            row = conn.execute("SELECT count(*) FROM tally.usage_events"
                               " WHERE tenant_id = ANY(%s)", (list(tenants),)).fetchone()
        return int(row[0]) if row else 0

    def dead_letters(self) -> dict[tuple[str, int, int, int | None], str]:
        """The dead letters now on tally.usage.dlq by distinct source position, each with
        its reason and the start of its detail."""
        records = asyncio.run(kafka.read_topic(self.settings, self.settings.topics.usage_dlq))
        return {(v["source_topic"], v["source_partition"], v["source_offset"], v["index"]):
                f"{v['reason']}: {v['detail'][:160]}" for v in (loads(r.value) for r in records)}

    def stripe_state(self) -> dict[str, Any]:
        base = self.settings.stripe_api_base
        with urllib.request.urlopen(f"{base}/_double/state", timeout=30) as r:
            state: dict[str, Any] = json.loads(r.read())
        return state

    def stripe_faults(self, delay: float) -> None:
        request = urllib.request.Request(
            f"{self.settings.stripe_api_base}/_double/faults",
            data=json.dumps({"delay": delay}).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()

    def stripe_received(self) -> tuple[dict[tuple[str, str], Decimal], int]:
        """What Stripe holds per (tenant, meter), and how many identifiers it holds twice."""
        state = self.stripe_state()
        tenants = {c["id"]: c["metadata"].get("tally_tenant_id") for c in state["customers"]}
        out: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        for e in state["meter_events"]:
            tenant = tenants.get(e["payload"]["stripe_customer_id"])
            out[(str(tenant), e["event_name"].removeprefix("tally_"))] += Decimal(
                e["payload"]["value"])
        twice = sum(n - 1 for n in Counter(e["identifier"] for e in state["meter_events"])
                    .values() if n > 1)
        return dict(out), twice

    def tally_totals(self, tenants: Iterable[str]) -> dict[tuple[str, str], Decimal]:
        """Tally's period totals per (tenant, meter), as push-usage sends them."""
        with psycopg.connect(self.settings.require_database(), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT tenant_id, meter, sum(quantity) FROM tally.usage_by_period"
                " WHERE tenant_id = ANY(%s) GROUP BY tenant_id, meter",
                (list(tenants),)).fetchall()
        return {(t, m): Decimal(q) for t, m, q in rows}

    def rss(self) -> dict[str, int]:
        """Resident bytes of each service's process tree (the worker with its child), of
        Postgres (postmaster and backends) and of the broker."""
        out = {name: rss_bytes(pid) for name in self.services
               if (pid := self.pid(name)) is not None}
        if (pg := postgres_pid(self.pg_data)) is not None:
            out["postgres"] = rss_bytes(pg)
        out["broker"] = rss_bytes(self.kafka_pid)
        return out

    async def _lag(self) -> dict[str, int]:
        topics = self.settings.topics
        groups = {"worker (pre-batching)": (f"{self.settings.worker_id}-prebatch",
                                            topics.usage),
                  "worker": (self.settings.worker_id, f"{topics.usage}.batched")}
        out: dict[str, int] = {}
        for name, (group, topic) in groups.items():
            # A consumer of the group that never subscribes: it reads the group's committed
            # offsets without joining it (Tansu cannot decode the admin client's request).
            consumer = kafka.consumer(self.settings, group_id=group,
                                      enable_auto_commit=False)
            await consumer.start()
            try:
                parts = [TopicPartition(topic, p)
                         for p in sorted(consumer.partitions_for_topic(topic) or ())]
                ends = await consumer.end_offsets(parts)
                out[name] = 0
                for tp in parts:
                    out[name] += max(ends[tp] - (await consumer.committed(tp) or 0), 0)
                if name == "worker":
                    accepted = [TopicPartition(topics.usage_accepted, p) for p in sorted(
                        consumer.partitions_for_topic(topics.usage_accepted) or ())]
                    accepted_ends = await consumer.end_offsets(accepted)
            finally:
                await consumer.stop()
        with psycopg.connect(self.settings.require_database(), autocommit=True) as conn:
            stored = {(t, p): o for t, p, o in conn.execute(
                "SELECT topic, partition, next_offset FROM tally.projection_offsets"
                " WHERE topic = %s", (topics.usage_accepted,)).fetchall()}
        out["projector"] = sum(max(end - stored.get((tp.topic, tp.partition), 0), 0)
                               for tp, end in accepted_ends.items())
        return out

    def lag(self) -> dict[str, int]:
        """Records between each consumer's committed offsets and the log end, per
        consumer (summed over partitions, each clamped at 0: Tansu reports ends short of
        the last batch, DESIGN.md)."""
        return asyncio.run(self._lag())

    # -- life cycle --------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for s in self.services.values():
                if s.proc is not None and s.proc.poll() is None:
                    s.planned_stop = True
                    s.proc.send_signal(signal.SIGTERM)
            for s in self.services.values():
                if s.proc is not None:
                    try:
                        s.proc.wait(30)
                    except subprocess.TimeoutExpired:
                        s.proc.kill()
                        s.proc.wait()


def _write_tokens(path: Path) -> None:
    path.write_text(json.dumps({
        TOKEN: {"service": SERVICE, "tenants": "*", "scopes": ["usage", "subscriptions"]},
        TENANT_A_TOKEN: {"service": SERVICE, "tenants": ["tenant-a"], "scopes": ["usage"]},
    }))
    path.chmod(0o600)


@contextlib.contextmanager
def pipeline(partitions: int = 4, keep_home: bool = False) -> Iterator[Pipeline]:
    """The whole stack started, every service ready; stopped (and its home removed unless
    something crashed or `keep_home`) on exit."""
    home = Path(tempfile.mkdtemp(prefix="tally-faults-"))
    log(f"stack home {home}")
    pipe: Pipeline | None = None
    try:
        with contextlib.ExitStack() as stack:
            stripe_url = stack.enter_context(stripe_double_process(home / "stripe-double.log"))
            bootstrap, kafka_pid = devstack.start_kafka(home)
            database_url, pg_data = devstack.start_postgres(home)
            tokens = home / "tokens.json"
            _write_tokens(tokens)
            settings = Settings(kafka_bootstrap_servers=bootstrap, database_url=database_url,
                                partitions=partitions, stripe_api_key="sk_test_tally_faults",
                                stripe_api_base=stripe_url, tokens_file=tokens)
            pipe = Pipeline(home, settings, pg_data, kafka_pid)
            stack.callback(lambda: devstack.stop_postgres(pg_data))
            stack.callback(lambda: devstack.stop_kafka(pipe.kafka_pid if pipe else kafka_pid))
            asyncio.run(kafka.ensure_topics(settings))
            migrate(database_url)
            asyncio.run(publish_catalog(settings, load_catalog(default_catalog_path())))
            ports = {name: devstack.free_port() for name in SERVICES}
            pipe.services = {
                "gateway": Service("gateway", ["ingest", "serve", "--port",
                                               str(ports["gateway"])], ports["gateway"]),
                "worker": Service("worker", ["worker", "--web-port", str(ports["worker"]),
                                             "--loglevel", "warning"], ports["worker"]),
                "projector": Service("projector", [
                    "project", "--metrics-port", str(ports["projector"]),
                    "--offsets-check-seconds", "5"], ports["projector"]),
                "notifier": Service("notifier", ["notify", "serve", "--web-port",
                                                 str(ports["notifier"])], ports["notifier"]),
            }
            for name in SERVICES:
                pipe.start(name)
            stack.callback(pipe.stop)
            pipe.ensure_all_ready()
            threading.Thread(target=pipe._supervise, daemon=True).start()
            log("pipeline ready: " + ", ".join(f"{n} :{s.port}"
                                                for n, s in pipe.services.items()))
            yield pipe
    finally:
        crashed = pipe is not None and bool(pipe.exits)
        if keep_home or crashed or os.environ.get("TALLY_KEEP_HOME"):
            log(f"logs kept in {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
