"""QuotaView.check micro-benchmark: latency of one local quota decision.

    python -m bench.bench_quota_view --out bench/results/quota_view.jsonl

Loads `--keys` quota states (a mix of ok, warning, blocked and unlimited meters) through
`QuotaView.apply`, the path the consumer uses, then times `--calls` calls of `check` on
random keys, one by one with perf_counter_ns, mostly with the default quantity and one in
ten with another quantity (the uncached path). No broker is needed. Appends one JSON line
{p50_us, p99_us, p999_us, max_us, ...} to `--out` and prints it. Target: p99 < 20 us.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from runtime.settings import Settings
from schemas.codec import dumps
from streams.quota_view import QuotaView

METERS = ("api_calls", "executions", "storage_gb", "seats")
TARGET_P99_US = 20.0


def state_value(tenant: str, meter: str, rng: random.Random, period_end: datetime) -> bytes:
    limit = rng.choice((1000, 20000, None))
    used = rng.randint(0, 1000 if limit is None else limit)
    blocked = limit is not None and used >= limit
    return dumps({
        "tenant_id": tenant, "meter": meter, "plan_id": "bench",
        "period_start": (period_end - timedelta(days=30)).isoformat(),
        "period_end": period_end.isoformat(), "used": str(used),
        "included": None if limit is None else str(limit),
        "limit": None if limit is None else str(limit),
        "remaining": None if limit is None else str(max(limit - used, 0)),
        "state": "blocked" if blocked else "ok",
    })


def run(keys: int, calls: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    view = QuotaView(Settings(kafka_bootstrap_servers="127.0.0.1:1", topic_prefix="bench."))
    period_end = datetime.now(UTC) + timedelta(days=20)
    loaded: list[tuple[str, str]] = []
    started = time.perf_counter()
    for i in range(keys):
        tenant, meter = f"tenant-{i // len(METERS)}", METERS[i % len(METERS)]
        view.apply(f"{tenant}/{meter}", state_value(tenant, meter, rng, period_end))
        loaded.append((tenant, meter))
    load_seconds = time.perf_counter() - started
    # Requests are planned before timing so the loop measures `check` and little else.
    plan = [(*rng.choice(loaded), 1 if rng.random() < 0.9 else rng.randint(2, 50))
            for _ in range(calls)]
    samples = [0] * calls
    check = view.check
    clock = time.perf_counter_ns
    gc.collect()
    allowed = 0
    for i, (tenant, meter, quantity) in enumerate(plan):
        t0 = clock()
        decision = check(tenant, meter, quantity)
        samples[i] = clock() - t0
        allowed += decision.allowed
    samples.sort()

    def pct(p: float) -> float:
        return round(samples[min(int(p * calls), calls - 1)] / 1000, 3)

    return {
        "bench": "quota_view_check", "at": datetime.now(UTC).isoformat(),
        "keys": keys, "calls": calls, "load_seconds": round(load_seconds, 3),
        "p50_us": pct(0.50), "p99_us": pct(0.99), "p999_us": pct(0.999),
        "max_us": round(samples[-1] / 1000, 3), "allowed_share": round(allowed / calls, 3),
        "target_p99_us": TARGET_P99_US, "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="file to append the JSON line to")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    result = run(args.keys, args.calls, args.seed)
    line = json.dumps(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(line + "\n")
    print(line)
    return 0 if float(str(result["p99_us"])) < TARGET_P99_US else 1


if __name__ == "__main__":
    sys.exit(main())
