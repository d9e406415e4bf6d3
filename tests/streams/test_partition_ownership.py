"""A processor owns tenants, not a source partition: records of a tenant may come from any
partition of `tally.usage` and `tally.subscriptions` (producers with different
partitioners), and the decisions must be those of the same records read from one
partition, whatever replays and restarts happen on the way (pure, no broker)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.kafka import owner_partition
from streams.processor import PartitionProcessor, ProcessorConfig
from tests.helpers import ms, record, subscription, usage
from tests.streams.test_processor import CATALOG, DEC, NOV, NOW

USAGE, SUBSCRIPTIONS = "tally.usage", "tally.subscriptions"
HOME = 0  # the processor's partition: records from it are "home" records
SOURCES = 4
TENANTS = ["t1", "t2", "t3"]
METERS = ["api_calls", "tokens"]

# A message published once: usage carrying event ids (an id always carries the same
# event, so a later message with it is a re-send: a genuine duplicate), a subscription
# change, or a record no stage can read (a dead letter).
messages_strategy = st.lists(st.one_of(
    st.tuples(st.just("usage"), st.sampled_from(TENANTS),
              st.lists(st.integers(0, 15), min_size=1, max_size=4)),
    st.tuples(st.just("subscription"), st.sampled_from(TENANTS),
              st.sampled_from(["free", "starter", "pro"])),
    st.tuples(st.just("bad"), st.sampled_from(TENANTS), st.just("")),
), min_size=1, max_size=40)


def _value(kind: str, tenant: str, what: Any) -> bytes:
    if kind == "usage":
        return record(*[usage(tenant, METERS[i % 2], quantity=str(i % 5 + 1), event_id=f"e{i}",
                              time=NOW) for i in what])
    if kind == "subscription":
        return record(subscription(tenant, "plan_changed", what, NOV, DEC,
                                   time=NOW - timedelta(days=1)))
    return b"not json"


class Outcome:
    """What a run decided, in terms that do not depend on source positions: accepted
    events (the first time each was emitted: a replay emits it again) and dead letters,
    by message."""

    def __init__(self) -> None:
        self.accepted: dict[tuple[str, str], dict[str, Any]] = {}
        self.dead: set[tuple[int, str]] = set()

    def take(self, p: PartitionProcessor, message_at: dict[tuple[str, int, int], int]) -> None:
        effects = p.drain()
        for arrays in effects.accepted.values():
            for array in arrays:
                for event in orjson.loads(array):
                    self.accepted.setdefault((event["tenant_id"], event["event_id"]), event)
        for d in effects.dead_letters:
            message = message_at[(d.source_topic, d.source_partition, d.source_offset)]
            self.dead.add((message, d.reason))
        self.changelog = effects.changelog


def _counters(p: PartitionProcessor) -> dict[tuple[str, str, str], tuple[Decimal, int]]:
    return {(t, m, start.isoformat()): (c.value, c.event_count)
            for (t, m, start), c in p.counters.items()}


def _deliver(p: PartitionProcessor, kind: str, source: int, offset: int, tenant: str,
             value: bytes) -> None:
    if kind == "subscription":
        p.process_subscription(SUBSCRIPTIONS, offset, tenant.encode(), value, source)
    else:
        p.process_usage(USAGE, offset, tenant.encode(), value, ms(NOW), False, source)


def _restored(changelog: list[tuple[str, Any]]) -> PartitionProcessor:
    """A processor restored from the changelog as compaction leaves it."""
    p = PartitionProcessor(HOME, CATALOG, ProcessorConfig())
    for key, value in {key: value for key, value in changelog}.items():
        p.restore(key, value)
    p.finish_restore()
    return p


@settings(max_examples=150, deadline=None)
@given(messages_strategy, st.data())
def test_records_from_any_source_partition_with_replays_decide_as_one_partition(
    messages: list[tuple[str, str, Any]], data: st.DataObject,
) -> None:
    values = [_value(*m) for m in messages]

    # The reference: every record read from the processor's own partition, once.
    reference = PartitionProcessor(HOME, CATALOG, ProcessorConfig())
    expected = Outcome()
    next_offset = {USAGE: 0, SUBSCRIPTIONS: 0}
    where_ref: dict[tuple[str, int, int], int] = {}
    for i, ((kind, tenant, _), value) in enumerate(zip(messages, values, strict=True)):
        topic = SUBSCRIPTIONS if kind == "subscription" else USAGE
        where_ref[(topic, HOME, next_offset[topic])] = i
        _deliver(reference, kind, HOME, next_offset[topic], tenant, value)
        next_offset[topic] += 1
    expected.take(reference, where_ref)

    # The same messages from random source partitions, with replays of records already
    # processed (the pre-batching stage re-sending from its last commit) and restarts from
    # the drained changelog.
    p = PartitionProcessor(HOME, CATALOG, ProcessorConfig())
    got = Outcome()
    changelog: list[tuple[str, Any]] = []
    sent: dict[tuple[str, int], list[tuple[str, int, str, bytes]]] = {}
    where: dict[tuple[str, int, int], int] = {}
    for i, ((kind, tenant, _), value) in enumerate(zip(messages, values, strict=True)):
        topic = SUBSCRIPTIONS if kind == "subscription" else USAGE
        source = data.draw(st.integers(0, SOURCES - 1), label="source partition")
        log = sent.setdefault((topic, source), [])
        # Offsets start where the reference's do: equal offsets in different partitions
        # must not be taken for one record.
        offset = len(log)
        where[(topic, source, offset)] = i
        log.append((kind, offset, tenant, value))
        _deliver(p, kind, source, offset, tenant, value)
        step = data.draw(st.sampled_from(["next", "next", "replay", "restart"]), label="step")
        if step == "restart":
            got.take(p, where)
            changelog += got.changelog
            p = _restored(changelog)
        if step in ("replay", "restart"):
            topic, source = data.draw(st.sampled_from(sorted(sent)), label="replayed")
            log = sent[(topic, source)]
            start = data.draw(st.integers(0, len(log) - 1), label="replayed from")
            for kind, offset, tenant, value in log[start:]:
                _deliver(p, kind, source, offset, tenant, value)
    got.take(p, where)
    changelog += got.changelog

    assert _counters(p) == _counters(reference)
    assert got.accepted == expected.accepted
    assert got.dead == expected.dead
    assert _counters(_restored(changelog)) == _counters(reference)
    assert {t: s.plan_id for t, s in p.subscriptions.items()} == {
        t: s.plan_id for t, s in reference.subscriptions.items()}


def test_dead_letters_name_the_record_s_real_source_partition() -> None:
    p = PartitionProcessor(HOME, CATALOG, ProcessorConfig())
    p.process_usage(USAGE, 7, b"t1", b"not json", ms(NOW), False, 3)
    p.process_subscription(SUBSCRIPTIONS, 9, b"t1", b"[", 2)
    p.process_usage(USAGE, 4, b"t1", b"not json", ms(NOW))
    assert [(d.source_topic, d.source_partition, d.source_offset)
            for d in p.drain().dead_letters] == [(USAGE, 3, 7), (SUBSCRIPTIONS, 2, 9),
                                                 (USAGE, HOME, 4)]


def test_home_records_keep_the_changelog_form_older_workers_wrote() -> None:
    """A new worker restores an old worker's state unchanged, and writes the same form
    while every record comes from the home partition."""
    p = PartitionProcessor(HOME, CATALOG, ProcessorConfig())
    p.process_subscription(SUBSCRIPTIONS, 0, b"t1", _value("subscription", "t1", "pro"))
    p.process_usage(USAGE, 0, b"t1", _value("usage", "t1", [0, 2]), ms(NOW))
    home = dict(p.drain().changelog)
    assert "applied_from" not in home["s/t1"] and "applied_from" not in home[
        "c/t1/api_calls/2026-11-01T00:00:00+00:00"]
    p.process_usage(USAGE, 0, b"t1", _value("usage", "t1", [4]), ms(NOW), False, 2)
    other = dict(p.drain().changelog)
    assert other["c/t1/api_calls/2026-11-01T00:00:00+00:00"]["applied_from"] == {"2": 0}


def test_the_owner_is_the_default_partitioner_s_choice() -> None:
    """Java's and aiokafka's default partitioner (murmur2): for Tally's SDK the owner is
    the partition the record was published to. Known values from Kafka's own tests."""
    keys = (b"21", b"foobar", b"a-little-bit-long-string")
    assert [owner_partition(key, 1 << 31) for key in keys] == [
        -973932308 & 0x7FFFFFFF, -790332482 & 0x7FFFFFFF, -985981536 & 0x7FFFFFFF]
    assert {owner_partition(f"tenant-{i}".encode(), 4) for i in range(50)} == {0, 1, 2, 3}


def test_the_upgrade_re_read_of_subscriptions_from_the_earliest_changes_nothing() -> None:
    """An upgraded worker's pre-batching group has no offsets on `tally.subscriptions`
    yet and reads it from the start: records its state already applied (home records,
    in the state an older worker wrote) change nothing; one a librdkafka producer had put
    on another partition reaches its owner."""
    p = PartitionProcessor(HOME, CATALOG, ProcessorConfig())
    log = [_value("subscription", "t1", "starter"), _value("subscription", "t2", "pro"),
           _value("subscription", "t1", "pro")]
    for offset, value in enumerate(log):
        p.process_subscription(SUBSCRIPTIONS, offset, b"t2" if offset == 1 else b"t1", value)
    p.process_usage(USAGE, 0, b"t1", _value("usage", "t1", [0]), ms(NOW))
    old_state = p.drain().changelog
    upgraded = _restored(old_state)
    for offset, value in enumerate(log):  # the re-read, from the earliest
        upgraded.process_subscription(SUBSCRIPTIONS, offset, b"t2" if offset == 1 else b"t1",
                                      value)
    upgraded.process_subscription(SUBSCRIPTIONS, 0, b"t3", _value("subscription", "t3", "pro"),
                                  1)
    effects = upgraded.drain()
    assert [key for key, _ in effects.changelog if key.startswith("s/")] == ["s/t3"]
    assert effects.dead_letters == [] and effects.notifications == []
    assert {t: s.plan_id for t, s in upgraded.subscriptions.items()} == {
        "t1": "pro", "t2": "pro", "t3": "pro"}


def test_the_pre_batching_stage_sends_each_record_to_its_tenant_s_owner() -> None:
    from aiokafka import TopicPartition
    from aiokafka.structs import ConsumerRecord

    from streams import frames
    from streams.prebatch import _by_owner

    def rec(topic: str, partition: int, offset: int, key: bytes | None,
            value: bytes) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord(topic, partition, offset, 1000 + offset, 0, key, value, None,
                              len(key or b""), len(value), [])

    owner = owner_partition(b"t1", SOURCES)
    other = (owner + 1) % SOURCES
    good = _value("usage", "t1", [1])
    batch = {
        TopicPartition(USAGE, other): [rec(USAGE, other, 5, b"t1", good),
                                       rec(USAGE, other, 6, None, b"x")],
        TopicPartition(SUBSCRIPTIONS, other): [rec(SUBSCRIPTIONS, other, 2, b"t1", b"{}")],
    }
    by_owner, checked = _by_owner(batch, SUBSCRIPTIONS, SOURCES)
    assert checked == 1
    assert [(e[0], e[2], e[4], e[5]) for e in by_owner[owner]] == [
        (2, b"t1", frames.SUBSCRIPTION, other),  # subscriptions of a fetch go first
        (5, b"t1", frames.CHECKED, other)]
    assert [(e[0], e[2], e[4], e[5]) for e in by_owner[other]] == [
        (6, None, frames.RAW, other)]  # no key: its source partition number
