"""Restarting the worker in place: the same process image started again (`os.execv`).

A restart drops everything the worker holds in memory — processors, positions, the
Faust consumer's tracking of offsets, the pre-batching child — and rebuilds it from what
the broker holds now: the changelog, the group offsets, the plan catalog (restored from
Postgres when the broker lost it). Nothing is flushed or committed on the way out, as in a
crash, which the pipeline is built to survive (acks follow durable effects). The process
keeps its pid, so a supervisor sees nothing, and the worker needs none for this.

Counts of restarts are carried across in an environment variable (not a setting), so that
the alarm metrics go on counting.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import NoReturn

import orjson

from streams import metrics

log = logging.getLogger(__name__)

CARRIED = "TALLY_WORKER_RESTARTS"  # e.g. {"log_lost": 1, "broker_error": 2}
REASONS = ("log_lost", "broker_error", "stalled")  # the metrics' fixed label values


def carried_restarts() -> dict[str, int]:
    """The restarts counted by earlier images of this process."""
    try:
        counts = orjson.loads(os.environ.get(CARRIED, "{}"))
    except orjson.JSONDecodeError:
        return {}
    return {r: int(counts.get(r, 0)) for r in REASONS} if isinstance(counts, dict) else {}


def count_carried_restarts() -> None:
    """Count, in this image's metrics, the restarts of the images before it."""
    for reason, n in carried_restarts().items():
        if n:
            metrics.RESTARTS.labels(reason).inc(n)
            if reason == "log_lost":
                metrics.OFFSETS_OUTSIDE_LOG.inc(n)


def restart_in_place(reason: str, delay: float) -> NoReturn:
    """Start this process again after `delay` seconds (a backoff against a broker still
    down); never returns."""
    assert reason in REASONS
    counts = carried_restarts()
    counts[reason] = counts.get(reason, 0) + 1
    os.environ[CARRIED] = orjson.dumps(counts).decode()
    log.warning("worker restarting in place (%s) in %.1f s", reason, delay)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(delay)  # blocks the loop on purpose: nothing in it may go on
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])

