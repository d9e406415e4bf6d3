"""The worker's decisions, without a broker: the pure PartitionProcessor."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.plans import Catalog, MeterSpec, default_catalog_path, load_catalog
from schemas.records import AcceptedEvent
from streams.processor import PartitionProcessor, ProcessorConfig
from tests.helpers import accepted_events, ms, record, subscription, usage

CATALOG = load_catalog(default_catalog_path())
NOW = datetime(2026, 11, 21, 12, tzinfo=UTC)
NOV = datetime(2026, 11, 1, tzinfo=UTC)
DEC = datetime(2026, 12, 1, tzinfo=UTC)
TOPIC = "tally.usage"


# The default catalog and a meter counting distinct users.
UNIQUE_CATALOG = CATALOG.model_copy(update={"meters": {
    **CATALOG.meters,
    "active_users": MeterSpec(aggregation="unique_count", unique_dimension="user")}})


def processor(catalog: Catalog = CATALOG) -> PartitionProcessor:
    return PartitionProcessor(0, catalog, ProcessorConfig())


def feed(p: PartitionProcessor, offset: int, tenant: str, *events: dict[str, Any],
         at: datetime = NOW) -> None:
    p.process_usage(TOPIC, offset, tenant.encode(), record(*events), ms(at))


def total(p: PartitionProcessor, tenant: str, meter: str = "api_calls",
          start: datetime = NOV) -> Decimal:
    c = p.counters.get((tenant, meter, start))
    return c.value if c else Decimal(0)


def test_duplicate_event_is_counted_once() -> None:
    p = processor()
    e = usage("t1", quantity="5", event_id="same", time=NOW)
    feed(p, 0, "t1", e)
    feed(p, 1, "t1", e)
    feed(p, 2, "t1", e, usage("t1", quantity="2", time=NOW))
    assert total(p, "t1") == Decimal(7)
    effects = p.drain()
    assert effects.duplicates == 2
    assert len(accepted_events(effects, "t1")) == 2


def test_duplicate_inside_one_batch_record_is_counted_once() -> None:
    p = processor()
    e = usage("t1", event_id="x", time=NOW)
    feed(p, 0, "t1", e, e, e)
    assert total(p, "t1") == Decimal(1)


def test_accepted_events_match_the_published_contract() -> None:
    p = processor()
    feed(p, 0, "t1", usage("t1", quantity="2.5", time=NOW, dimensions={"endpoint": "/x"}))
    raw = accepted_events(p.drain(), "t1")[0]
    event = AcceptedEvent.model_validate(raw)
    assert (event.quantity, event.dimensions, event.plan_id) == (Decimal("2.5"),
                                                                {"endpoint": "/x"}, "free")
    assert event.model_dump(mode="json").keys() == raw.keys()


def test_replayed_record_changes_nothing() -> None:
    p = processor()
    feed(p, 0, "t1", usage("t1", quantity="3", time=NOW), usage("t1", quantity="4", time=NOW))
    value = record(usage("t1", quantity="10", time=NOW))
    p.process_usage(TOPIC, 1, b"t1", value, ms(NOW))
    p.process_usage(TOPIC, 1, b"t1", value, ms(NOW))  # redelivery of the same record
    assert total(p, "t1") == Decimal(17)


def test_malformed_event_goes_to_dlq_and_neighbours_are_counted() -> None:
    p = processor()
    bad = usage("t1", quantity="-1", time=NOW)
    feed(p, 0, "t1", usage("t1", time=NOW), bad, usage("t1", time=NOW))
    fx = p.drain()
    assert total(p, "t1") == Decimal(2)
    assert [(d.reason, d.index) for d in fx.dead_letters] == [("quantity_out_of_range", 1)]


def test_each_dlq_reason_is_named_and_neighbours_still_count() -> None:
    p = processor()
    wrong_type = usage("t1", time=NOW)
    wrong_type["type"] = "something.else"
    cases = {
        "invalid_event": {**usage("t1", time=NOW), "time": "yesterday"},
        "unknown_type": wrong_type,
        "subject_mismatch": usage("someone-else", time=NOW),
        "unknown_meter": usage("t1", meter="gpu_hours", time=NOW),
        "quantity_out_of_range": usage("t1", quantity="1e20", time=NOW),
        "time_in_future": usage("t1", time=NOW + timedelta(hours=1)),
    }
    for offset, bad in enumerate(cases.values()):
        feed(p, offset, "t1", usage("t1", time=NOW), bad)
    p.process_usage(TOPIC, 50, b"t1", b"{not json", ms(NOW))
    p.process_usage(TOPIC, 51, None, record(usage("t1", time=NOW)), ms(NOW))
    fx = p.drain()
    reasons = [d.reason for d in fx.dead_letters]
    assert reasons == [*cases, "invalid_json", "missing_key"]
    assert total(p, "t1") == Decimal(len(cases))


def test_quota_state_turns_blocked_at_the_hard_limit() -> None:
    p = processor()
    feed(p, 0, "t1", *[usage("t1", quantity="100", time=NOW) for _ in range(9)])
    assert p.drain().quota_states[-1].state == "warning"
    feed(p, 1, "t1", usage("t1", quantity="100", time=NOW))
    fx = p.drain()
    state = fx.quota_states[-1]
    assert (state.state, state.used, state.limit, state.remaining) == (
        "blocked", Decimal(1000), Decimal(1000), Decimal(0))
    assert [n.kind for n in fx.notifications] == ["soft_limit", "blocked"]


def test_each_threshold_is_notified_once() -> None:
    p = processor()
    feed(p, 0, "t1", usage("t1", quantity="900", time=NOW))
    first = p.drain().notifications
    feed(p, 1, "t1", usage("t1", quantity="1", time=NOW))
    assert len(first) == 1 and p.drain().notifications == []


def test_subscription_sets_plan_and_anniversary_period() -> None:
    p = processor()
    start = datetime(2026, 11, 10, tzinfo=UTC)
    sub = subscription("t1", "created", "pro", start, datetime(2026, 12, 10, tzinfo=UTC))
    p.process_subscription("tally.subscriptions", 0, b"t1", record(sub))
    feed(p, 0, "t1", usage("t1", quantity="5000", time=NOW))
    fx = p.drain()
    assert accepted_events(fx, "t1")[0]["plan_id"] == "pro"
    assert accepted_events(fx, "t1")[0]["period_start"] == start.isoformat()
    assert fx.quota_states[-1].included == Decimal(100000)


def test_plan_upgrade_mid_period_keeps_usage_and_switches_limits() -> None:
    p = processor()
    feed(p, 0, "t1", usage("t1", quantity="1000", time=NOW))
    assert p.drain().quota_states[-1].state == "blocked"
    upgrade = subscription("t1", "plan_changed", "starter", NOV, DEC, time=NOW)
    p.process_subscription("tally.subscriptions", 0, b"t1", record(upgrade))
    state = p.drain().quota_states[-1]
    assert (state.plan_id, state.used, state.state) == ("starter", Decimal(1000), "ok")


def test_late_event_within_window_counts_in_its_own_period() -> None:
    p = processor()
    arrival = DEC + timedelta(minutes=30)  # api_calls lateness is one hour
    feed(p, 0, "t1", usage("t1", time=DEC - timedelta(minutes=1)), at=arrival)
    accepted = AcceptedEvent.model_validate(accepted_events(p.drain(), "t1")[0])
    assert (accepted.period_start, accepted.late, accepted.adjustment) == (NOV, True, False)


def test_too_late_event_is_an_adjustment_in_the_open_period() -> None:
    p = processor()
    arrival = DEC + timedelta(hours=2)
    feed(p, 0, "t1", usage("t1", quantity="4", time=DEC - timedelta(minutes=1)), at=arrival)
    accepted = AcceptedEvent.model_validate(accepted_events(p.drain(), "t1")[0])
    assert (accepted.period_start, accepted.adjustment) == (DEC, True)
    assert total(p, "t1", start=DEC) == Decimal(4)
    assert total(p, "t1", start=NOV) == Decimal(0)


def test_trial_ending_is_notified_once_and_survives_a_restart() -> None:
    p = processor()
    trial_end = NOW + timedelta(days=2)
    sub = subscription("t1", "created", "pro", NOV, DEC, time=NOV, trial_end=trial_end)
    p.process_subscription("tally.subscriptions", 0, b"t1", record(sub))
    feed(p, 0, "t1", usage("t1", time=NOW))
    fx = p.drain()
    assert [n.kind for n in fx.notifications] == ["trial_ending"]
    restarted = processor()
    for key, value in fx.changelog:
        restarted.restore(key, value)
    feed(restarted, 1, "t1", usage("t1", time=NOW))
    feed(p, 1, "t1", usage("t1", time=NOW))
    assert restarted.drain().notifications == [] and p.drain().notifications == []


def test_cancellation_at_once_returns_the_tenant_to_the_default_plan() -> None:
    p = processor()
    p.process_subscription("tally.subscriptions", 0, b"t1",
                           record(subscription("t1", "created", "pro", NOV, DEC)))
    cancel = subscription("t1", "canceled", "pro", NOV, DEC, time=NOW - timedelta(hours=1))
    p.process_subscription("tally.subscriptions", 1, b"t1", record(cancel))
    feed(p, 0, "t1", usage("t1", time=NOW))
    assert accepted_events(p.drain(), "t1")[0]["plan_id"] == "free"


def test_a_plan_change_between_records_of_one_batch_applies_to_the_next_record() -> None:
    # Placements are remembered across the records of a batch: a subscription change in
    # the same batch, or an event turning late, must still be seen.
    p = processor()
    feed(p, 0, "t1", usage("t1", time=NOW))
    feed(p, 1, "t1", usage("t1", time=NOW))
    p.process_subscription("tally.subscriptions", 0, b"t1",
                           record(subscription("t1", "created", "pro", NOV, DEC)))
    feed(p, 2, "t1", usage("t1", time=NOW))
    feed(p, 3, "t1", usage("t1", time=NOV + timedelta(days=29)), at=DEC + timedelta(minutes=5))
    cancel = subscription("t1", "canceled", "pro", NOV, DEC, time=NOW + timedelta(hours=1),
                          cancel_at_period_end=False)
    p.process_subscription("tally.subscriptions", 1, b"t1", record(cancel))
    feed(p, 4, "t1", usage("t1", time=NOW), usage("t1", time=NOW + timedelta(hours=2)),
         at=NOW + timedelta(hours=3))
    accepted = accepted_events(p.drain(), "t1")
    assert [(a["plan_id"], a["late"]) for a in accepted] == [
        ("free", False), ("free", False), ("pro", False), ("pro", True),
        ("pro", False), ("free", False)]
    assert total(p, "t1") == Decimal(6)


def test_state_restored_from_the_changelog_continues_exactly() -> None:
    p = processor()
    feed(p, 0, "t1", usage("t1", quantity="3", event_id="a", time=NOW))
    log = p.drain().changelog
    q = processor()
    for key, value in log:
        q.restore(key, value)
    feed(q, 1, "t1", usage("t1", quantity="3", event_id="a", time=NOW),
         usage("t1", quantity="2", event_id="b", time=NOW))
    assert total(q, "t1") == Decimal(5)


# --- crash and replay ------------------------------------------------------------------

events_strategy = st.lists(
    st.tuples(st.sampled_from(["t1", "t2"]), st.integers(0, 30), st.integers(1, 9)),
    min_size=1, max_size=60,
)


@pytest.mark.parametrize("meter", ["api_calls", "active_users"])
@settings(max_examples=150, deadline=None)
@given(events_strategy, st.integers(1, 6), st.data())
def test_crash_at_any_point_then_replay_gives_exact_totals(
    meter: str, raw: list[tuple[str, int, int]], batch_records: int, data: st.DataObject,
) -> None:
    """Records are processed in micro-batches; a crash persists an arbitrary subset of the
    in-flight batch's changelog; the restart restores and replays from the last commit.
    For the sum meter the total is the sum of quantities; for the unique_count meter, the
    number of distinct users (user "u<quantity>")."""
    # Each (tenant, id) has one quantity: a redelivery repeats the event exactly.
    quantities = {(t, i): q for t, i, q in raw}
    log_records = [(t, record(usage(t, meter, quantity=str(quantities[(t, i)]),
                                    event_id=f"e{i}", time=NOW,
                                    dimensions={"user": f"u{quantities[(t, i)]}"})))
                   for t, i, _ in raw]
    expected: dict[str, Decimal] = {}
    users: dict[str, set[int]] = {}
    for (t, _), q in quantities.items():
        expected[t] = expected.get(t, Decimal(0)) + q
        users.setdefault(t, set()).add(q)
    if meter == "active_users":
        expected = {t: Decimal(len(u)) for t, u in users.items()}

    changelog: list[tuple[str, Any]] = []
    committed = 0
    crash_batch = data.draw(st.integers(0, len(log_records) // batch_records + 1))
    p = processor(UNIQUE_CATALOG)
    for n, start in enumerate(range(0, len(log_records), batch_records)):
        batch = log_records[start:start + batch_records]
        for offset, (tenant, value) in enumerate(batch, start):
            p.process_usage(TOPIC, offset, tenant.encode(), value, ms(NOW))
        entries = p.drain().changelog
        if n == crash_batch:
            kept = data.draw(st.lists(st.booleans(), min_size=len(entries),
                                      max_size=len(entries)))
            changelog += [e for e, keep in zip(entries, kept, strict=True) if keep]
            break
        changelog += entries
        committed = start + len(batch)

    restarted = processor(UNIQUE_CATALOG)
    for key, value in changelog:
        restarted.restore(key, value)
    restarted.finish_restore()
    for offset in range(committed, len(log_records)):
        tenant, value = log_records[offset]
        restarted.process_usage(TOPIC, offset, tenant.encode(), value, ms(NOW))
    assert {t: total(restarted, t, meter) for t in expected} == expected

    # The topic compacted (the last value of each key), then a second restart.
    changelog += restarted.drain().changelog
    compacted = {key: value for key, value in changelog}
    again = processor(UNIQUE_CATALOG)
    for key, value in compacted.items():
        again.restore(key, value)
    again.finish_restore()
    assert {t: total(again, t, meter) for t in expected} == expected


def test_a_distinct_values_segment_stored_without_its_counter_state_survives_compaction(
) -> None:
    def feed_user(p: PartitionProcessor, offset: int, user: str) -> None:
        feed(p, offset, "t1", usage("t1", "active_users", event_id=f"e{offset}", time=NOW,
                                    dimensions={"user": user}))

    p = processor(UNIQUE_CATALOG)
    feed_user(p, 0, "a")
    changelog = p.drain().changelog
    feed_user(p, 1, "b")
    # The crash stores only the segment with "b", not the counter state counting it.
    changelog += [(k, v) for k, v in p.drain().changelog if k.startswith("u/")]

    restarted = processor(UNIQUE_CATALOG)
    for key, value in changelog:
        restarted.restore(key, value)
    restarted.finish_restore()
    for offset, user in [(1, "b"), (2, "c")]:  # the replay, then a new user
        feed_user(restarted, offset, user)
    changelog += restarted.drain().changelog

    compacted = processor(UNIQUE_CATALOG)
    for key, value in dict(changelog).items():
        compacted.restore(key, value)
    compacted.finish_restore()
    assert total(compacted, "t1", "active_users") == Decimal(3)


def test_shuffled_order_gives_the_same_totals() -> None:
    events = [usage(f"t{i % 3}", quantity=str(i), event_id=f"e{i}", time=NOW) for i in range(90)]
    totals = []
    for seed in range(3):
        shuffled = events[:]
        random.Random(seed).shuffle(shuffled)
        p = processor()
        for offset, e in enumerate(shuffled + shuffled[:20]):
            feed(p, offset, e["subject"], e)
        totals.append({t: total(p, t) for t in ("t0", "t1", "t2")})
    assert totals[0] == totals[1] == totals[2]


# --- what every stage can store (issue 17, defects 1 and 2) ------------------------------


def dead_reasons(p: PartitionProcessor) -> list[str]:
    return [d.reason for d in p.drain().dead_letters]


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
                                    "1969-12-31T23:59:59Z", "1970-01-01T05:00:00+06:00"])
def test_an_event_time_that_overflows_in_utc_or_precedes_1970_is_dead_lettered(
    moment: str,
) -> None:
    """Defect 1: `0001-01-01T00:00:00+14:00` made the worker raise OverflowError on every
    restart. It is refused, and the good event beside it is counted."""
    p = processor()
    bad = usage("t1", time=NOW)
    bad["time"] = moment
    feed(p, 0, "t1", bad, usage("t1", quantity="2", time=NOW))
    assert total(p, "t1") == Decimal(2)
    assert dead_reasons(p) == ["invalid_event"]


def test_the_same_event_as_checked_rows_is_dead_lettered_too() -> None:
    """Rows that an earlier pre-batching stage checked under looser rules are held to the
    rules again by the worker, so an upgrade cannot let them crash it."""
    p = processor()
    good = usage("t1", event_id="good", quantity="2", time=NOW)
    row = ["bad", "svc/test", "0001-01-01T00:00:00+14:00", "api_calls", "1", None, True]
    good_row = [good["id"], good["source"], good["time"], "api_calls", "2", {}, True]
    p.process_usage(TOPIC, 0, b"t1", orjson.dumps([True, [row, good_row]]), ms(NOW),
                    checked=True)
    assert total(p, "t1") == Decimal(2)
    assert dead_reasons(p) == ["invalid_event"]


@pytest.mark.parametrize("field", ["id", "source", "dimension key", "dimension value"])
def test_a_nul_character_postgres_cannot_store_is_dead_lettered(field: str) -> None:
    """Defect 2: NUL in a dimension or id was counted, then refused by Postgres and found
    only in tally.projection_errors."""
    p = processor()
    bad = usage("t1", time=NOW, dimensions={"region": "eu"})
    if field == "id":
        bad["id"] = "evt\x00"
    elif field == "source":
        bad["source"] = "svc\x00"
    elif field == "dimension key":
        bad["data"]["dimensions"] = {"reg\x00ion": "eu"}
    else:
        bad["data"]["dimensions"] = {"region": "eu\x00"}
    feed(p, 0, "t1", bad, usage("t1", quantity="2", time=NOW))
    assert total(p, "t1") == Decimal(2)
    assert dead_reasons(p) == ["invalid_event"]


REFUSED_QUANTITIES = [
    "1e-20000", "-0", "-0.0", "1_000", " 5 ", "5 ", "+5", "5.", ".5", ".5e1", "05",
    "\u0661\u0662", "\uff15", "1e16", "1000000000000000.1", "0.0000000000001", "0e16",
    "NaN", "Infinity", "", "0x10", -0.0, -1, 1e16, 1e-13, True, None, [], {},
]


@pytest.mark.parametrize("quantity", REFUSED_QUANTITIES, ids=repr)
def test_quantities_outside_json_number_grammar_or_the_limits_are_dead_lettered(
    quantity: Any,
) -> None:
    """Defect 2: Decimal read all of these (or could not store them: 1e-20000); each is
    refused with quantity_out_of_range."""
    p = processor()
    feed(p, 0, "t1", usage("t1", quantity=quantity, time=NOW),
         usage("t1", quantity="2", time=NOW))
    assert total(p, "t1") == Decimal(2)
    assert dead_reasons(p) == ["quantity_out_of_range"]


@pytest.mark.parametrize("quantity, value", [
    ("0", "0"), ("1e3", "1E+3"), ("1E+15", "1E+15"), ("0.000000000001", "1E-12"),
    ("999999999999999.999999999999", "999999999999999.999999999999"), (7, "7"),
    (2.5, "2.5"), (1e15, "1E+15"), ("0e15", "0E+15"),
])
def test_quantities_in_json_number_grammar_within_the_limits_are_counted(
    quantity: Any, value: str,
) -> None:
    p = processor()
    feed(p, 0, "t1", usage("t1", quantity=quantity, time=NOW))
    assert total(p, "t1") == Decimal(value)
    assert dead_reasons(p) == []


def test_a_record_timestamp_no_period_arithmetic_can_use_is_dead_lettered() -> None:
    """A producer sets any record timestamp it likes: the worker neither crashes on one
    past year 9999 nor moves its watermark to one."""
    p = processor()
    for offset, timestamp_ms in enumerate([2**62, -(2**40), 253402300799999]):
        p.process_usage(TOPIC, offset, b"t1", record(usage("t1", time=NOW)), timestamp_ms)
    feed(p, 3, "t1", usage("t1", quantity="2", time=NOW))
    assert p.watermark == NOW
    assert total(p, "t1") == Decimal(2)
    assert dead_reasons(p) == ["invalid_timestamp"] * 3
