"""CPU time per event of the stages' own code paths, in-process (no broker, no Postgres).

    python -m bench.bench_cpu --stage worker-batch --rounds 5
    python -m bench.bench_cpu --stage all --profile

On a shared machine wall-clock throughput is noise; the CPU time a stage's Python spends on
a fixed corpus is much steadier. Stages (each a fresh state per round, corpus built once):
- prebatch-batch / prebatch-single: the pre-batching stage's `_frames` (checks each record
  into rows and packs frames) on batch records (500 events) / one-event records;
- worker-batch / worker-single: the worker's agent on those frames: `process_usage` of
  each entry, `drain` every DRAIN_EVENTS events, and the encoding of the effects
  (`Worker._records`), as in `streams/app.py`;
- projector: `Projector.prepare` (decode, check and stage for COPY) of the accepted
  records the worker wrote for the batch corpus, in batches of PROJECTOR_BATCH records.
The cycle collector is tuned as the stages' processes tune it (`tune_gc`). Prints, per
stage, microseconds of CPU (time.process_time) per event: the median of `--rounds`
rounds. For an A/B, run this file under two checkouts alternately (one round each, many
times) and compare the medians.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from bench.bench_worker import make_records
from projections.projector import Projector
from runtime.settings import Settings
from schemas.plans import default_catalog_path, load_catalog
from streams import frames, prebatch
from streams.app import Worker, tune_gc
from streams.processor import PartitionProcessor, ProcessorConfig

BATCH_EVENTS = 100_000
SINGLE_EVENTS = 20_000
DRAIN_EVENTS = 5_000  # a worker batch at ~20k events/s
PROJECTOR_BATCH = 40  # accepted records (of ~500 events) per projector transaction


def _consumer_records(topic: str, pairs: list[tuple[bytes, bytes]],
                      timestamp_ms: int) -> list[Any]:
    return [ConsumerRecord(topic, 0, offset, timestamp_ms + offset // 50, 0, key, value,
                           None, len(key), len(value), ())
            for offset, (key, value) in enumerate(pairs)]


class Corpus:
    def __init__(self, batch_events: int, single_events: int) -> None:
        self.settings = Settings()
        self.catalog = load_catalog(default_catalog_path())
        now_ms = int(time.time() * 1000)
        topic = self.settings.topics.usage
        self.records = {
            "batch": _consumer_records(topic, make_records(batch_events, 500), now_ms),
            "single": _consumer_records(topic, make_records(single_events, 1), now_ms),
        }
        self.events = {"batch": batch_events, "single": single_events}
        self.frames = {kind: prebatch._frames(rs)[0] for kind, rs in self.records.items()}
        self.accepted = self._accepted()

    def worker(self, kind: str) -> list[Any]:
        """Run the worker's agent over the frames of `kind`; the effects' records."""
        processor = PartitionProcessor(0, self.catalog, ProcessorConfig())
        worker = SimpleNamespace(topics=self.settings.topics)
        usage = self.settings.topics.usage
        sends: list[Any] = []
        for frame in self.frames[kind]:
            for offset, timestamp_ms, key, value, checked in frames.decode(frame):
                processor.process_usage(usage, offset, key, value, timestamp_ms, checked)
            if processor.counted_since_drain >= DRAIN_EVENTS or frame is self.frames[kind][-1]:
                sends += Worker._records(worker, 0, processor.drain())  # type: ignore[arg-type]
        return sends

    def _accepted(self) -> list[Any]:
        """The accepted records the worker writes for the batch corpus."""
        topic = self.settings.topics.usage_accepted
        pairs = [(key.encode(), value) for _, key, value, _ in
                 (s for s in self.worker("batch") if s[0] == topic)]
        return _consumer_records(topic, pairs, 0)

    def project(self) -> None:
        projector = Projector(self.settings)
        tp = TopicPartition(self.settings.topics.usage_accepted, 0)
        for i in range(0, len(self.accepted), PROJECTOR_BATCH):
            batch = projector.prepare({tp: self.accepted[i:i + PROJECTOR_BATCH]})
            assert not batch.problems, batch.problems[:3]


def stages(c: Corpus) -> dict[str, tuple[Callable[[], object], int]]:
    return {
        "prebatch-batch": (lambda: prebatch._frames(c.records["batch"]), c.events["batch"]),
        "prebatch-single": (lambda: prebatch._frames(c.records["single"]), c.events["single"]),
        "worker-batch": (lambda: c.worker("batch"), c.events["batch"]),
        "worker-single": (lambda: c.worker("single"), c.events["single"]),
        "projector": (c.project, c.events["batch"]),
    }


def cpu_us(run: Callable[[], object], events: int) -> float:
    gc.collect()  # the previous round's garbage is not this one's cost
    started = time.process_time()
    run()
    return (time.process_time() - started) / events * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one round each")
    parser.add_argument("--default-gc", action="store_true",
                        help="leave the cycle collector at Python's defaults")
    parser.add_argument("--batch-events", type=int, default=BATCH_EVENTS)
    parser.add_argument("--single-events", type=int, default=SINGLE_EVENTS)
    args = parser.parse_args()
    table = stages(Corpus(args.batch_events, args.single_events))
    if not args.default_gc:
        tune_gc()  # as the stages' processes do
    names = list(table) if args.stage == "all" else args.stage.split(",")
    for name in names:
        run, events = table[name]
        run()  # warm caches
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(run)
            print(f"--- {name}")
            pstats.Stats(profile).sort_stats("tottime").print_stats(14)
            continue
        samples = [cpu_us(run, events) for _ in range(args.rounds)]
        print(f"{name} {statistics.median(samples):.3f} us/event "
              f"(rounds: {' '.join(f'{s:.3f}' for s in samples)})")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
