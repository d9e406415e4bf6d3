"""CPU time per projector transaction, Postgres's and the projector's, on embedded Postgres.

    python -m bench.bench_pg_cpu --transactions 200 --rounds 2

Commits `--transactions` batches of one accepted record (EVENTS_PER_RECORD events) through
`Projector.prepare` and `Projector.commit` (small transactions: the freshness regime, where
a batch's fixed costs weigh), on a fresh database per round, and prints the CPU time the
Postgres backend (from /proc, clock ticks) and this process spent per transaction. CPU
time, unlike wall time, hardly depends on what else the shared machine runs. Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from bench.bench_projection import EVENTS_PER_RECORD, database, make_records, postgres
from projections.projector import Projector
from runtime.gc_tuning import tune_gc
from runtime.postgres import Connection, connect, migrate
from runtime.settings import Settings

_TICK = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def run(conn: Connection, records: list[ConsumerRecord[bytes, bytes]],
        settings: Settings) -> tuple[float, float]:
    """(Postgres, projector) CPU seconds per transaction."""
    projector = Projector(settings)
    tp = TopicPartition(settings.topics.usage_accepted, 0)
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    pid = int(row[0])

    async def commit_each() -> None:
        for r in records:
            assert await projector.commit(conn, projector.prepare({tp: [r]}))

    backend, own = backend_cpu(pid), time.process_time()
    asyncio.run(commit_each())
    return ((backend_cpu(pid) - backend) / len(records),
            (time.process_time() - own) / len(records))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    settings = Settings()
    pairs, _ = make_records(args.transactions * EVENTS_PER_RECORD, 200)
    records: list[ConsumerRecord[bytes, bytes]] = [
        ConsumerRecord(settings.topics.usage_accepted, 0, offset, 0, 0, key, value, None, 0,
                       0, ())
        for offset, (key, value) in enumerate(pairs)]
    tune_gc()  # as `tally project` does
    with postgres() as admin_url:
        for _ in range(args.rounds):
            with database(admin_url) as url:
                migrate(url)
                with connect(url) as conn:
                    backend, own = run(conn, records, settings)
            print(f"{len(records)} transactions of {EVENTS_PER_RECORD} events:"
                  f" Postgres {backend * 1e3:.2f} ms, projector {own * 1e3:.2f} ms of CPU each",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
