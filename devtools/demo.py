"""`make demo` / `tally demo`: the whole pipeline on synthetic traffic, then a report.

Starts what it needs (embedded Tansu + Postgres unless KAFKA_BOOTSTRAP_SERVERS /
DATABASE_URL are set; the test kit's Stripe double, as a child process, unless
STRIPE_API_KEY is set), publishes the seed plan catalog and subscriptions, runs the worker
and the projector, sends usage through the producer SDK (with retries that duplicate
events, and a few malformed records), pushes the usage to Stripe, prints a per-tenant
report and stops everything it started — also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from billing_jobs.push_usage import run_push_usage
from devtools import devstack
from devtools.child import start_tally
from devtools.demo_billing import invoice_months, publish_scenario, wait_for_scenario
from devtools.errors import DevtoolsError
from devtools.progress import Progress
from domain.periods import calendar_month
from producers import ProducerOptions, UsageProducer
from projections.projector import Projector
from projections.queries import period_quantities, usage_event_count, usage_with_quota
from runtime import kafka
from runtime.plans import publish_catalog
from runtime.postgres import connect, migrate
from runtime.settings import Settings
from schemas.plans import Catalog, default_catalog_path, load_catalog


@dataclass(frozen=True)
class DemoTenant:
    tenant_id: str
    plan_id: str
    api_calls: int  # events of quantity 1
    executions: int
    token_events: int  # events of 500-3500 tokens each


# (plan, api_calls, executions, token events): usage that lands the tenants in every
# quota state of the seed plans — blocked, exceeded, warning and ok.
DEMO_PROFILES = [
    ("free", 1300, 60, 44),
    ("starter", 8600, 700, 100),
    ("pro", 12000, 1500, 200),
    ("enterprise", 6000, 1000, 300),
    ("free", 600, 120, 20),
    ("starter", 12500, 1500, 100),
    ("pro", 5000, 500, 100),
    ("enterprise", 2000, 300, 100),
]


def demo_tenants(count: int, events: int) -> list[DemoTenant]:
    """`count` tenants from DEMO_PROFILES, scaled to about `events` events in all."""
    profiles = [DEMO_PROFILES[i % len(DEMO_PROFILES)] for i in range(count)]
    factor = events / sum(a + e + t for _, a, e, t in profiles)
    return [DemoTenant(f"tenant-{i + 1:02d}", plan, max(int(a * factor), 1),
                       max(int(e * factor), 1), max(int(t * factor), 1))
            for i, (plan, a, e, t) in enumerate(profiles)]


def demo_stack(home: Path) -> contextlib.AbstractContextManager[dict[str, str]]:
    """The external stack when configured, else an embedded one stopped on exit."""
    configured = {k: os.environ[k] for k in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")
                  if os.environ.get(k)}
    return devstack.embedded_where_missing(home, configured)


# The Stripe double is in the test kit (testkit/, a distribution of its own that only the
# developer install adds). The product never imports the test kit: the demo runs the
# double as a child process and talks to it over HTTP, as to Stripe.
STRIPE_DOUBLE_MODULE = "stripe_testkit"
_LISTENING = "stripe double listening on "  # the first line `python -m stripe_testkit` prints


@contextlib.contextmanager
def stripe_endpoint(home: Path) -> Iterator[dict[str, str]]:
    if os.environ.get("STRIPE_API_KEY"):
        yield {"stripe_api_key": os.environ["STRIPE_API_KEY"],
               "stripe_api_base": os.environ.get("STRIPE_API_BASE", "")}
        return
    with stripe_double_process(home / "stripe-double.log") as url:
        yield {"stripe_api_key": "sk_test_tally_demo", "stripe_api_base": url}


@contextlib.contextmanager
def stripe_double_process(log_path: Path, timeout: float = 30) -> Iterator[str]:
    """`python -m stripe_testkit --port 0` as a child process; yields the address it
    prints, and stops it with SIGTERM on exit. Its log goes to `log_path`."""
    if importlib.util.find_spec(STRIPE_DOUBLE_MODULE) is None:  # a runtime-only install
        raise DevtoolsError("tally demo needs the developer install (make install): "
                            "the Stripe double is in the test kit")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", STRIPE_DOUBLE_MODULE, "--port", "0"],
            stdout=subprocess.PIPE, stderr=log,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops it in order
        )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().decode(errors="replace") if ready else ""
        if not line.startswith(_LISTENING):
            raise DevtoolsError(f"the Stripe double did not start within {timeout:.0f}s; "
                                f"its log: {log_path}")
        yield line.removeprefix(_LISTENING).strip()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def worker_process(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_tally(
        settings, ["worker", "--web-port", str(devstack.free_port()), "--loglevel", "warning"],
        log_path, start_new_session=True,  # Ctrl-C reaches the demo, which stops it in order
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def projector_thread(settings: Settings) -> Iterator[Projector]:
    projector = Projector(settings)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(projector.run(),),
                              daemon=True)
    thread.start()
    try:
        yield projector
    finally:
        loop.call_soon_threadsafe(projector.stop)
        thread.join(30)


async def send_traffic(settings: Settings, tenants: list[DemoTenant], now: datetime) -> int:
    """Publish subscriptions and usage through the SDK; return distinct events sent."""
    period = calendar_month(now)
    rng = random.Random(42)
    plan: list[tuple[str, str, Decimal]] = []
    for t in tenants:
        plan += [(t.tenant_id, "api_calls", Decimal(1))] * t.api_calls
        plan += [(t.tenant_id, "executions", Decimal(1))] * t.executions
        plan += [(t.tenant_id, "tokens", Decimal(rng.randrange(500, 3500)))
                 for _ in range(t.token_events)]
    rng.shuffle(plan)
    progress = Progress("sending usage", len(plan))
    options = ProducerOptions(source="svc/demo")
    async with UsageProducer(settings, options) as producer:
        for t in tenants:
            await producer.subscription_created(t.tenant_id, t.plan_id, period.start, period.end)
            await producer.record(t.tenant_id, "storage_mb", Decimal(rng.randrange(100, 4000)),
                                  event_id=f"{t.tenant_id}-storage", time=now)
        retried: list[tuple[str, str, Decimal, str]] = []
        for n, (tenant, meter, quantity) in enumerate(plan):
            event_id = f"{tenant}-{n}"
            await producer.record(tenant, meter, quantity, event_id=event_id, time=now)
            if n % 50 == 0:  # a service retrying: same id, counted once
                retried.append((tenant, meter, quantity, event_id))
            progress.update(n + 1)
        for tenant, meter, quantity, event_id in retried:
            await producer.record(tenant, meter, quantity, event_id=event_id, time=now)
        await producer.flush()
    progress.finish(len(plan))
    # A service with a bug: records that are not valid events go to the DLQ.
    raw = kafka.producer(settings)
    await raw.start()
    try:
        for bad in (b"{not json", b'{"specversion": "1.0"}', b"[1, 2]"):
            await raw.send_and_wait(settings.topics.usage, key=b"tenant-01", value=bad)
    finally:
        await raw.stop()
    print(f"sent {len(plan) + len(tenants)} events, {len(retried)} retried duplicates, "
          f"3 malformed records (4 dead letters: one record is a batch of 2 non-events)")
    return len(plan) + len(tenants)


def wait_for_ledger(database_url: str, expected: int, timeout: float = 180) -> int:
    progress = Progress("counted and projected", expected)
    deadline = time.monotonic() + timeout
    count = 0
    with connect(database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            count = usage_event_count(conn)
            progress.update(count)
            if count >= expected:
                break
            time.sleep(0.2)
    progress.finish(count)
    return count


def report(settings: Settings, catalog: Catalog, pushed: dict[tuple[str, str], Decimal],
           dead_letters: int) -> str:
    rows = []
    with connect(settings.require_database()) as conn:
        usage = usage_with_quota(conn)
    by_tenant: dict[str, list[tuple[str, Decimal, str, str | None, Decimal | None]]] = {}
    for u in usage:
        by_tenant.setdefault(u.tenant_id, []).append(
            (u.meter, u.quantity, u.plan_id, u.state, u.limit))
    header = (f"{'tenant':<11} {'plan':<11} {'meter':<11} {'used':>11} {'limit':>11} "
              f"{'state':<9} {'to Stripe':>10}")
    rows.append(header)
    rows.append("-" * len(header))
    for tenant, meters in by_tenant.items():
        plan_id = meters[0][2]
        plan = catalog.plans[plan_id]
        for i, (meter, quantity, _, state, limit) in enumerate(meters):
            rows.append(
                f"{tenant if i == 0 else '':<11} {plan.name if i == 0 else '':<11} {meter:<11} "
                f"{quantity:>11,} {'unlimited' if limit is None else f'{limit:,}':>11} "
                f"{state or '-':<9} {pushed.get((tenant, meter), Decimal(0)):>10,}"
            )
    rows.append(f"dead letters (malformed records kept with their reason): {dead_letters}")
    return "\n".join(rows)


def run_demo(tenants: int = 8, events: int = 60000) -> int:
    if tenants < 1 or events < tenants * 3:
        print("tally: error: need at least 1 tenant and 3 events per tenant", file=sys.stderr)
        return 2
    home = Path(tempfile.mkdtemp(prefix="tally-demo-"))
    catalog = load_catalog(default_catalog_path())
    now = datetime.now(UTC)
    started = time.monotonic()
    try:
        # Stripe first: without the test kit the demo stops before starting a stack.
        with stripe_endpoint(home) as stripe_env, demo_stack(home) as env:
            settings = Settings(
                kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"],
                database_url=env["DATABASE_URL"],
                topic_prefix=f"demo{int(time.time())}." if "KAFKA_BOOTSTRAP_SERVERS" in
                os.environ else "tally.",
                stripe_api_key=stripe_env["stripe_api_key"],
                stripe_api_base=stripe_env["stripe_api_base"] or None,
            )
            print(f"kafka {settings.kafka_bootstrap_servers}  postgres "
                  f"{settings.database_url}  stripe {settings.stripe_api_base or 'api.stripe'}")
            asyncio.run(kafka.ensure_topics(settings))
            migrate(settings.require_database())
            asyncio.run(publish_catalog(settings, catalog))
            with worker_process(settings, home / "worker.log"), projector_thread(settings):
                plan = demo_tenants(tenants, events)
                expected = asyncio.run(send_traffic(settings, plan, now))
                counted = wait_for_ledger(settings.require_database(), expected)
                if counted != expected:
                    print(f"tally: error: ledger has {counted} events, expected {expected}; "
                          f"worker log: {home / 'worker.log'}", file=sys.stderr)
                    return 1
                time.sleep(1.0)  # let the last quota states reach Postgres
                result = run_push_usage(settings)
                dead = _dead_letter_count(settings)
                usage_report = report(settings, catalog, dict(result.pushed), dead)
                mismatches = _stripe_mismatches(settings, dict(result.pushed))
                # Then subscriptions to invoices, on simulated months (devtools/demo_billing).
                asyncio.run(publish_scenario(settings))
                if not wait_for_scenario(settings.require_database()):
                    print("tally: error: the billing scenario did not reach the ledger; "
                          f"worker log: {home / 'worker.log'}", file=sys.stderr)
                    return 1
            print(usage_report)
            if result.failed:
                print("\n".join(result.failed), file=sys.stderr)
                return 1
            if mismatches:
                print("tally: error: Stripe received other totals than Tally counted: "
                      + ", ".join(mismatches), file=sys.stderr)
                return 1
            invoices, problems = invoice_months(settings, catalog)
            print(f"\n{invoices}")
            if problems:
                print("tally: error: invoices disagree with docs/billing.md or Stripe: "
                      + "; ".join(problems), file=sys.stderr)
                return 1
            print(f"demo finished in {time.monotonic() - started:.0f}s: every event counted "
                  "once, every meter event pushed once, every invoice as docs/billing.md "
                  "says and as Stripe holds it")
            return 0
    except KeyboardInterrupt:
        print("\ninterrupted: everything the demo started was stopped", file=sys.stderr)
        return 130
    finally:
        _clean_up(home)


def _clean_up(home: Path) -> None:
    """Remove the demo's data; keep the logs (worker, Stripe double) if something went
    wrong in a child process."""
    kept = [log for log in sorted(home.glob("*.log"))
            if "Traceback" in log.read_text(errors="replace")]
    for log in kept:
        print(f"{log.stem} log kept at {log}", file=sys.stderr)
    if not kept:
        shutil.rmtree(home, ignore_errors=True)


def _stripe_mismatches(settings: Settings, pushed: dict[tuple[str, str], Decimal]) -> list[str]:
    """(tenant, meter) whose pushed total differs from the period usage in Postgres."""
    with connect(settings.require_database()) as conn:
        used = period_quantities(conn)
    return [f"{t}/{m}: used {q}, pushed {pushed.get((t, m), 0)}"
            for (t, m), q in sorted(used.items()) if pushed.get((t, m), Decimal(0)) != q]


def _dead_letter_count(settings: Settings) -> int:
    return len(asyncio.run(kafka.read_topic(settings, settings.topics.usage_dlq)))
