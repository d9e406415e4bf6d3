"""Cycle-collector settings for the long-running stages (the worker and the projector)."""

from __future__ import annotations

import gc

# Young-generation size of the cycle collector while a stage runs (Python's default is
# 700 allocations). A batch allocates a few container objects per event (the decoded
# event dicts), so by default the collector ran every few hundred events, each time
# walking the batch's young objects: ~20% of the worker's CPU, ~30% of the projector's
# (bench/bench_cpu.py). Cycles are still collected, only less often.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Move what startup allocated (modules, the app's objects) out of the collector's
    sight for good and make young collections rare (see GC_YOUNG_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
