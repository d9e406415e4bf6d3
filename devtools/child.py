"""Tally commands run as child processes: the demo, the benchmarks and the tests start
`tally worker`, `tally project` and the jobs exactly as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from runtime.settings import Settings


def start_tally(settings: Settings, args: list[str], log_path: Path,
                **popen: Any) -> subprocess.Popen[bytes]:
    """`tally ARGS` configured by `settings` (through its environment), output appended to
    `log_path`; TALLY_HOME is the log's folder, so no `.tally/dev.env` is picked up."""
    env = {**os.environ, **settings.to_env(), "TALLY_HOME": str(log_path.parent)}
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "tally.cli", *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, **popen)


def healthy(port: int) -> bool:
    """Does the service on this loopback port answer GET /healthz with 200?"""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def wait_healthy(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not healthy(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing healthy on port {port} after {timeout:.0f}s")
        time.sleep(0.2)
