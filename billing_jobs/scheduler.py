"""`tally jobs schedule`: run the billing jobs on their intervals, one process or several.

- Mutual exclusion: a job runs only while its scheduler holds the Postgres session
  advisory lock `pg_try_advisory_lock(hashtext('tally-job:<name>'))`. A second scheduler
  (a replica, a deploy overlapping the old pod) skips the job instead of running it
  beside the first; a scheduler that dies releases the lock with its connection. This is
  also what keeps push-usage to one call per (customer, meter) at a time across processes.
- Jobs are resumable and safe to run twice (the journal), so a skipped or killed run is
  simply finished by a later one.
- SIGTERM/SIGINT: the job under way finishes, then the scheduler exits 0.
- Metrics (`--metrics-port`): runs by outcome, durations, last success per job, plus the
  jobs' own (Stripe calls, push errors, reconcile mismatches).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from billing_jobs import metrics
from runtime.postgres import Connection, connect, fetch_value
from schemas.errors import TallyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A named job: `run()` returns True when it finished without failures."""

    name: str
    interval: timedelta
    run: Callable[[], bool]


class Scheduler:
    def __init__(self, database_url: str, jobs: list[Job]) -> None:
        self.database_url = database_url
        self.jobs = jobs
        self.stop_event = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, once: bool = False) -> None:
        """Run due jobs in order until stopped (or, with `once`, each job once)."""
        due = dict.fromkeys((job.name for job in self.jobs), 0.0)
        with connect(self.database_url, autocommit=True) as lock_conn:
            while not self.stop_event.is_set():
                for job in self.jobs:
                    if self.stop_event.is_set():
                        break
                    if time.monotonic() >= due[job.name]:
                        self.run_job(lock_conn, job)
                        due[job.name] = time.monotonic() + job.interval.total_seconds()
                if once:
                    return
                self.stop_event.wait(max(0.0, min(min(due.values()) - time.monotonic(), 1.0)))

    def run_job(self, conn: Connection, job: Job) -> str:
        """Run `job` if no other scheduler runs it now; return the outcome."""
        if not fetch_value(conn, "SELECT pg_try_advisory_lock(hashtext(%s))",
                           (f"tally-job:{job.name}",)):
            outcome = "locked"  # another scheduler is running it right now
        else:
            started = time.monotonic()
            try:
                outcome = "ok" if job.run() else "failures"
            except TallyError as e:
                log.error("job %s: %s", job.name, e)
                outcome = "error"
            except Exception:
                log.exception("job %s crashed", job.name)
                outcome = "error"
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))",
                             (f"tally-job:{job.name}",))
            metrics.JOB_SECONDS.labels(job.name).observe(time.monotonic() - started)
            if outcome == "ok":
                metrics.JOB_LAST_SUCCESS.labels(job.name).set_to_current_time()
        metrics.JOB_RUNS.labels(job.name, outcome).inc()
        log.info("job %s: %s", job.name, outcome)
        return outcome
