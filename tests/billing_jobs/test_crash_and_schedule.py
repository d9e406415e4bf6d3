"""The jobs as an operator runs them: `tally jobs push-usage` SIGKILLed mid-push and run
again, and `tally jobs schedule` (advisory locks, metrics, SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
from stripe_testkit import StripeDouble

from billing_jobs.push_usage import run_push_usage
from billing_jobs.scheduler import Job, Scheduler
from devtools import devstack
from devtools.child import start_tally
from runtime.settings import Settings
from tests.billing_jobs.conftest import CATALOG, FAST, NOW
from tests.billing_jobs.test_jobs import received
from tests.kafka_helpers import publish_seed_catalog, wait_for

FAST_INTERVAL = timedelta(seconds=1)


def tally(settings: Settings, tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    return start_tally(settings, list(args), tmp_path / f"{args[1]}.log")


def test_push_usage_killed_mid_push_and_run_again_leaves_each_meter_event_once_in_stripe(
    settings_factory: Callable[..., Settings], db: str, double: StripeDouble,
    put_usage: Callable[..., None], tmp_path: Path,
) -> None:
    settings = settings_factory(database_url=db, stripe_api_key="sk_test_kill",
                                stripe_api_base=double.url)
    publish_seed_catalog(settings)
    expected = {}
    for t in range(25):
        for meter in ("api_calls", "tokens"):
            put_usage(f"tenant-{t:02d}", meter, 1000 + t)
            expected[(f"tenant-{t:02d}", meter)] = Decimal(1000 + t)
    double.faults(delay=0.03)  # slow enough to be killed halfway
    job = tally(settings, tmp_path, "jobs", "push-usage", "--now", NOW.isoformat())
    wait_for(lambda: len(double.inspect().meter_events), lambda n: n >= 12, timeout=60,
             what="a dozen meter events")
    job.send_signal(signal.SIGKILL)
    job.wait()
    halfway = len(double.inspect().meter_events)
    double.faults()

    rerun = run_push_usage(settings, NOW, FAST, catalog=CATALOG)

    snapshot = double.inspect()
    assert 12 <= halfway < 50 and not rerun.failed
    assert Counter(e["identifier"] for e in snapshot.meter_events).most_common(1)[0][1] == 1
    assert received(snapshot) == expected
    assert len(snapshot.customers) == 25 and len(snapshot.meters) == 2


def test_a_job_another_scheduler_is_running_is_skipped_not_run_beside_it(db: str) -> None:
    runs: list[str] = []

    def job() -> bool:
        runs.append("x")
        return True

    scheduler = Scheduler(db, [Job("push-usage", FAST_INTERVAL, job)])
    with psycopg.connect(db, autocommit=True) as other:  # the other scheduler, mid-job
        other.execute("SELECT pg_try_advisory_lock(hashtext('tally-job:push-usage'))")
        scheduler.run(once=True)
        assert runs == []
        other.execute("SELECT pg_advisory_unlock(hashtext('tally-job:push-usage'))")
    scheduler.run(once=True)
    assert runs == ["x"]


def test_scheduler_runs_the_jobs_serves_metrics_and_stops_cleanly_on_sigterm(
    settings_factory: Callable[..., Settings], db: str, double: StripeDouble, tmp_path: Path,
) -> None:
    settings = settings_factory(database_url=db, stripe_api_key="sk_test_sched",
                                stripe_api_base=double.url)
    publish_seed_catalog(settings)
    port = devstack.free_port()
    scheduler = tally(settings, tmp_path, "jobs", "schedule", "--metrics-port", str(port),
                      "--push-every", "0.02")

    def scraped() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            return ""

    text = wait_for(scraped, lambda t: 'job="reconcile",outcome="ok"' in t, timeout=60,
                    what="every job run once")
    scheduler.send_signal(signal.SIGTERM)
    assert scheduler.wait(timeout=30) == 0
    assert 'tally_billing_job_runs_total{job="sync-catalog",outcome="ok"} 1.0' in text
    assert len(double.inspect().prices) > 0

