"""A benchmark's scratch folder (its embedded broker's and Postgres's data, logs): removed
when the benchmark's process ends, so that runs do not pile up gigabytes in the temporary
folder (the read bench's ledger alone is several), whose writeback to disk would disturb
the runs after them. TALLY_BENCH_KEEP_SCRATCH=1 keeps it, to read the logs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def scratch_home(prefix: str) -> Path:
    home = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("TALLY_BENCH_KEEP_SCRATCH") != "1":
        atexit.register(shutil.rmtree, home, True)
    return home
