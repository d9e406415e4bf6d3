"""Rebuild benchmark: `tally projections rebuild` of `--events` accepted events on the
embedded stack, against the live projector (`tally project`'s Projector) over the same log
in the same run (issue 17: a rebuild of 1M events in under 2 minutes).

    python -m bench.bench_rebuild --events 1000000 --out bench/results/rebuild.jsonl

1. the events (records of 100, as the worker writes them; 10% redelivered) are published
   to a fresh `tally.usage.accepted` of 4 partitions, in a fresh database;
2. projector: `Projector.run` from offset 0 until its stored offsets reach the log's end;
   the seconds from its start;
3. rebuild: `projections.rebuild.rebuild` over the same log (build beside, swap, VACUUM),
   its progress lines printed as the command prints them; the seconds of the whole
   command, and of its build phase (the last progress line).
The live tables hold the projector's rows when the rebuild swaps, so the swap is measured
at full size. Starts its own Tansu and Postgres unless KAFKA_BOOTSTRAP_SERVERS /
DATABASE_URL are set. Appends one JSON object to `--out` and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg

from bench.bench_projection import EVENTS_PER_RECORD, make_records
from bench.bench_worker import publish
from bench.profiling import Profile, format_summary
from bench.scratch import scratch_home
from devtools import devstack
from projections.projector import Projector
from projections.rebuild import Progress, checksum, rebuild
from runtime import kafka
from runtime.postgres import connect, migrate
from runtime.settings import Settings


def _stored(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT coalesce(sum(next_offset), 0) FROM tally.projection_offsets"
                           " WHERE projection = 'read_models'").fetchone()
    return int(row[0]) if row else 0


async def _project(settings: Settings, url: str, records: int) -> float:
    """Seconds the live projector takes from its start to the log's end."""
    projector = Projector(settings)
    started = time.perf_counter()
    task = asyncio.create_task(projector.run())
    while await asyncio.to_thread(_stored, url) < records:
        if task.done():
            task.result()
            raise RuntimeError("the projector stopped")
        await asyncio.sleep(0.05)
    seconds = time.perf_counter() - started
    projector.stop()
    await task
    return seconds


def _digests(url: str) -> dict[str, Any]:
    """The checksums of the read models, the ledger's without its log position: the
    generated log redelivers events in records of other partitions, so which copy is
    first (the position the ledger keeps) depends on how the partitions interleave."""
    with connect(url) as conn:
        digests: dict[str, Any] = dict(checksum(conn))
        digests["usage_events"] = conn.execute(
            "SELECT count(*), sum(('x' || substr(md5((to_jsonb(t) - 'log_offset'"
            " - 'log_index')::text), 1, 15))::bit(60)::bigint) FROM tally.usage_events t"
        ).fetchone()
    return digests


def _fresh_database(admin_url: str) -> str:
    name = f"bench_rebuild_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, query = admin_url.partition("?")
    return base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--max-records", type=int, default=1000,
                        help="records per rebuild transaction (the command's default)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/rebuild.jsonl"))
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="py-spy summary of the rebuild (this process) there")
    args = parser.parse_args()
    home = scratch_home("tally-bench-rebuild-")
    with devstack.embedded_where_missing(home, os.environ) as env:
        url = _fresh_database(env["DATABASE_URL"])
        settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"],
                            database_url=url, topic_prefix=f"bench-rebuild-{uuid.uuid4().hex[:6]}.",
                            partitions=4)
        asyncio.run(kafka.ensure_topics(settings))
        migrate(url)
        values, distinct = make_records(args.events, args.tenants)
        started = time.perf_counter()
        asyncio.run(publish(settings, values, settings.topics.usage_accepted))
        print(f"published {args.events:,} events in {len(values):,} records"
              f" ({time.perf_counter() - started:.1f}s)", flush=True)

        projector_seconds = asyncio.run(_project(settings, url, len(values)))
        print(f"projector: {projector_seconds:.1f}s,"
              f" {args.events / projector_seconds:,.0f} events/s", flush=True)
        projected = _digests(url)

        last: list[Progress] = []

        def shown(p: Progress) -> None:
            last[:] = [p]
            print(p.line(), file=sys.stderr, flush=True)

        profiler = (Profile(os.getpid()).__enter__() if args.profile_dir is not None
                    else None)
        started = time.perf_counter()
        report = asyncio.run(rebuild(settings, max_records=args.max_records, progress=shown))
        rebuild_seconds = time.perf_counter() - started
        if profiler is not None and args.profile_dir is not None:
            profiler.__exit__()
            args.profile_dir.mkdir(parents=True, exist_ok=True)
            (args.profile_dir / "profile-rebuild.txt").write_text(format_summary(
                f"projections rebuild, {args.events:,} events", profiler.summary()) + "\n")
        rebuilt = _digests(url)
        if rebuilt != projected:
            raise RuntimeError(f"the rebuilt tables differ: {rebuilt} != {projected}")
    build_seconds = last[-1].seconds if last else rebuild_seconds
    row: dict[str, Any] = {
        "bench": "rebuild", "events": args.events, "records": len(values),
        "distinct_events": distinct, "events_per_record": EVENTS_PER_RECORD,
        "rebuild_seconds": round(rebuild_seconds, 1),
        "rebuild_build_seconds": round(build_seconds, 1),
        "rebuild_phases": {k: round(v, 1) for k, v in report.phases.items()},
        "rebuild_events_per_s": round(args.events / rebuild_seconds),
        "rebuild_records": report.records,
        "projector_seconds": round(projector_seconds, 1),
        "projector_events_per_s": round(args.events / projector_seconds),
        "rebuild_vs_projector": round(projector_seconds / rebuild_seconds, 2),
        "under_2_minutes": rebuild_seconds < 120,
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "at": datetime.now(UTC).isoformat(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("ab") as f:
        f.write(orjson.dumps(row) + b"\n")
    print(orjson.dumps(row, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
