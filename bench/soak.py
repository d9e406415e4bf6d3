"""`make soak`: a long steady run, watching memory and lag, then the exact books.

    python -m bench.soak [--minutes 10] [--rate 1500] [--tenants 1200] [--every 5]
                         [--out-dir bench/results]

The pipeline of `make faults` (bench/pipeline.py, every service a real process) takes
`--rate` events/s over `--tenants` tenants (bench/traffic.py: half through the SDK, half
through the gateway, 1% re-sent with their ids) for `--minutes`. Every `--every` seconds
it samples:
- resident memory of each Tally process tree (the worker with its pre-batching child),
  and of Postgres and the broker (reported, not judged: Tansu keeps every record in
  memory, so it grows with the data sent, DESIGN.md);
- consumer lag, in records: log end offsets less committed offsets for the worker's
  pre-batching stage (`tally.usage`) and the worker (`tally.usage.batched`), less the
  projector's stored offsets (`tally.usage.accepted`); Tansu reports ends short of the
  last batch, so each partition is clamped at 0;
- the end-to-end backlog: events accepted but not yet in the ledger (exact);
- events/s accepted and events/s into the ledger.
Then it drains and accounts (published = ledger + dead letters + duplicates, as the fault
table does) and judges the run by the rules in RULES, on the samples after warm-up
(the first WARMUP_SHARE of the run, at least a minute when the run is long enough).

Writes `<out-dir>/soak.md`, `soak.json` and `soak.png`; exits 1 when a rule fails.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.faults import Run, account, drain, machine
from bench.pipeline import SERVICES, log, pipeline
from bench.traffic import Traffic

MIB = 1 << 20
WARMUP_SHARE = 0.3
RSS_SLOPE_MAX = 8.0  # MiB per minute, each Tally process tree
LAG_SLOPE_MAX_SECONDS = 0.5  # growth per minute, in seconds of traffic
KEPT_RATE = 0.97
RULES = [
    f"each Tally process tree's RSS grows by less than {RSS_SLOPE_MAX:.0f} MiB/min after "
    "warm-up (least-squares slope; the worker's dedup window holds each id of its lateness "
    "window at ~20 bytes by design: ~1.7 MiB/min at 1,500 events/s)",
    f"no lag grows: each consumer's lag and the end-to-end backlog grow by less than "
    f"{LAG_SLOPE_MAX_SECONDS} s of traffic per minute after warm-up",
    f"the pipeline keeps the rate: at least {KEPT_RATE:.0%} of the target accepted",
    "exact books at the end: lost = published - ledger - dead letters - duplicates = 0",
    "no service exits by itself",
]


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per minute; 0 for fewer than 2 points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return 60 * sum((x - mx) * (y - my) for x, y in points) / var


def _ledger_total(database_url: str) -> int | None:
    try:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=3) as conn:
            row = conn.execute("SELECT count(*) FROM tally.usage_events").fetchone()
        return int(row[0]) if row else 0
    except psycopg.Error:
        return None


def sample(run: Run, started: float, last: dict[str, Any] | None) -> dict[str, Any]:
    pipe = run.pipe
    now = time.monotonic()
    accepted = run.traffic.books.distinct()
    ledger = _ledger_total(pipe.settings.require_database())
    try:
        lag: dict[str, int] = pipe.lag()
    except Exception as e:  # the broker busy: a gap in the series, not a failure
        log(f"  lag not read: {e}")
        lag = {}
    point: dict[str, Any] = {
        "t": round(now - started, 1),
        "rss_mib": {k: round(v / MIB, 1) for k, v in pipe.rss().items()},
        "lag_records": lag, "accepted": accepted, "ledger": ledger,
        "backlog": None if ledger is None else max(accepted - ledger, 0),
    }
    if last is not None and ledger is not None and last["ledger"] is not None:
        dt = point["t"] - last["t"]
        point["accepted_per_s"] = round((accepted - last["accepted"]) / dt)
        point["ledger_per_s"] = round((ledger - last["ledger"]) / dt)
    return point


def judge(samples: list[dict[str, Any]], rate: float, seconds: float,
          lost: int, exits: int, published: int) -> tuple[dict[str, Any], list[str]]:
    """Slopes after warm-up, and the rules that fail."""
    warm = max(seconds * WARMUP_SHARE, min(60.0, seconds / 2))
    after = [s for s in samples if s["t"] >= warm]
    rss = {name: 0.0 + round(slope_per_minute([(s["t"], s["rss_mib"][name]) for s in after
                                         if name in s["rss_mib"]]), 2)
           for name in (*SERVICES, "postgres", "broker")}
    lags = {name: 0.0 + round(slope_per_minute([(s["t"], s["lag_records"][name]) for s in after
                                          if name in s["lag_records"]]), 1)
            for name in ("worker (pre-batching)", "worker", "projector")}
    lags["end-to-end backlog"] = round(slope_per_minute(
        [(s["t"], s["backlog"]) for s in after if s["backlog"] is not None]), 1)
    failed = [f"{name} RSS grows {v} MiB/min" for name, v in rss.items()
              if name in SERVICES and v >= RSS_SLOPE_MAX]
    failed += [f"{name} lag grows {v:,.0f} records/min" for name, v in lags.items()
               if v >= LAG_SLOPE_MAX_SECONDS * rate]
    kept = published / (rate * seconds) if seconds else 0.0
    if kept < KEPT_RATE:
        failed.append(f"only {kept:.1%} of the target rate accepted")
    if lost:
        failed.append(f"{lost} events lost")
    if exits:
        failed.append(f"{exits} services exited by themselves")
    return {"warmup_s": round(warm), "rss_mib_per_min": rss, "lag_records_per_min": lags,
            "kept_rate": round(kept, 4)}, failed


def chart(samples: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    minutes = [s["t"] / 60 for s in samples]
    for name in (*SERVICES, "postgres"):
        top.plot(minutes, [s["rss_mib"].get(name) for s in samples], label=name)
    top.set_ylabel("RSS (MiB)")
    top.legend(fontsize=8, ncol=3)
    top.set_title("make soak: resident memory and lag")
    for name in ("worker (pre-batching)", "worker", "projector"):
        bottom.plot(minutes, [s["lag_records"].get(name) for s in samples], label=name)
    bottom.plot(minutes, [s["backlog"] for s in samples], label="end-to-end backlog (events)",
                linestyle="--")
    bottom.set_ylabel("lag (records)")
    bottom.set_xlabel("minutes")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_results(out_dir: Path, result: dict[str, Any], samples: list[dict[str, Any]]
                  ) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps({**result, "samples": samples},
                                                  indent=1) + "\n")
    chart(samples, out_dir / "soak.png")
    p, info, slopes = result["params"], result["run"], result["slopes"]
    books = result["books"]
    last = samples[-1] if samples else {"rss_mib": {}}
    rss_lines = "\n".join(
        f"| {name} | {last['rss_mib'].get(name, '-')} | {v} |"
        for name, v in slopes["rss_mib_per_min"].items())
    lag_lines = "\n".join(f"| {name} | {v:,} |"
                          for name, v in slopes["lag_records_per_min"].items())
    failed = result["failed"]
    (out_dir / "soak.md").write_text(f"""# Soak (`make soak`)

Run {info['date']} on commit {info['commit']}{' (with uncommitted changes)' if info['dirty']
else ''}, {info['cpus']} cores shared with other work ({info['platform']}, load average at the end
{info['load_average']}): {p['rate']:.0f} events/s over {p['tenants']:,} tenants for
{p['minutes']:g} min, sampled every {p['every']:g} s. {p.get('note', '')}

**{'PASS' if not failed else 'FAIL: ' + '; '.join(failed)}**

Books: published {books['published']:,} = ledger {books['ledger']:,} + dead letters
{books['dead_letters']} + duplicates {books['duplicates']:,} + lost {books['lost']};
{slopes['kept_rate']:.1%} of the target rate accepted.

Slopes after a warm-up of {slopes['warmup_s']} s (least squares, per minute):

| process tree | RSS at the end (MiB) | RSS growth (MiB/min) |
| --- | ---: | ---: |
{rss_lines}

| consumer | lag growth (records/min) |
| --- | ---: |
{lag_lines}

Rules:
{chr(10).join('- ' + r for r in RULES)}

![soak](soak.png)

Samples: `soak.json`. Notes: {'; '.join(result['notes']) or 'none'}.
""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=1500)
    parser.add_argument("--tenants", type=int, default=1200)
    parser.add_argument("--every", type=float, default=5)
    parser.add_argument("--note", default="", help="a sentence for the results file")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.tenants < 1 or args.every <= 0:
        parser.error("--minutes, --rate, --tenants and --every must be positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack on the way out
    seconds = args.minutes * 60
    samples: list[dict[str, Any]] = []
    with pipeline() as pipe:
        tenants = [f"soak-{i:04d}" for i in range(args.tenants)]
        traffic = Traffic(pipe, args.rate, tenants, "soak").start()
        run = Run(pipe, traffic, tenants)
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            samples.append(sample(run, started, samples[-1] if samples else None))
            s = samples[-1]
            log(f"  {elapsed / 60:4.1f} min: accepted {s['accepted']:,}, backlog "
                f"{s['backlog']}, lag {s['lag_records']}, RSS MiB {s['rss_mib']}")
            time.sleep(max(args.every - (time.monotonic() - started - elapsed), 0.1))
        traffic.stop()
        log("waiting for the ledger to drain")
        drain_started = time.monotonic()
        drained = drain(pipe, run, set(), timeout=max(150.0, 2 * seconds))
        drain_s = time.monotonic() - drain_started
        code, took = pipe.run_push(timeout=600)
        log(f"push-usage exit {code} in {took:.0f}s")
        row = account(pipe, run, "soak", set())
        exits = len(pipe.exits)
        notes = row.notes + [f"{e.service} exited by itself (code {e.code})"
                             for e in pipe.exits]
        notes.insert(0, f"drained in {drain_s:.0f}s after the traffic stopped" if drained
                     else f"not drained within {drain_s:.0f}s; the books were read after the "
                     f"push job ({took:.0f}s later): 'lost' counts whatever was still in "
                     "flight then, and Stripe lacks what arrived during the push")
    slopes, failed = judge(samples, args.rate, seconds, row.lost, exits, row.published)
    result = {"run": machine(), "params": {"minutes": args.minutes, "rate": args.rate,
                                           "tenants": args.tenants, "every": args.every,
                                           "note": args.note},
              "books": {"published": row.published, "ledger": row.ledger,
                        "dead_letters": row.dead_letters, "duplicates": row.duplicates,
                        "lost": row.lost},
              "slopes": slopes, "failed": failed, "notes": notes}
    write_results(args.out_dir, result, samples)
    print(json.dumps({k: result[k] for k in ("books", "slopes", "failed")}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
