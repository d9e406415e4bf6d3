"""`make bench`: every benchmark, one after another, then the report of the whole run.

    python -m bench [--quick] [--out-dir bench/results] [--only NAME ...]

`--only read` (or `bench.bench_read`) runs that benchmark alone.

Each benchmark measures Tally against a baseline in the same run on the same machine and
reports the ratio (the machine is shared and noisy: absolute figures vary, ratios less).
Their rows go to files in `<out-dir>/raw/` (emptied first), their profile summaries
beside them; `bench/report.py` then writes `latest.json`, `latest.md` and `latest.png`
in `<out-dir>`, the files to commit, and (a full run into bench/results) the table in
README.md's "Performance" section. The full run is sized to finish in under 15 minutes
on two cores.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson

# (module, results file, full-size arguments, quick arguments); each also gets --out, and
# --profile-dir where it takes one.
BENCHES = [
    ("bench.bench_producer", "producer.json", ["--events", "300000"], ["--events", "50000"]),
    ("bench.bench_worker", "worker.jsonl",
     ["--batch-events", "500000", "--single-events", "150000", "--rounds", "3",
      "--scaling-events", "200000"],
     ["--batch-events", "100000", "--single-events", "30000", "--rounds", "1",
      "--textbook-events", "10000", "--scaling-events", "60000"]),
    ("bench.bench_projection", "projection.jsonl", ["--events", "200000"],
     ["--events", "40000", "--baseline-events", "10000"]),
    ("bench.bench_rebuild", "rebuild.jsonl", ["--events", "1000000"], ["--events", "50000"]),
    ("bench.bench_quota_view", "quota_view.jsonl", [], []),
    ("bench.bench_compression", "compression.jsonl", ["--events", "200000"],
     ["--events", "50000", "--rounds", "1"]),
    ("bench.bench_latency", "latency.jsonl", [],
     ["--seconds", "5", "--hold-seconds", "10", "--probes", "1"]),
    ("bench.bench_dedup", "dedup.jsonl", [], ["--ids", "300000"]),
    ("bench.bench_read", "read.jsonl", ["--requests", "1000", "--seconds", "10"],
     ["--events", "500000", "--tenants", "1000", "--requests", "300", "--seconds", "5",
      "--rounds", "1"]),
]
PROFILED = {"bench.bench_worker", "bench.bench_projection", "bench.bench_latency",
            "bench.bench_read", "bench.bench_rebuild"}


def main() -> int:
    parser = argparse.ArgumentParser(description="run every Tally benchmark")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--only", nargs="*", default=None,
                        help="these benchmarks only: module names, or their short names "
                        "(producer, worker, projection, quota_view, compression, latency, "
                        "dedup, read)")
    args = parser.parse_args()
    raw = args.out_dir / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    failed = []
    seconds: dict[str, float] = {}
    run_started = time.monotonic()
    for module, results, full, quick in BENCHES:
        if args.only is not None and not {module, module.removeprefix("bench.bench_")
                                          } & set(args.only):
            continue
        started = time.monotonic()
        print(f"== {module}", flush=True)
        extra = ["--profile-dir", str(raw)] if module in PROFILED else []
        result = subprocess.run([sys.executable, "-m", module, *(quick if args.quick else full),
                                 "--out", str(raw / results), *extra])
        seconds[module.removeprefix("bench.")] = round(time.monotonic() - started, 1)
        print(f"   ({seconds[module.removeprefix('bench.')]:.0f}s)", flush=True)
        if result.returncode != 0:
            failed.append(module)
    total = time.monotonic() - run_started
    print(f"all benchmarks: {total / 60:.1f} min", flush=True)
    # A full run into the committed folder also refreshes the README's table.
    readme = (["--readme", "README.md"]
              if not args.quick and args.only is None
              and args.out_dir.resolve() == Path("bench/results").resolve() else [])
    subprocess.run([sys.executable, "-m", "bench.report", str(raw), str(args.out_dir),
                    "--seconds", str(round(total)), "--bench-seconds",
                    orjson.dumps(seconds).decode(), *readme], check=True)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
