"""What one projector transaction applies (`Batch`) and what it could not apply (`Problem`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

import psycopg
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from projections.ledger import Accepted, stage_accepted
from schemas.records import DeadLetter, dead_letter_text

Record: TypeAlias = ConsumerRecord[bytes, bytes]
Records: TypeAlias = list[Record]

# Errors that mean "this data breaks a constraint", as opposed to a lost connection: the
# rows are reported, the batch goes on. Anything else propagates and the process restarts
# from the stored offsets.
REJECTED = (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.CardinalityViolation)


@dataclass(frozen=True)
class Problem:
    """A record (item -1) or one event of a batch record that was not applied, and why."""

    topic: str
    partition: int
    offset: int
    item: int
    reason: str
    detail: str
    record_timestamp: datetime
    key: str | None = None
    value: str = ""  # the record or event as text, for its dead letter

    def dead_letter(self) -> DeadLetter:
        return DeadLetter(reason=self.reason, detail=self.detail, source_topic=self.topic,
                          source_partition=self.partition, source_offset=self.offset,
                          index=None if self.item < 0 else self.item, key=self.key,
                          value=self.value)



def record_time(r: Record) -> datetime:
    return datetime.fromtimestamp(r.timestamp / 1000, UTC)


class Batch:
    """What one transaction applies: a fetched batch, with its accepted events decoded and
    staged (`Projector.prepare`).

    It carries its own problems and counts: `Projector.project` prepares the next batch
    while this one commits.
    """

    def __init__(self, fetched: dict[TopicPartition, Records]) -> None:
        # The next offset of each (topic, partition) it covers.
        self.offsets = {(tp.topic, tp.partition): records[-1].offset + 1
                        for tp, records in fetched.items() if records}
        self.records = sum(len(records) for records in fetched.values())
        self.by_topic: dict[str, Records] = {}
        for tp, records in fetched.items():
            self.by_topic.setdefault(tp.topic, []).extend(records)
        self.accepted: list[tuple[Record, list[tuple[int, Accepted]]]] = []
        self.staged = stage_accepted([])
        self.events = 0
        self.new_rows = 0
        self.problems: list[Problem] = []

    def stage(self, accepted: list[tuple[Record, list[tuple[int, Accepted]]]]) -> None:
        """Stage the applicable accepted events: (record, [(position in it, event)])."""
        self.accepted = accepted
        self.events = sum(len(pairs) for _, pairs in accepted)
        self.staged = stage_accepted((r.offset, pairs) for r, pairs in accepted)

    def report(self, r: Record, item: int, reason: str, detail: str,
               raw: Any = None) -> None:
        """Report the record (`item` -1) or its event number `item`, `raw` as read (the
        record's value if None)."""
        key = None if r.key is None else r.key.decode("utf-8", "replace")
        text = dead_letter_text(r.value or b"" if raw is None else raw)
        self.problems.append(Problem(r.topic, r.partition, r.offset, item, reason,
                                     detail[:2000], record_time(r), key, text))
