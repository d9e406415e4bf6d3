"""The demo's billing part: subscriptions become invoices, as docs/billing.md says.

Four tenants live through January to March 2026 (the worked examples of docs/billing.md):
an upgrade from Starter to Pro on Jan 11, a Pro trial to Jan 15, an idle Starter, and a
Pro canceled at once on Jan 21. Their subscription and usage events go to the broker with
record timestamps at those simulated times (so the worker and the projector see them
arrive then), and the invoice job is stepped through the months. Each invoice is printed,
checked against the total docs/billing.md gives, and against the invoice Stripe holds.
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from billing_jobs import journal, stripe_api
from billing_jobs.billing_cli import format_invoice
from billing_jobs.billing_store import list_invoices
from billing_jobs.invoice_run import run_invoices
from billing_jobs.stripe_catalog import sync_catalog
from runtime import kafka
from runtime.postgres import connect
from runtime.settings import Settings
from schemas.codec import dumps, loads
from schemas.plans import Catalog


def _at(month: int, day: int, hour: int = 0) -> datetime:
    return datetime(2026, month, day, hour, tzinfo=UTC)


JAN, FEB, MAR = _at(1, 1), _at(2, 1), _at(3, 1)
# The job's runs: the due times of the invoices (an hour after a cycle ends: lateness).
STEPS = (_at(1, 1, 1), _at(1, 15, 1), _at(1, 21, 1), _at(2, 1, 1), _at(2, 15, 1),
         _at(3, 1, 1))


@dataclass(frozen=True)
class Expected:
    """An invoice docs/billing.md gives: tenant, date, total cents, and what it is."""

    tenant: str
    date: datetime
    total_cents: int
    why: str


EXPECTED = (
    Expected("acme-upgrade", JAN, 2900, "Starter opening fee"),
    Expected("acme-upgrade", FEB, 16700, "worked example 3: Pro fee 9900 + 278 + 1781 "
             "- 1965 + 6706"),
    Expected("acme-upgrade", MAR, 9900, "Pro fee"),
    Expected("globex-trial", _at(1, 15), 9900, "worked example 4: opening at the trial's end"),
    Expected("globex-trial", _at(2, 15), 11500, "worked example 4: fee 9900 + 2,000 over x 0.8"),
    Expected("initech-idle", JAN, 2900, "worked example 1"),
    Expected("initech-idle", FEB, 2900, "worked example 1"),
    Expected("initech-idle", MAR, 2900, "worked example 1"),
    Expected("umbrella-cancel", JAN, 9900, "Pro opening fee"),
    Expected("umbrella-cancel", _at(1, 21), -674, "worked example 5: 2839 - 3513, a credit"),
)


def _subscription(tenant: str, kind: str, plan: str, moment: datetime,
                  **extra: str) -> bytes:
    return dumps({
        "specversion": "1.0", "id": str(uuid.uuid4()), "source": "svc/demo-billing",
        "type": f"tally.subscription.{kind}.v1", "subject": tenant, "time": moment.isoformat(),
        "data": {"plan_id": plan, "period_start": JAN.isoformat(),
                 "period_end": FEB.isoformat(), **extra},
    })


def _usage(tenant: str, meter: str, total: int, moment: datetime) -> bytes:
    """`total` units in events of 1,000 (100 for fewer), one batch record."""
    size = 1000 if total % 1000 == 0 else 100
    return dumps([{
        "specversion": "1.0", "id": f"{tenant}-{meter}-{moment:%m%d}-{n}",
        "source": "svc/demo-billing", "type": "tally.usage.v1", "subject": tenant,
        "time": moment.isoformat(), "data": {"meter": meter, "quantity": str(size)},
    } for n in range(total // size)])


def scenario() -> list[tuple[str, str, bytes, datetime]]:
    """(topic kind, tenant, value, ingestion time) of every record, in ingestion order."""
    records = [
        ("subscriptions", "acme-upgrade", _subscription("acme-upgrade", "created", "starter",
                                                        JAN), JAN),
        ("usage", "acme-upgrade", _usage("acme-upgrade", "api_calls", 6_000, _at(1, 5)),
         _at(1, 5)),
        ("subscriptions", "acme-upgrade", _subscription("acme-upgrade", "plan_changed", "pro",
                                                        _at(1, 11)), _at(1, 11)),
        ("usage", "acme-upgrade", _usage("acme-upgrade", "api_calls", 90_000, _at(1, 20)),
         _at(1, 20)),
        ("subscriptions", "globex-trial", _subscription(
            "globex-trial", "created", "pro", JAN, trial_end=_at(1, 15).isoformat()), JAN),
        ("usage", "globex-trial", _usage("globex-trial", "executions", 5_000, _at(1, 10)),
         _at(1, 10)),
        ("usage", "globex-trial", _usage("globex-trial", "executions", 7_000, _at(1, 20)),
         _at(1, 20)),
        ("usage", "globex-trial", _usage("globex-trial", "executions", 5_000, _at(2, 10)),
         _at(2, 10)),
        ("subscriptions", "initech-idle", _subscription("initech-idle", "created", "starter",
                                                        JAN), JAN),
        ("subscriptions", "umbrella-cancel", _subscription("umbrella-cancel", "created", "pro",
                                                           JAN), JAN),
        ("usage", "umbrella-cancel", _usage("umbrella-cancel", "executions", 10_000,
                                            _at(1, 8)), _at(1, 8)),
        ("subscriptions", "umbrella-cancel", _subscription("umbrella-cancel", "canceled",
                                                           "pro", _at(1, 21)), _at(1, 21)),
    ]
    return sorted(records, key=lambda r: r[3])


def usage_events() -> int:
    return sum(len(loads(value)) for kind, _, value, _ in scenario() if kind == "usage")


async def publish_scenario(settings: Settings) -> None:
    """Every record, with its simulated ingestion time as the record timestamp."""
    topics = {"usage": settings.topics.usage, "subscriptions": settings.topics.subscriptions}
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for kind, tenant, value, moment in scenario():
            await producer.send_and_wait(topics[kind], key=tenant.encode(), value=value,
                                         timestamp_ms=int(moment.timestamp() * 1000))
    finally:
        await producer.stop()


def wait_for_scenario(database_url: str, timeout: float = 60) -> bool:
    """Whether the scenario's usage and subscription events reached Postgres in time."""
    deadline = time.monotonic() + timeout
    tenants = sorted({t for _, t, _, _ in scenario()})
    subscriptions = sum(1 for kind, *_ in scenario() if kind == "subscriptions")
    with connect(database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            used = conn.execute("SELECT count(*) FROM tally.usage_events"
                                " WHERE tenant_id = ANY(%s)", (tenants,)).fetchone()
            history = conn.execute("SELECT count(*) FROM tally.subscription_events"
                                   " WHERE tenant_id = ANY(%s)", (tenants,)).fetchone()
            if used == (usage_events(),) and history == (subscriptions,):
                return True
            time.sleep(0.2)
    return False


def invoice_months(settings: Settings, catalog: Catalog) -> tuple[str, list[str]]:
    """Run the invoice job at each step; the invoice report and every disagreement (with
    docs/billing.md, or between Tally and Stripe)."""
    policy = journal.RetryPolicy()
    problems: list[str] = []
    sync = sync_catalog(settings, catalog, policy)
    problems += sync.failed
    for step in STEPS:
        result = run_invoices(settings, step, policy, catalog=catalog)
        problems += result.failed
        if result.known_through != step:
            problems.append(f"the ledger was complete only to {result.known_through}")
    tenants = sorted({e.tenant for e in EXPECTED})
    with connect(settings.require_database()) as conn:
        views = [v for t in tenants for v in list_invoices(conn, t, None, None)]
    client = stripe_api.client(settings)
    rows = ["invoices (simulated January to March 2026; docs/billing.md, worked examples)"]
    expected = {(e.tenant, e.date): e for e in EXPECTED}
    for view in views:
        assert view.issued_at is not None  # the model's invoices have a date
        rows.append(format_invoice(view))
        want = expected.pop((view.tenant_id, view.issued_at), None)
        if want is None:
            problems.append(f"{view.invoice_id}: not in docs/billing.md's examples")
            continue
        if want.total_cents != view.total_cents:
            problems.append(f"{view.invoice_id}: {view.total_cents}, docs/billing.md "
                            f"{want.total_cents} ({want.why})")
        rows.append(f"    = {want.why}")
        if view.stripe_invoice_id:
            theirs = journal.read(functools.partial(
                stripe_api.retrieve_invoice, client, view.stripe_invoice_id), policy)
            rows.append(f"    Stripe {theirs.id}: total {theirs.total}, {theirs.status}")
            if theirs.total != view.total_cents:
                problems.append(f"{view.invoice_id}: Stripe has {theirs.total}")
    problems += [f"missing: {e.tenant} {e.date:%Y-%m-%d} ({e.why})" for e in expected.values()]
    return "\n".join(rows), problems

