"""`tally project` as an operator runs it: SIGKILLed mid-batch and restarted, every table
is exact; on SIGTERM it finishes its batch and exits 0."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools import devstack
from devtools.child import start_tally
from runtime.postgres import migrate
from runtime.settings import Settings
from tests.kafka_helpers import wait_for
from tests.projections.support import (
    AGGREGATION_OF,
    accepted,
    by_period,
    expected_by_period,
    ledger_count,
    publish_accepted,
    query,
    wait_for_offsets,
)


@pytest.fixture
def start_projector(tmp_path: Path) -> Iterator[Callable[[Settings], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(settings: Settings) -> subprocess.Popen[bytes]:
        proc = start_tally(
            settings, ["project", "--metrics-port", str(devstack.free_port()),
                       "--max-records", "4"], tmp_path / f"project-{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_projector_killed_mid_batch_restarts_with_every_table_exact(
    settings_factory: Callable[..., Settings], database_url: str,
    start_projector: Callable[[Settings], subprocess.Popen[bytes]],
) -> None:
    settings = settings_factory(database_url=database_url)
    migrate(database_url)
    meters = list(AGGREGATION_OF)
    log = [[accepted(f"t{b % 4}", f"e{b}-{i}", meters[i % 5], str(i % 13)) for i in range(500)]
           for b in range(120)]
    log += log[10:20]  # redeliveries, some of them after the crash
    total = 120 * 500
    publish_accepted(settings, log)

    first = start_projector(settings)
    wait_for(lambda: ledger_count(database_url), lambda n: n >= 5000, timeout=60,
             what="the projector under way")
    first.kill()  # SIGKILL: whatever transaction was open is lost, nothing half-written
    first.wait()
    assert ledger_count(database_url) < total, "killed too late to test anything"

    second = start_projector(settings)
    wait_for_offsets(database_url, settings.topics.usage_accepted, len(log), timeout=90)
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0

    events = [e for batch in log for e in batch]
    assert ledger_count(database_url) == total
    assert by_period(database_url) == expected_by_period(events)
    assert query(database_url, "SELECT sum(event_count) FROM tally.usage_daily")[0][0] == total
    assert query(database_url, "SELECT count(*) FROM tally.usage_event_keys")[0][0] == total
