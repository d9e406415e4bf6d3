"""Dedup window: bytes held per id and the cost of a claim (pure, no broker).

    python -m bench.bench_dedup --ids 2000000 --tenants 1000 --out FILE

Claims `--ids` distinct UUID-like ids of `--tenants` tenants in one day bucket, drains the
changelog (so only what the window keeps is left) and measures the memory traced by
tracemalloc; then times new ids and duplicates without tracing (best of three). The
baseline is the same set of ids in a dict of str -> int, the form the window had before.
Appends one JSON object to `--out`.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from streams.dedup import DedupWindow

NOW = datetime(2026, 11, 21, tzinfo=UTC)


def _ids(count: int) -> list[str]:
    return [f"{i:08x}-7b1e-7cc4-9a55-{i * 2654435761 % 2**48:012x}" for i in range(count)]


def bytes_per_id(ids: list[str], tenants: list[str]) -> tuple[float, float]:
    """(window, dict baseline) bytes per id held."""
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    window = DedupWindow(timedelta(days=35))
    for i, event_id in enumerate(ids):
        window.claim(window.bucket_for(tenants[i], NOW, NOW), event_id, i)
    for _ in window.drain_changes():  # what is kept until the drain writes it
        pass
    held = tracemalloc.get_traced_memory()[0] - start
    del window
    start = tracemalloc.get_traced_memory()[0]
    baseline: dict[tuple[str, str], dict[str, int]] = {}
    for i, event_id in enumerate(ids):
        baseline.setdefault((tenants[i], "e2026-11-21"), {})[event_id] = i
    baseline_held = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    return held / len(ids), baseline_held / len(ids)


def claim_ns(ids: list[str], tenants: list[str]) -> tuple[float, float]:
    """(new id, duplicate) nanoseconds per claim, best of three."""
    best_new = best_dup = float("inf")
    for _ in range(3):
        window = DedupWindow(timedelta(days=35))
        buckets = [window.bucket_for(t, NOW, NOW) for t in tenants]
        claim = window.claim
        started = time.perf_counter()
        for i, event_id in enumerate(ids):
            claim(buckets[i], event_id, i)
        middle = time.perf_counter()
        for i, event_id in enumerate(ids):
            claim(buckets[i], event_id, i + 1)
        ended = time.perf_counter()
        best_new = min(best_new, (middle - started) / len(ids) * 1e9)
        best_dup = min(best_dup, (ended - middle) / len(ids) * 1e9)
    return best_new, best_dup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=2_000_000)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/dedup.jsonl"))
    args = parser.parse_args()
    ids = _ids(args.ids)
    tenants = [f"tenant-{i % args.tenants}" for i in range(args.ids)]
    per_id, baseline = bytes_per_id(ids, tenants)
    new_ns, dup_ns = claim_ns(ids[:300_000], tenants[:300_000])
    row = {"bench": "dedup", "ids": args.ids, "tenants": args.tenants,
           "bytes_per_id": round(per_id, 1), "dict_baseline_bytes_per_id": round(baseline, 1),
           "claim_new_ns": round(new_ns), "claim_duplicate_ns": round(dup_ns),
           "at": datetime.now(UTC).isoformat()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("ab") as f:
        f.write(orjson.dumps(row) + b"\n")
    print(f"{args.ids:,} ids of {args.tenants:,} tenants: {per_id:.1f} bytes per id held "
          f"(a dict of str: {baseline:.1f}); claim: new id {new_ns:.0f} ns, "
          f"duplicate {dup_ns:.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
