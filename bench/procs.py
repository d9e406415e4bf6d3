"""What the processes of a benchmark cost: CPU seconds and resident memory of process trees.

A stage is a process and its children (`tally worker` runs its pre-batching stage as a
child; Postgres a backend per connection), so every figure here is of the whole tree.
Processes that end between two readings drop out of the sum: read often enough.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """The process and its descendants (those still alive)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU seconds of a process tree (or of the process alone) so far."""
    total = 0.0
    if children:
        procs = tree(pid)
    else:
        try:
            procs = [psutil.Process(pid)]
        except psutil.NoSuchProcess:
            procs = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def rss_bytes(pid: int) -> int:
    """Resident memory of a process tree now."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def postgres_pid(pg_data: Path) -> int | None:
    """The postmaster of a data directory, from its postmaster.pid."""
    try:
        return int((pg_data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all processes, ours and others'),
    from /proc/stat; 0 where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU cores used by each named process tree between `start()` and `stop()`; the
    processes named in `alone` count without their children (the benchmark itself, whose
    children are the stages it measures)."""

    def __init__(self, pids: Mapping[str, int | None], alone: frozenset[str] = frozenset()
                 ) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self.alone = alone
        self._started: dict[str, float] = {}
        self._at = 0.0

    def _read(self) -> dict[str, float]:
        return {name: cpu_seconds(pid, name not in self.alone)
                for name, pid in self.pids.items()}

    def start(self) -> None:
        self._at = time.monotonic()
        self._started = self._read()
        self._machine = machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        """Cores used per tree (CPU seconds / wall seconds), and their `total`."""
        wall = max(time.monotonic() - self._at, 1e-9)
        cores = {name: (cpu - self._started[name]) / wall
                 for name, cpu in self._read().items()}
        ours = sum(cores.values())
        cores = {name: round(c, 2) for name, c in cores.items()}
        cores["total"] = round(ours, 2)
        # What else ran meanwhile: the machine's busy cores less ours.
        cores["other processes"] = round(
            max((machine_busy_seconds() - self._machine) / wall - ours, 0.0), 2)
        return cores


class PeakRss:
    """The highest resident memory of a process tree, sampled in a thread every `every` s."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid = pid
        self.every = every
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))

