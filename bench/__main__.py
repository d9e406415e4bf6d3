"""`make bench`: every benchmark, one after another, each appending to its results file.

    python -m bench [--quick] [--out-dir bench/results]

Each benchmark measures Tally against a baseline in the same run on the same machine and
reports the ratio (the machine is shared and noisy: absolute figures vary, ratios less).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

# (module, results file, full-size arguments, quick arguments)
BENCHES = [
    ("bench.bench_producer", "producer.json", ["--events", "300000"], ["--events", "50000"]),
    ("bench.bench_worker", "worker.jsonl",
     ["--batch-events", "500000", "--single-events", "150000"],
     ["--batch-events", "100000", "--single-events", "30000", "--rounds", "1"]),
    ("bench.bench_projection", "projection.jsonl", ["--events", "200000"],
     ["--events", "40000"]),
    ("bench.bench_quota_view", "quota_view.jsonl", [], []),
    ("bench.bench_compression", "compression.jsonl", ["--events", "500000"],
     ["--events", "50000", "--rounds", "1"]),
    ("bench.bench_latency", "latency.jsonl", ["--seconds", "15"], ["--seconds", "5"]),
    ("bench.bench_dedup", "dedup.jsonl", [], ["--ids", "300000"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description="run every Tally benchmark")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for module, results, full, quick in BENCHES:
        started = time.monotonic()
        print(f"== {module}", flush=True)
        result = subprocess.run([sys.executable, "-m", module, *(quick if args.quick else full),
                                 "--out", str(args.out_dir / results)])
        print(f"   ({time.monotonic() - started:.0f}s)", flush=True)
        if result.returncode != 0:
            failed.append(module)
    print(f"results appended to files in {args.out_dir}")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
