"""The worked examples of docs/billing.md, end to end.

One pipeline for all of them (a tenant per example): subscription and usage events go to
the broker with record timestamps at the simulated times, the worker and the projector
run, and `tally jobs invoice --now T` (the command, as an operator runs it) is stepped
through January to March 2026. Every amount is read back from `tally.invoices` and from
the Stripe double, and must equal the worked example to the cent.

The whole log is published before the first run: the job acts as of its `--now`, reading
only the subscription events and usage that had reached Tally by then (record
timestamps), so each run issues what a job running live at that instant would have; and
with the last usage ingested at the last step, the ledger's watermark never holds it back.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from stripe_testkit import StripeDouble

from billing_jobs.stripe_catalog import sync_catalog
from runtime import kafka
from runtime.postgres import migrate
from runtime.settings import Settings
from tests.billing_jobs.conftest import CATALOG, FAST, sql
from tests.conftest import WorkerProcess
from tests.helpers import ms, record, subscription, usage
from tests.kafka_helpers import publish_seed_catalog, publish_stamped, wait_for
from tests.services import ProjectorThread

pytestmark = pytest.mark.e2e


def at(month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


JAN, FEB, MAR, NEXT_JAN = at(1, 1), at(2, 1), at(3, 1), datetime(2027, 1, 1, tzinfo=UTC)
LATE = timedelta(hours=1)  # the seed catalog's lateness window: cycle invoices are due then
# The instants the job is run at, in order (each a due time of some invoice).
STEPS = [JAN + LATE, at(1, 15, 1), at(1, 21, 1), FEB + LATE, at(2, 15, 1), MAR + LATE]


@dataclass
class Timeline:
    """Records to publish: (topic kind, tenant, value, ingestion time)."""

    records: list[tuple[str, str, bytes, datetime]]
    usage_events: int = 0

    def subscribe(self, tenant: str, kind: str, plan: str, start: datetime, end: datetime,
                  time: datetime, **extra: Any) -> None:
        event = subscription(tenant, kind, plan, start, end, time=time, **extra)
        self.records.append(("subscriptions", tenant, record(event), time))

    def use(self, tenant: str, meter: str, total: int, event_time: datetime,
            ingested: datetime | None = None, per_event: int = 1000) -> None:
        """`total` units of `meter` at `event_time`, in events of `per_event`, in one record
        ingested at `ingested` (default: the event time)."""
        events = [usage(tenant, meter, str(per_event), event_id=f"{tenant}-{uuid.uuid4()}",
                        time=event_time) for _ in range(total // per_event)]
        self.records.append(("usage", tenant, record(*events), ingested or event_time))
        self.usage_events += len(events)


def worked_examples() -> Timeline:
    t = Timeline([])
    month = {"start": JAN, "end": FEB}
    # 1. Idle Starter from Jan 1.
    t.subscribe("idle", "created", "starter", **month, time=JAN)
    # 2. Starter, 15,000 api_calls and 1,500 executions in January.
    t.subscribe("busy", "created", "starter", **month, time=JAN)
    t.use("busy", "api_calls", 15_000, at(1, 10))
    t.use("busy", "executions", 1_500, at(1, 12), per_event=100)
    # 3. Starter from Jan 1, Pro from Jan 11; 6,000 calls before, 90,000 after.
    t.subscribe("upgrader", "created", "starter", **month, time=JAN)
    t.use("upgrader", "api_calls", 6_000, at(1, 5))
    t.subscribe("upgrader", "plan_changed", "pro", **month, time=at(1, 11))
    t.use("upgrader", "api_calls", 90_000, at(1, 20))
    # 4. Pro with a trial to Jan 15: 5,000 executions in it, 12,000 from Jan 15 to Feb 15.
    t.subscribe("trialer", "created", "pro", **month, time=JAN, trial_end=at(1, 15))
    t.use("trialer", "executions", 5_000, at(1, 10))
    t.use("trialer", "executions", 7_000, at(1, 20))
    t.use("trialer", "executions", 5_000, at(2, 10))
    # 5. Pro from Jan 1, 10,000 executions, canceled at once on Jan 21.
    t.subscribe("canceler", "created", "pro", **month, time=JAN)
    t.use("canceler", "executions", 10_000, at(1, 8))
    t.subscribe("canceler", "canceled", "pro", **month, time=at(1, 21))
    # 6. Starter yearly: 12,000 calls in January (2,000 over), 9,000 in February (none).
    #    February's arrive at the due time of its cycle invoice: still on it.
    t.subscribe("yearly", "created", "starter", start=JAN, end=NEXT_JAN, time=JAN)
    t.use("yearly", "api_calls", 12_000, at(1, 25))
    t.use("yearly", "api_calls", 9_000, at(2, 28), ingested=MAR + LATE)
    # 7. Starter, 15,000 calls in January; 2,000 more dated Jan 20 ingested Feb 3.
    t.subscribe("latecomer", "created", "starter", **month, time=JAN)
    t.use("latecomer", "api_calls", 15_000, at(1, 20))
    t.use("latecomer", "api_calls", 2_000, at(1, 20), ingested=at(2, 3))
    # Billed by Stripe itself (rule 11), and a plan missing from the catalog (rule 12).
    t.subscribe("stripebilled", "created", "pro", **month, time=JAN,
                stripe_subscription_id="sub_123", stripe_customer_id="cus_123")
    t.subscribe("badplan", "created", "platinum", **month, time=JAN)
    t.records.sort(key=lambda r: r[3])  # the log in ingestion order
    return t


# What each step issues: (tenant, kind, date) -> total cents.
EXPECTED: list[dict[tuple[str, str, datetime], int]] = [
    {("idle", "opening", JAN): 2900, ("busy", "opening", JAN): 2900,
     ("upgrader", "opening", JAN): 2900, ("canceler", "opening", JAN): 9900,
     ("yearly", "opening", JAN): 29000, ("latecomer", "opening", JAN): 2900},
    {("trialer", "opening", at(1, 15)): 9900},
    {("canceler", "final", at(1, 21)): -674},
    {("idle", "cycle", FEB): 2900, ("busy", "cycle", FEB): 3900,
     ("upgrader", "cycle", FEB): 16700, ("yearly", "cycle", FEB): 200,
     ("latecomer", "cycle", FEB): 3400},
    {("trialer", "cycle", at(2, 15)): 11500},
    {("idle", "cycle", MAR): 2900, ("busy", "cycle", MAR): 2900,
     ("upgrader", "cycle", MAR): 9900, ("yearly", "cycle", MAR): 0,
     ("latecomer", "cycle", MAR): 3100},
]


@dataclass
class Pipeline:
    settings: Settings
    database_url: str
    double: StripeDouble
    home: Path
    runs: list[subprocess.CompletedProcess[str]]

    def tally(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.settings.to_env(), "TALLY_HOME": str(self.home)}
        return subprocess.run([sys.executable, "-m", "tally.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    def invoices(self) -> dict[tuple[str, str, datetime], int]:
        return {(t, k, d): total for t, k, d, total in sql(
            self.database_url, "SELECT tenant_id, kind, issued_at, total_cents"
                               " FROM tally.invoices")}


@pytest.fixture(scope="module")
def pipeline(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[Pipeline]:
    """The worked examples published and projected, then the job run at every step."""
    home = tmp_path_factory.mktemp("billing-e2e")
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = stack["DATABASE_URL"]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, query = admin.partition("?")
    database_url = base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")
    migrate(database_url)
    with StripeDouble() as double:
        settings = Settings(
            kafka_bootstrap_servers=stack["KAFKA_BOOTSTRAP_SERVERS"], database_url=database_url,
            topic_prefix=f"t{uuid.uuid4().hex[:10]}.", partitions=1,
            stripe_api_key="sk_test_e2e", stripe_api_base=double.url)
        asyncio.run(kafka.ensure_topics(settings))
        publish_seed_catalog(settings)
        worker = WorkerProcess(settings, home / "worker.log").start()
        projector = ProjectorThread(settings)
        try:
            timeline = worked_examples()
            topics = {"usage": settings.topics.usage,
                      "subscriptions": settings.topics.subscriptions}
            for kind in topics:
                publish_stamped(settings, topics[kind], [
                    (tenant, value, ms(when)) for k, tenant, value, when in timeline.records
                    if k == kind])
            wait_for(lambda: sql(database_url, "SELECT count(*) FROM tally.usage_events"),
                     lambda rows: rows[0][0] == timeline.usage_events, timeout=90,
                     what=f"the ledger's {timeline.usage_events} events ({worker.log()})")
            subscriptions = sum(1 for r in timeline.records if r[0] == "subscriptions")
            wait_for(lambda: sql(database_url, "SELECT count(*) FROM tally.subscription_events"),
                     lambda rows: rows[0][0] == subscriptions, timeout=30,
                     what="the subscription history")
            sync = sync_catalog(settings, CATALOG, FAST)
            assert not sync.failed, sync.summary()
            pipe = Pipeline(settings, database_url, double, home, [])
            for step in [*STEPS, STEPS[-1]]:  # the last step twice: nothing new
                pipe.runs.append(pipe.tally("jobs", "invoice", "--now", step.isoformat()))
            yield pipe
        finally:
            projector.stop()
            worker.stop()
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def issued_by_step(pipeline: Pipeline) -> list[dict[tuple[str, str, datetime], int]]:
    """Per run of the job, the invoices it issued (by the `now` it stored them under)."""
    rows = sql(pipeline.database_url, "SELECT tenant_id, kind, issued_at, total_cents,"
                                      " issued_by_run FROM tally.invoices")
    return [{(t, k, d): total for t, k, d, total, run in rows if run == step}
            for step in STEPS]


def test_each_run_of_the_job_issues_exactly_the_invoices_due_at_its_time(
    pipeline: Pipeline,
) -> None:
    assert issued_by_step(pipeline) == EXPECTED
    for run in pipeline.runs:
        assert run.returncode == 1, run.stdout + run.stderr  # badplan is skipped every time
        assert "SKIPPED tenant badplan: UnknownPlanError" in run.stdout
    assert "invoices issued: 0" in pipeline.runs[-1].stdout  # run again: nothing new


def test_stripe_holds_every_invoice_with_a_nonzero_total_to_the_cent(
    pipeline: Pipeline,
) -> None:
    in_stripe = {i["metadata"]["tally_invoice_id"]: i for i in pipeline.double.inspect().invoices}
    stored = sql(pipeline.database_url, "SELECT invoice_id, total_cents, status,"
                                        " stripe_invoice_id FROM tally.invoices")
    assert {i: t for i, t, _, _ in stored if t} == {
        i: s["total"] for i, s in in_stripe.items()}
    assert all(in_stripe[i]["id"] == sid for i, t, _, sid in stored if t)
    assert [(i, status) for i, t, status, sid in stored if not t] == [
        ("yearly/20260101T000000Z/20260301T000000Z/cycle/usd", "no_charge")]
    assert sum(s["total"] for s in in_stripe.values()) == sum(
        amount for step in EXPECTED for amount in step.values())


def test_upgrade_invoice_has_the_lines_of_the_worked_example(pipeline: Pipeline) -> None:
    run = pipeline.tally("invoices", "show", "upgrader/20260101T000000Z/20260201T000000Z/"
                         "cycle/usd", "--json")
    invoice = orjson.loads(run.stdout)
    assert [(ln["kind"], ln["meter"], ln["amount_cents"]) for ln in invoice["lines"]] == [
        ("fee", None, 9900),
        ("usage", "api_calls", 278), ("usage", "executions", 0), ("usage", "tokens", 0),
        ("usage", "api_calls", 1781), ("usage", "executions", 0), ("usage", "tokens", 0),
        ("proration_credit", None, -1965), ("proration_charge", None, 6706),
    ]
    assert invoice["total_cents"] == 16700
    [stripe_invoice] = [i for i in pipeline.double.inspect().invoices
                        if i["metadata"]["tally_invoice_id"] == invoice["id"]]
    assert [line["amount"] for line in stripe_invoice["lines"]["data"]] == [
        ln["amount_cents"] for ln in invoice["lines"]]


def test_late_usage_is_a_usage_adjustment_for_its_own_cycle(pipeline: Pipeline) -> None:
    run = pipeline.tally("invoices", "list", "--tenant", "latecomer", "--from",
                         "2026-03-01T00:00:00Z", "--json")
    [march] = [orjson.loads(line) for line in run.stdout.splitlines()]
    assert (march["issued_at"], march["cycle_start"], march["cycle_end"]) == (
        "2026-03-01T00:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z")
    assert [(ln["description"], ln["amount_cents"]) for ln in march["lines"]
            if ln["kind"] == "usage_adjustment"] == [
        ("Usage adjustment for cycle 2026-01-01 to 2026-02-01: api_calls, 2000 late", 200)]


def test_the_cancel_credit_stays_on_the_customers_stripe_balance(pipeline: Pipeline) -> None:
    snapshot = pipeline.double.inspect()
    [final] = [i for i in snapshot.invoices
               if i["metadata"]["tally_invoice_id"].startswith("canceler/")
               and "/final/" in i["metadata"]["tally_invoice_id"]]
    [customer] = [c for c in snapshot.customers
                  if c["metadata"].get("tally_tenant_id") == "canceler"]
    assert (final["total"], final["amount_due"], final["ending_balance"]) == (-674, 0, -674)
    assert customer["balance"] == -674


def test_stripe_billed_and_unbillable_tenants_get_no_tally_invoice(pipeline: Pipeline) -> None:
    tenants = {t for (t, _, _) in pipeline.invoices()}
    assert "stripebilled" not in tenants and "badplan" not in tenants
    [(error,)] = sql(pipeline.database_url, "SELECT last_error FROM tally.stripe_pushes"
                                            " WHERE idempotency_key = 'tally-billing-badplan'")
    assert "UnknownPlanError" in error and "'platinum' is not in the catalog" in error


def test_a_bad_now_is_one_line_and_exit_2(pipeline: Pipeline) -> None:
    run = pipeline.tally("jobs", "invoice", "--now", "next tuesday")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "is not an ISO 8601 time" in run.stderr


def test_the_segments_of_each_history_are_stored_for_finance(pipeline: Pipeline) -> None:
    rows = sql(pipeline.database_url,
               "SELECT tenant_id, plan_id, status, valid_from, valid_to FROM"
               " tally.subscription_segments WHERE tenant_id IN ('upgrader', 'trialer',"
               " 'canceler') ORDER BY tenant_id, valid_from")
    assert rows == [
        ("canceler", "pro", "active", JAN, at(1, 21)),
        ("canceler", "pro", "canceled", at(1, 21), None),
        ("trialer", "pro", "trialing", JAN, at(1, 15)),
        ("trialer", "pro", "active", at(1, 15), None),
        ("upgrader", "starter", "active", JAN, at(1, 11)),
        ("upgrader", "pro", "active", at(1, 11), None),
    ]
