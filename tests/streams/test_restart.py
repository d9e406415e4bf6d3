"""Restarting the worker in place (streams/restart.py): the same process, started again
with its command line, its restart counts carried into the new image's metrics."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import os
from streams import metrics
from streams.restart import count_carried_restarts, restart_in_place
count_carried_restarts()
n = metrics.RESTARTS.labels("log_lost")._value.get()
print(os.getpid(), int(n), int(metrics.OFFSETS_OUTSIDE_LOG._value.get()), flush=True)
if n < 2:
    restart_in_place("log_lost", 0)
"""


def test_a_restart_in_place_keeps_the_pid_and_carries_the_counts() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TALLY_WORKER_RESTARTS"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    lines = [line.split() for line in done.stdout.splitlines()]
    assert [(count, alarms) for _, count, alarms in lines] == [("0", "0"), ("1", "1"),
                                                              ("2", "2")]
    assert len({pid for pid, _, _ in lines}) == 1, "one process, started again in place"
