"""How far behind the log the projector is, per partition: `tally_projection_lag_records`.

The lag is the number of records the consumer has still to read: the log's end offset
minus the consumer's position (the next offset it reads, not the offset stored in
Postgres, which trails it by the batch in flight). Two things make the plain difference
wrong, and `distance` corrects both, so the figure is never negative and never 0 while
records wait:

- Tansu under-reports the end (DESIGN.md: ListOffsets points past the first record of the
  last batch): a position past the reported end is checked against the real end, read by
  a short fetch from the last reported record (`log_ends`);
- after a log loss (broker restarted empty, topic recreated) the position lies past the
  real end: the projector resets such a partition to the log start (projector.py,
  `_outside_log`), so what it has to read is the whole log, end - start.

It is measured every few seconds by a task of its own (`LagMeter`), so it keeps telling
the truth while the projector does not fetch (waiting for Postgres, or stuck).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from projections import metrics
from runtime import kafka
from runtime.settings import Settings

log = logging.getLogger(__name__)


def distance(position: int, start: int, end: int) -> int:
    """Records to read in a partition whose log holds [start, end), for a consumer at
    `position`: end - position inside the log; the whole log when the position lies
    outside it (it is then reset to the start); never negative."""
    if start <= position <= end:
        return end - position
    return max(end - start, 0)


async def log_ends(settings: Settings, reported: dict[TopicPartition, int]
                   ) -> dict[TopicPartition, int] | None:
    """The offset after the last record of each partition: its `reported` end
    (ListOffsets), or more when its last batch holds records past it (Tansu). Read by one
    short-lived consumer from the last reported record of every partition; None when the
    broker cannot say."""
    ends = dict(reported)
    wanted = {tp: end for tp, end in reported.items() if end > 0}
    if not wanted:
        return ends
    probe = kafka.consumer(settings)
    try:
        await probe.start()
        probe.assign(list(wanted))
        for tp, end in wanted.items():
            probe.seek(tp, end - 1)
        pending, deadline = set(wanted), time.monotonic() + 3
        while pending and time.monotonic() < deadline:
            for tp, records in (await probe.getmany(timeout_ms=500)).items():
                if records:
                    ends[tp] = max(ends[tp], records[-1].offset + 1)
                    pending.discard(tp)
    except (KafkaError, OSError) as e:
        log.info("cannot read the log ends (%r)", e)
        return None
    finally:
        await probe.stop()
    return ends


class LagMeter:
    """Sets `tally_projection_lag_records` of every assigned partition every `seconds`."""

    def __init__(self, settings: Settings, consumer: AIOKafkaConsumer,
                 seconds: float = 2.0) -> None:
        self.settings = settings
        self.consumer = consumer
        self.seconds = seconds

    async def run(self) -> None:
        while True:
            with contextlib.suppress(KafkaError, OSError, TimeoutError):
                await self.measure()
            await asyncio.sleep(self.seconds)

    async def measure(self) -> dict[TopicPartition, int]:
        """One measurement of every assigned partition (also returned)."""
        positions: dict[TopicPartition, int] = {}
        for tp in self.consumer.assignment():
            with contextlib.suppress(TimeoutError, KafkaError):
                # Waits while the position is being reset (a seek to the beginning).
                positions[tp] = await asyncio.wait_for(self.consumer.position(tp), 2)
        if not positions:
            return {}
        starts, ends = await asyncio.wait_for(asyncio.gather(
            self.consumer.beginning_offsets(list(positions)),
            self.consumer.end_offsets(list(positions))), 10)
        past = {tp: ends[tp] for tp, p in positions.items() if p > ends[tp]}
        if past:
            real = await log_ends(self.settings, past)
            if real is None:  # unknown for now: no figure rather than a wrong one
                positions = {tp: p for tp, p in positions.items() if tp not in past}
            else:
                ends.update(real)
        lags = {tp: distance(p, starts[tp], ends[tp]) for tp, p in positions.items()}
        for tp, lag in lags.items():
            metrics.LAG_RECORDS.labels(tp.topic, str(tp.partition)).set(lag)
        return lags
