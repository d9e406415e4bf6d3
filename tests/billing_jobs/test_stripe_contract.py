"""Tally's jobs against Stripe's contract (issue 16): identifiers within Stripe's limits,
runs resumed after any delay, stored 500s, every gauge reading, late meter errors, and
collection. Tests on the `target` fixture run on the double and, with a sk_test_
STRIPE_API_KEY, on Stripe test mode (`make test-stripe`); `double_only` ones need the
double's clock, faults or state. Every request is checked against Stripe's OpenAPI
document (tests/stripe_target.py and the `double` fixture)."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from stripe_testkit import StripeDouble

from billing_jobs import stripe_api, stripe_ids
from billing_jobs.invoice_run import run_invoices
from billing_jobs.journal import RetryPolicy
from billing_jobs.push_usage import run_push_usage
from billing_jobs.stripe_catalog import sync_catalog
from billing_jobs.webhooks import WebhookReceiver
from devtools import devstack
from devtools.child import start_tally
from domain.periods import add_months
from runtime.settings import Settings
from schemas.plans import Catalog
from tests.billing_jobs.conftest import CATALOG, END, FAST, NOW, START, sql
from tests.billing_jobs.test_jobs import CYCLE as ACME_CYCLE
from tests.billing_jobs.test_jobs import STARTER_TOTAL, STARTER_USAGE, items_per_line, received
from tests.kafka_helpers import publish_seed_catalog, wait_for
from tests.stripe_target import Target, targets

DAY = timedelta(days=1)
ACME_OPENING = "acme/20261001T000000Z/20261001T000000Z/opening/usd"
LONG_TENANT = "t" + "-0123456789abcdef" * 7 + "x" * 8  # 128 characters, Tally's maximum
FOR_STRIPE = RetryPolicy(attempts=6, base_delay=0.5, max_delay=4, timeout=60)


@pytest.fixture(params=["double", "stripe"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    yield from targets(request)


def real_period(now: datetime, *, closed: bool) -> tuple[datetime, datetime]:
    """A period in real time (Stripe's clock): closed ends 3 hours ago, open one ends
    tomorrow; both start a week before."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    end = hour - timedelta(hours=3) if closed else hour + DAY
    return end - timedelta(days=7), end


def subscribe(history: Callable[..., None], ledger: Callable[..., None], tenant: str,
              usage: dict[str, int], start: datetime = START, end: datetime = END) -> None:
    """`tenant` on Starter from `start`, monthly, with `usage` counted in its first cycle
    (before `end`): as the projector stores them, for the invoice job. Its invoices: the
    opening one at `start` (the fee, 2900) and the cycle one at `end` (fee and usage)."""
    history(tenant, "created", "starter", start, start=start, end=end)
    for meter, quantity in usage.items():
        ledger(tenant, meter, quantity, end - timedelta(days=2))


def last_cycle(end: datetime) -> tuple[datetime, datetime]:
    """A monthly cycle ending at or shortly before `end` (on a day every month has), and
    the subscription start a calendar month before it."""
    cycle_end = end if end.day <= 28 else end.replace(day=28)
    return add_months(cycle_end, -1), cycle_end


def catalog_with_gauge() -> Catalog:
    """The seed catalog plus `seats`, a `latest` gauge (it may go down, and to zero)."""
    doc = CATALOG.model_dump(mode="json")
    doc["meters"]["seats"] = {"aggregation": "latest", "unit": "seat", "lateness_seconds": 3600}
    return Catalog.model_validate(doc)


# --- identifiers and keys within Stripe's limits ----------------------------------------


@pytest.mark.stripe_contract
def test_a_128_character_tenant_pushes_and_invoices(
    target: Target, db: str, put_usage: Callable[..., None], history: Callable[..., None],
    ledger: Callable[..., None],
) -> None:
    assert len(LONG_TENANT) == 128
    settings = target.settings(db)
    policy = FAST if target.double else FOR_STRIPE
    now = datetime.now(UTC)
    start, end = real_period(now, closed=True)
    for meter, quantity in STARTER_USAGE.items():
        put_usage(LONG_TENANT, meter, quantity, start=start, end=end)
    # Subscribed a month before: its first cycle, with the usage, ended hours ago.
    subscribed, cycle_end = last_cycle(end)
    subscribe(history, ledger, LONG_TENANT, STARTER_USAGE, subscribed, cycle_end)

    synced = sync_catalog(settings, CATALOG, policy)
    pushed = run_push_usage(settings, now, policy, catalog=CATALOG)
    invoiced = run_invoices(settings, now, policy, catalog=CATALOG)

    assert not synced.failed and not pushed.failed, synced.summary() + pushed.summary()
    assert not invoiced.failed and not invoiced.skipped, invoiced.summary()
    assert sorted(invoiced.billed.values()) == [2900, STARTER_TOTAL]  # opening, cycle
    assert all(i.startswith(f"{LONG_TENANT}/") for i in invoiced.billed)
    keys = [k for (k,) in sql(db, "SELECT idempotency_key FROM tally.stripe_pushes")]
    assert max(map(len, keys)) <= stripe_ids.IDEMPOTENCY_KEY_MAX
    identifiers = [k for (k,) in sql(db, "SELECT idempotency_key FROM tally.stripe_pushes"
                                         " WHERE kind = 'meter_event'")]
    assert len(identifiers) == 3 and max(map(len, identifiers)) == stripe_ids.IDENTIFIER_MAX
    assert {c for (c,) in sql(db, "SELECT collection_method FROM tally.invoices")} == {
        "send_invoice"}  # no payment method: sent
    [(stripe_id, hosted, pdf)] = sql(
        db, "SELECT stripe_invoice_id, hosted_invoice_url, invoice_pdf FROM tally.invoices"
            " WHERE kind = 'cycle'")
    assert hosted and pdf
    client = target.client()
    invoice = client.v1.invoices.retrieve(stripe_id)
    assert (invoice.total, invoice.collection_method, invoice.days_until_due) == (
        STARTER_TOTAL, "send_invoice", 30)
    items = client.v1.invoice_items.list({"invoice": stripe_id, "limit": 100}).data
    # The cycle, end-exclusive in Tally, inclusive at Stripe.
    assert {(i.period.start, i.period.end) for i in items} == {
        (int(subscribed.timestamp()), int(cycle_end.timestamp()) - 1)}
    customer = invoice.customer if isinstance(invoice.customer, str) else ""
    [(meter_id,)] = sql(db, "SELECT stripe_object_id FROM tally.stripe_pushes"
                            " WHERE logical_key = 'tally-meter-api_calls'")
    total = functools.partial(stripe_api.meter_total, client, meter_id, customer,
                              int(start.timestamp()), int(end.timestamp()))
    assert target.eventually(total, lambda t: t == 12_000, "the api_calls summary") == 12_000


# --- every gauge reading ------------------------------------------------------------------


@pytest.mark.stripe_contract
def test_gauge_readings_5_7_5_0_all_arrive_each_once(
    target: Target, db: str, put_usage: Callable[..., None],
) -> None:
    settings, catalog = target.settings(db), catalog_with_gauge()
    policy = FAST if target.double else FOR_STRIPE
    tenant = f"gauge-{uuid.uuid4().hex[:8]}"
    start, end = real_period(datetime.now(UTC), closed=False)
    for reading in (5, 7, 5, 0):
        put_usage(tenant, "seats", reading, start=start, end=end)
        result = run_push_usage(settings, datetime.now(UTC), policy, catalog=catalog)
        assert not result.failed and result.events_sent == 1, result.summary()
        again = run_push_usage(settings, datetime.now(UTC), policy, catalog=catalog)
        assert again.events_sent == 0  # the same reading is not sent twice
        if target.double is None:
            threading.Event().wait(1.1)  # distinct timestamps for Stripe's `last`

    journaled = sql(db, "SELECT idempotency_key, request_summary->>'value', status"
                        " FROM tally.stripe_pushes WHERE kind = 'meter_event'"
                        " ORDER BY first_tried_at, created_at")
    assert [(v, s) for _, v, s in journaled] == [(v, "succeeded") for v in "5750"]
    assert len({k for k, _, _ in journaled}) == 4
    if target.double is not None:
        events = [e for e in target.double.inspect().meter_events
                  if e["event_name"] == "tally_seats"]
        assert [e["payload"]["value"] for e in events] == ["5", "7", "5", "0"]
    client = target.client()
    [(meter_id,)] = sql(db, "SELECT stripe_object_id FROM tally.stripe_pushes"
                            " WHERE logical_key = 'tally-meter-seats'")
    [(customer,)] = sql(db, "SELECT stripe_object_id FROM tally.stripe_pushes"
                            " WHERE kind = 'customer'")
    last = functools.partial(stripe_api.meter_total, client, meter_id, customer,
                             int(start.timestamp()), int(end.timestamp()))
    assert target.eventually(last, lambda v: v == 0, "the last reading, 0") == 0


# --- resumable across any delay -------------------------------------------------------


@pytest.fixture(params=[24, 72], ids=["stripe-forgets-after-24h", "stripe-remembers-72h"])
def forgetful_double(request: pytest.FixtureRequest) -> Iterator[StripeDouble]:
    """The double pinned to NOW, remembering keys and identifiers 24 or 72 hours: Tally
    may rely neither on Stripe remembering nor on it forgetting."""
    with StripeDouble(clock=lambda: NOW.timestamp(), memory=request.param * 3600) as double:
        yield double
        assert double.inspect().invalid_requests == ()


def tally(settings: Settings, log: Path, *args: str) -> subprocess.Popen[bytes]:
    return start_tally(settings, list(args), log)


@pytest.mark.stripe_contract
@pytest.mark.double_only
def test_a_run_killed_and_resumed_48_hours_later_leaves_each_meter_event_and_item_once(
    settings_factory: Callable[..., Settings], db: str, forgetful_double: StripeDouble,
    put_usage: Callable[..., None], history: Callable[..., None],
    ledger: Callable[..., None], tmp_path: Path,
) -> None:
    double = forgetful_double
    settings = settings_factory(database_url=db, stripe_api_key="sk_test_resume",
                                stripe_api_base=double.url)
    publish_seed_catalog(settings)
    tenants = [f"tenant-{t:02d}" for t in range(4)]
    expected = {}
    for tenant in tenants:
        subscribe(history, ledger, tenant, STARTER_USAGE)
        for meter, quantity in STARTER_USAGE.items():
            put_usage(tenant, meter, quantity)
            expected[(tenant, meter)] = Decimal(quantity)
    sync_catalog(settings, CATALOG, FAST)
    # The worst moment to die: Stripe did the call, its answer is still on the way (the
    # double holds it back), the journal says `pending`.
    for job, route, done in (
            ("push-usage", "POST /v1/billing/meter_events", lambda s: s.meter_events),
            ("invoice", "POST /v1/invoiceitems", lambda s: s.invoice_items)):
        double.faults(rate=1.0, kinds=("timeout",), timeout=20, routes=(route,), limit=1)
        proc = tally(settings, tmp_path / f"{job}.log", "jobs", job, "--now", NOW.isoformat())
        wait_for(double.inspect, done, timeout=60, what=f"{job}'s first call done at Stripe")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    double.faults()
    pending = sql(db, "SELECT kind FROM tally.stripe_pushes WHERE status = 'pending'"
                      " ORDER BY kind")
    later = NOW + timedelta(hours=48)
    double.advance(48 * 3600)

    pushed = run_push_usage(settings, later, FAST, catalog=CATALOG)
    invoiced = run_invoices(settings, later, FAST, catalog=CATALOG)
    again = run_push_usage(settings, later + timedelta(hours=1), FAST, catalog=CATALOG)

    snapshot = double.inspect()
    assert pending == [("invoice_item",), ("meter_event",)]
    assert not pushed.failed and not invoiced.failed, pushed.summary() + invoiced.summary()
    assert pushed.found == 1  # the killed run's event: looked up in the summary, found
    assert received(snapshot) == expected
    assert len(snapshot.meter_events) == len(expected)  # each once: no duplicate events
    assert again.events_sent == 0
    assert not invoiced.issued  # the killed run had stored every invoice: it billed them
    assert len(snapshot.invoices) == 2 * len(tenants)  # an opening and a cycle invoice each
    assert set(items_per_line(snapshot).values()) == {1}
    assert len(snapshot.invoice_items) == (1 + 4) * len(tenants)
    assert sorted(i["total"] for i in snapshot.invoices) == sorted(
        [2900, STARTER_TOTAL] * len(tenants))
    assert all(i["status"] == "open" for i in snapshot.invoices)
    assert len(snapshot.customers) == len(tenants) and len(snapshot.meters) == 4


@pytest.mark.stripe_contract
@pytest.mark.double_only
@pytest.mark.parametrize("kind", ["stored_500", "stored_500_applied"])
def test_a_500_stored_under_an_invoice_item_key_is_recovered_from_without_duplicates(
    settings: Settings, double: StripeDouble, history: Callable[..., None],
    ledger: Callable[..., None], db: str, kind: str,
) -> None:
    subscribe(history, ledger, "acme", STARTER_USAGE)
    sync_catalog(settings, CATALOG, FAST)
    double.faults(rate=1.0, kinds=(kind,), routes=("POST /v1/invoiceitems",), limit=1)

    result = run_invoices(settings, NOW, FAST, catalog=CATALOG)  # the opening invoice first

    snapshot = double.inspect()
    assert snapshot.faults_injected == 1
    assert result.billed == {ACME_OPENING: 2900, ACME_CYCLE: STARTER_TOTAL}, result.summary()
    assert set(items_per_line(snapshot).values()) == {1} and len(snapshot.invoice_items) == 5
    [(status, spent, replaced_by)] = sql(
        db, "SELECT status, key_spent, replaced_by FROM tally.stripe_pushes"
            " WHERE logical_key = %s AND generation = 0",
        f"tally-invoiceitem-{ACME_OPENING}-1")
    if kind == "stored_500":  # nothing at Stripe: sent again under a new key
        assert (status, spent) == ("replaced", True) and replaced_by.endswith("#1")
    else:  # Stripe made the item before its 500: found, not sent again
        assert (status, spent, replaced_by) == ("succeeded", True, None)


@pytest.mark.stripe_contract
@pytest.mark.double_only
@pytest.mark.parametrize("kind", ["stored_500", "stored_500_applied"])
def test_a_500_stored_under_a_meter_event_key_is_recovered_from_without_duplicates(
    settings: Settings, double: StripeDouble, put_usage: Callable[..., None], db: str,
    kind: str,
) -> None:
    put_usage("acme", "api_calls", 100)
    put_usage("acme", "tokens", 300)
    double.faults(rate=1.0, kinds=(kind,), routes=("POST /v1/billing/meter_events",), limit=1)

    first = run_push_usage(settings, NOW, FAST, catalog=CATALOG)
    stalled = run_push_usage(settings, NOW + timedelta(minutes=1), FAST, catalog=CATALOG)
    recovered = run_push_usage(settings, NOW + timedelta(hours=1), FAST, catalog=CATALOG)

    snapshot = double.inspect()
    assert len(first.failed) == 1  # the replayed 500 under the same key stops retries
    assert sql(db, "SELECT count(*) FROM tally.stripe_pushes WHERE key_spent") == [(1,)]
    assert stalled.waiting and not stalled.events_sent  # Stripe's summary may lag a push
    assert not recovered.failed, recovered.summary()
    assert received(snapshot) == {("acme", "api_calls"): 100, ("acme", "tokens"): 300}
    assert len(snapshot.meter_events) == 2  # each once
    assert recovered.events_sent == (1 if kind == "stored_500" else 0)


# --- late meter errors ----------------------------------------------------------------


class RunningReceiver:
    """`WebhookReceiver` served on a free port from a thread (as `tally stripe webhooks
    serve` serves it)."""

    def __init__(self, settings: Settings, secret: str) -> None:
        self.port = devstack.free_port()
        self.receiver = WebhookReceiver(settings, secret)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.runner: web.AppRunner | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.runner = web.AppRunner(self.receiver.app())
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def __enter__(self) -> RunningReceiver:
        self.thread.start()
        assert self.ready.wait(30)
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.mark.stripe_contract
@pytest.mark.double_only
def test_an_asynchronous_meter_error_reaches_the_journal_a_metric_and_tally_jobs_journal(
    settings_factory: Callable[..., Settings], db: str, double: StripeDouble,
    put_usage: Callable[..., None], tmp_path: Path,
) -> None:
    settings = settings_factory(database_url=db, stripe_api_key="sk_test_errors",
                                stripe_api_base=double.url)
    secret = "whsec_meter_errors"
    put_usage("acme", "api_calls", 100)
    put_usage("gone", "api_calls", 40)  # its customer was deleted at Stripe
    sql(db, "INSERT INTO tally.subscriptions VALUES ('gone', 'starter', 'active', %s, %s,"
            " 'cus_deleted', NULL, now())", START, END)

    def rejections() -> float:
        return REGISTRY.get_sample_value("tally_billing_meter_event_rejections_total",
                                         {"code": "meter_event_customer_not_found"}) or 0.0

    before = rejections()
    with RunningReceiver(settings, secret) as running:
        double.webhooks(f"http://127.0.0.1:{running.port}/stripe/events", secret)
        pushed = run_push_usage(settings, NOW, FAST, catalog=CATALOG)
        failed = wait_for(
            lambda: sql(db, "SELECT tenant_id, last_error FROM tally.stripe_pushes"
                            " WHERE status = 'failed'"),
            lambda rows: len(rows) == 1, timeout=30, what="the rejection in the journal")

    assert not pushed.failed  # accepted: Stripe checks meter events later
    [(tenant, error)] = failed
    assert tenant == "gone"
    assert "rejected by Stripe after acceptance: meter_event_customer_not_found" in error
    assert rejections() == before + 1
    listing = subprocess.run(
        [sys.executable, "-m", "tally.cli", "jobs", "journal"], capture_output=True, text=True,
        env={**os.environ, "TALLY_HOME": str(tmp_path), "DATABASE_URL": db}, timeout=60)
    assert listing.returncode == 1
    assert "meter_event_customer_not_found" in listing.stdout and " gone " in listing.stdout
    assert received(double.inspect()) == {("acme", "api_calls"): 100}


# --- collection -----------------------------------------------------------------------


@pytest.mark.stripe_contract
@pytest.mark.double_only
@pytest.mark.parametrize(("payment_method", "collection", "status"), [
    (None, "send_invoice", "open"), ("pm_card_visa", "charge_automatically", "paid")])
def test_invoices_are_charged_only_to_customers_with_a_default_payment_method(
    settings: Settings, double: StripeDouble, history: Callable[..., None],
    ledger: Callable[..., None], db: str, payment_method: str | None, collection: str,
    status: str,
) -> None:
    client = stripe_api.client(settings)
    params: Any = {"name": "acme", "metadata": {"tally_tenant_id": "acme"}}
    if payment_method:
        params |= {"payment_method": payment_method,
                   "invoice_settings": {"default_payment_method": payment_method}}
    customer = client.v1.customers.create(params)
    sql(db, "INSERT INTO tally.subscriptions VALUES ('acme', 'starter', 'active', %s, %s,"
            " %s, NULL, now())", START, END, customer.id)
    subscribe(history, ledger, "acme", {"api_calls": 12_000})
    sync_catalog(settings, CATALOG, FAST)

    result = run_invoices(settings, NOW, FAST, catalog=CATALOG)

    invoices = double.inspect().invoices
    assert sorted(result.billed) == [ACME_OPENING, ACME_CYCLE], result.summary()
    assert len(invoices) == 2 and {i["customer"] for i in invoices} == {customer.id}
    for invoice in invoices:
        assert invoice["collection_method"] == collection and invoice["status"] == status
        assert invoice["attempted"] == (collection != "send_invoice")
        assert (invoice["days_until_due"] is not None) == (collection == "send_invoice")
    assert sql(db, "SELECT DISTINCT collection_method, status FROM tally.invoices") == [
        (collection, status)]


def test_days_until_due_is_a_setting(
    double: StripeDouble, db: str, history: Callable[..., None], ledger: Callable[..., None],
) -> None:
    settings = Settings(database_url=db, stripe_api_key="sk_test_due",
                        stripe_api_base=double.url, stripe_days_until_due=7)
    subscribe(history, ledger, "acme", {"api_calls": 12_000})
    sync_catalog(settings, CATALOG, FAST)

    result = run_invoices(settings, NOW, FAST, catalog=CATALOG)

    invoices = double.inspect().invoices
    assert len(result.billed) == len(invoices) == 2, result.summary()
    assert {i["days_until_due"] for i in invoices} == {7}
    assert {i["due_date"] for i in invoices} == {int(NOW.timestamp()) + 7 * 86_400}
    assert Settings.load({"TALLY_STRIPE_DAYS_UNTIL_DUE": "14"}).stripe_days_until_due == 14


def test_tally_invoices_show_and_list_give_the_stripe_status_and_the_customers_copy(
    settings: Settings, double: StripeDouble, history: Callable[..., None],
    ledger: Callable[..., None], db: str, tmp_path: Path,
) -> None:
    subscribe(history, ledger, "acme", {"api_calls": 12_000})
    sync_catalog(settings, CATALOG, FAST)
    run_invoices(settings, NOW, FAST, catalog=CATALOG)
    [invoice] = [i for i in double.inspect().invoices
                 if i["metadata"]["tally_invoice_id"] == ACME_CYCLE]

    def tally(*args: str) -> subprocess.CompletedProcess[str]:
        run = subprocess.run(
            [sys.executable, "-m", "tally.cli", "invoices", *args], capture_output=True,
            text=True, timeout=60,
            env={**os.environ, "TALLY_HOME": str(tmp_path), "DATABASE_URL": db})
        assert run.returncode == 0, run.stderr
        return run

    shown = tally("show", ACME_CYCLE).stdout
    as_json = orjson.loads(tally("show", ACME_CYCLE, "--json").stdout)
    listed = [orjson.loads(line) for line in tally("list", "--tenant", "acme",
                                                   "--json").stdout.splitlines()]

    assert shown.startswith(f"{ACME_CYCLE}  cycle  2026-11-01 00:00  tenant acme")
    assert "api_calls" in shown and "total 31.00 USD" in shown  # the lines, as issued
    assert f"stripe={invoice['id']} collection=send_invoice" in shown
    assert invoice["hosted_invoice_url"] in shown
    assert invoice["invoice_pdf"] in shown
    assert (as_json["status"], as_json["total_cents"], as_json["stripe_invoice_id"]) == (
        "open", 3100, invoice["id"])
    assert (as_json["collection_method"], as_json["hosted_invoice_url"],
            as_json["invoice_pdf"]) == ("send_invoice", invoice["hosted_invoice_url"],
                                        invoice["invoice_pdf"])
    assert [i["id"] for i in listed] == [ACME_OPENING, ACME_CYCLE]
    assert all(i["hosted_invoice_url"] and i["collection_method"] == "send_invoice"
               for i in listed)


def test_stored_500s_among_random_faults_still_leave_each_event_and_item_once(
    settings: Settings, double: StripeDouble, put_usage: Callable[..., None],
    history: Callable[..., None], ledger: Callable[..., None],
) -> None:
    """Stored 500s mixed into the fault plan of the a-third-of-calls test: still once."""
    for t in range(3):
        put_usage(f"tenant-{t}", "api_calls", 20_000 + t)
        subscribe(history, ledger, f"tenant-{t}", {"api_calls": 20_000 + t})
    double.faults(rate=0.33, kinds=("429", "500", "timeout", "stored_500",
                                    "stored_500_applied"), seed=5, timeout=0.5)
    sync_catalog(settings, CATALOG, FAST)
    first = run_invoices(settings, NOW, FAST, catalog=CATALOG)
    pushes = [run_push_usage(settings, NOW + timedelta(hours=h), FAST, catalog=CATALOG)
              for h in range(3)]
    double.faults()
    last = run_push_usage(settings, NOW + timedelta(hours=4), FAST, catalog=CATALOG)
    invoiced = run_invoices(settings, NOW + timedelta(hours=4), FAST, catalog=CATALOG)

    snapshot = double.inspect()
    assert snapshot.faults_injected > 3, [p.summary() for p in pushes] + [first.summary()]
    assert not last.failed and not invoiced.failed, last.summary() + invoiced.summary()
    assert received(snapshot) == {(f"tenant-{t}", "api_calls"): 20_000 + t for t in range(3)}
    assert Counter(e["payload"]["value"] for e in snapshot.meter_events) == Counter(
        str(20_000 + t) for t in range(3))
    assert len(snapshot.invoices) == 6 and set(items_per_line(snapshot).values()) == {1}
    assert len(snapshot.invoice_items) == 3 * (1 + 4)  # opening: the fee; cycle: fee, usage


def test_a_meter_stripe_already_has_under_tallys_event_name_is_adopted_not_duplicated(
    settings: Settings, double: StripeDouble, db: str,
) -> None:
    client = stripe_api.client(settings)
    existing = stripe_api.create_meter(client, "api_calls", "sum", "made-elsewhere")

    synced = sync_catalog(settings, CATALOG, FAST)

    assert not synced.failed and synced.meters["api_calls"] == existing.id
    assert len(double.inspect().meters) == 4
    assert sql(db, "SELECT status, stripe_object_id FROM tally.stripe_pushes"
                   " WHERE logical_key = 'tally-meter-api_calls'") == [("succeeded", existing.id)]
