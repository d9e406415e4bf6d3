"""The worker's hot path alone: CPU time of `PartitionProcessor` folding checked usage
records (pure, no broker), to compare two source trees of Tally on this machine.

    python -m bench.bench_fold --trees /tmp/before . --rounds 9

Each round runs one child process per tree, in alternating order (this shared machine's
speed drifts from minute to minute: interleaving spreads the drift over both), and each
child reports the CPU time (`time.process_time`) of folding RECORDS records of
EVENTS_PER_RECORD events (TENANTS tenants, distinct ids, the pre-batching stage's checked
rows) and draining. Prints each tree's median and the ratio of the medians. A child
measures the tree first on its PYTHONPATH; `--child` is that child.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

RECORDS = 400
EVENTS_PER_RECORD = 500
TENANTS = 200
NOW = datetime(2026, 11, 21, 12, tzinfo=UTC)


def _child(source_partition: int | None) -> float:
    import orjson

    from schemas.fast_usage import check_record
    from schemas.plans import default_catalog_path, load_catalog
    from streams.processor import PartitionProcessor, ProcessorConfig

    catalog = load_catalog(default_catalog_path())
    records = []
    for r in range(RECORDS):
        tenant = f"tenant-{r % TENANTS}"
        events = [{"specversion": "1.0", "id": f"{r}-{i}", "source": "svc/bench",
                   "type": "tally.usage.v1", "subject": tenant,
                   "time": (NOW + timedelta(seconds=i)).isoformat(),
                   "data": {"meter": "api_calls", "quantity": "1", "dimensions": {}}}
                  for i in range(EVENTS_PER_RECORD)]
        key = tenant.encode()
        rows = check_record(key, orjson.dumps(events))
        assert rows is not None
        records.append((key, rows))
    p = PartitionProcessor(0, catalog, ProcessorConfig())
    ts = int(NOW.timestamp() * 1000)
    extra = {} if source_partition is None else {"source_partition": source_partition}
    started = time.process_time()
    for offset, (key, rows) in enumerate(records):
        p.process_usage("tally.usage", offset, key, rows, ts, True, **extra)
        if offset % 20 == 19:  # a micro-batch of the worker's
            p.drain()
    p.drain()
    return time.process_time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", nargs="+", default=["."])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--source-partition", type=int, default=None,
                        help="fold as records of this source partition (default: home)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(_child(args.source_partition))
        return 0
    seconds: dict[str, list[float]] = {tree: [] for tree in args.trees}
    for n in range(args.rounds):
        order = args.trees if n % 2 == 0 else args.trees[::-1]
        for tree in order:
            command = [sys.executable, "-m", "bench.bench_fold", "--child"]
            if args.source_partition is not None:
                command += ["--source-partition", str(args.source_partition)]
            env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
            out = subprocess.run(command, env=env, cwd=os.path.abspath(tree), check=True,
                                 capture_output=True, text=True).stdout
            seconds[tree].append(float(out))
    events = RECORDS * EVENTS_PER_RECORD
    medians = {tree: statistics.median(s) for tree, s in seconds.items()}
    for tree, s in seconds.items():
        print(f"{tree}: median {medians[tree]:.3f} s CPU for {events} events "
              f"({events / medians[tree]:,.0f} events/s); rounds {[round(x, 3) for x in s]}")
    first = args.trees[0]
    for tree in args.trees[1:]:
        print(f"{tree} / {first}: {medians[tree] / medians[first]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
