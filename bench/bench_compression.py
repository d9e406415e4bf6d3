"""Compression benchmark: what each codec costs the side that writes the worker's output,
the broker and a reader, against uncompressed batches in the same run.

    python -m bench.bench_compression --events 200000 --out bench/results/compression.jsonl

The records are the worker's own: `tally.usage.accepted` records, made by the processor
from the worker benchmark's batch records and joined as the worker joins them. They are
most of the bytes a worker writes. Per codec, a fresh topic is written through
`runtime.kafka.producer` (acks=all), then read back and compared byte for byte. Reported
per codec: writer and reader CPU (user + system), broker CPU (the embedded Tansu only),
and bytes on the wire per event, each also as a ratio to "none". The codecs run in
rotating order, three rounds; the figures are medians.

Starts its own Tansu unless KAFKA_BOOTSTRAP_SERVERS is set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
from aiokafka import TopicPartition, codec

from bench.bench_worker import make_records
from bench.scratch import scratch_home
from devtools import devstack
from runtime import kafka
from runtime.settings import COMPRESSIONS, Settings
from schemas.codec import join_arrays
from schemas.plans import default_catalog_path, load_catalog
from streams.app import ACCEPTED_RECORD_BYTES
from streams.processor import PartitionProcessor, ProcessorConfig

PARTITIONS = 4


def accepted_records(events: int) -> list[tuple[bytes, bytes]]:
    """(tenant, value) of the accepted-event records the worker writes for `events`
    events in records of 500."""
    processor = PartitionProcessor(0, load_catalog(default_catalog_path()), ProcessorConfig())
    now_ms = int(time.time() * 1000)
    for offset, (key, value) in enumerate(make_records(events, 500)):
        processor.process_usage("tally.usage", offset, key, value, now_ms)
    return [(tenant.encode(), value)
            for tenant, arrays in processor.drain().accepted.items()
            for value in join_arrays(arrays, ACCEPTED_RECORD_BYTES)]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def write(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    """Write `records` spread over the partitions, and wait for every acknowledgement."""
    producer = kafka.producer(settings, linger_ms=2)
    await producer.start()
    try:
        topic = settings.topics.usage_accepted
        futures = [await producer.send(topic, value, key, partition=i % PARTITIONS)
                   for i, (key, value) in enumerate(records)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def encoded_bytes(codec_name: str, records: list[tuple[bytes, bytes]]) -> int:
    """The records' values after the codec (each record is about a batch of its own)."""
    encode = _ENCODERS[codec_name]
    return sum(len(encode(value)) for _, value in records)


_ENCODERS = {"none": bytes, "snappy": codec.snappy_encode, "lz4": codec.lz4_encode,
             "zstd": codec.zstd_encode, "gzip": codec.gzip_encode}


async def read(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    """Read the topic back and check it holds `records` (each partition in order)."""
    consumer = kafka.consumer(settings)
    tps = [TopicPartition(settings.topics.usage_accepted, p) for p in range(PARTITIONS)]
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        got: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
        deadline = time.monotonic() + 120
        while sum(map(len, got.values())) < len(records):
            if time.monotonic() > deadline:
                raise RuntimeError("the records did not all come back")
            for tp, batch in (await consumer.getmany(*tps, timeout_ms=500)).items():
                got[tp.partition] += [r.value for r in batch if r.value is not None]
    finally:
        await consumer.stop()
    for p in range(PARTITIONS):
        if got[p] != [value for _, value in records[p::PARTITIONS]]:
            raise RuntimeError(f"partition {p} came back different")


def measure(settings: Settings, records: list[tuple[bytes, bytes]],
            broker_pid: int | None) -> dict[str, float]:
    """CPU seconds of writing and reading `records` once, on a fresh topic."""
    asyncio.run(kafka.ensure_topics(settings))
    cpu, broker = _cpu_seconds(), _process_cpu_seconds(broker_pid)
    asyncio.run(write(settings, records))
    written, broker_written = _cpu_seconds(), _process_cpu_seconds(broker_pid)
    asyncio.run(read(settings, records))
    return {"writer_cpu_s": written - cpu, "broker_cpu_s": broker_written - broker,
            "reader_cpu_s": _cpu_seconds() - written}


def run(address: str, broker_pid: int | None, events: int, rounds: int) -> dict[str, object]:
    records = accepted_records(events)
    tag = datetime.now(UTC).strftime("%H%M%S")
    figures: dict[str, list[dict[str, float]]] = {c: [] for c in COMPRESSIONS}
    for round_no in range(rounds):
        turn = round_no % len(COMPRESSIONS)
        order: tuple[str, ...] = COMPRESSIONS[turn:] + COMPRESSIONS[:turn]
        for name in order:
            settings = Settings(kafka_bootstrap_servers=address, partitions=PARTITIONS,
                                topic_prefix=f"bench-compression-{tag}-{round_no}-{name}.",
                                kafka_compression=name)
            figures[name].append(measure(settings, records, broker_pid))
            print(f"round {round_no + 1}/{rounds} {name}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in figures[name][-1].items()), flush=True)
    medians = {name: {k: statistics.median(f[k] for f in runs) for k in runs[0]}
               for name, runs in figures.items()}
    sizes: dict[str, int] = {c: encoded_bytes(c, records) for c in COMPRESSIONS}
    codecs: dict[str, dict[str, float]] = {}
    for name, median in medians.items():
        row = {"bytes_per_event": round(sizes[name] / events, 1),
               "size_vs_none": round(sizes[name] / sizes["none"], 3)}
        for k, v in median.items():
            row[k] = round(v, 3)
            base = medians["none"][k]
            row[k.removesuffix("_s") + "_vs_none"] = round(v / base, 2) if base else float("nan")
        codecs[name] = row
    print_table(codecs)
    return {"bench": "compression", "at": datetime.now(UTC).isoformat(), "events": events,
            "records": len(records), "rounds": rounds, "codecs": codecs,
            "broker": "embedded tansu" if broker_pid else address, "cpus": os.cpu_count()}


def print_table(codecs: dict[str, dict[str, float]]) -> None:
    print(f"{'codec':<8} {'B/event':>8} {'writer cpu':>11} {'broker cpu':>11} {'reader cpu':>11}")
    for name, row in codecs.items():
        print(f"{name:<8} {row['bytes_per_event']:>8} {row['writer_cpu_vs_none']:>10}x "
              f"{row['broker_cpu_vs_none']:>10}x {row['reader_cpu_vs_none']:>10}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/compression.jsonl"))
    args = parser.parse_args(argv)
    if args.events < 500 or args.rounds < 1:
        parser.error("--events must be at least 500 and --rounds at least 1")
    address, pid = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", ""), None
    home = scratch_home("tally-bench-compression-")
    if not address:
        address, pid = devstack.start_kafka(home)
    try:
        result = run(address, pid, args.events, args.rounds)
    finally:
        if pid is not None:
            devstack.stop_kafka(pid)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("ab") as f:
        f.write(orjson.dumps(result) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
