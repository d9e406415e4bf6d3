"""The projector against the real broker and real Postgres: exact read models for every
aggregation under duplicates and redelivery, and bad input reported without blocking."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal

import psycopg
import pytest
from prometheus_client import REGISTRY

from domain.aggregation import Counter
from projections.fast_accepted import from_model
from projections.ledger import ensure_month_partitions, stage_accepted, write_staged
from runtime.postgres import migrate
from runtime.settings import Settings
from schemas.codec import dumps, loads
from schemas.records import AcceptedEvent
from tests.kafka_helpers import publish, read_records, wait_for
from tests.projections.support import (
    AGGREGATION_OF,
    PERIOD_START,
    accepted,
    by_period,
    expected_by_period,
    publish_accepted,
    query,
    wait_for_offsets,
)
from tests.services import ProjectorThread

DAY_1 = PERIOD_START + timedelta(days=3, hours=10)
DAY_2 = PERIOD_START + timedelta(days=4, hours=10)


def _log_with_duplicates() -> list[list[AcceptedEvent]]:
    """Batches as the worker could write them: every meter kind, two days, events repeated
    inside a batch, whole records redelivered, and `latest` values tied on event time."""
    batches = []
    for t in range(3):
        tenant = f"acme-{t}"
        for day_no, day in enumerate((DAY_1, DAY_2)):
            batch = []
            for i in range(40):
                meter = list(AGGREGATION_OF)[i % 5]
                at = day + timedelta(minutes=i % 7)  # repeated times: latest ties
                batch.append(accepted(tenant, f"{tenant}-{day_no}-{i}", meter,
                                      str((i * 7 + t) % 11), at=at))
            batch.append(batch[3])  # the same event twice in one record
            batches.append(batch)
        batches.append(batches[-2])  # a producer retry: the whole first record again
    return batches


def test_every_aggregation_is_exact_under_duplicates_and_redelivery(
    settings_factory: Callable[..., Settings], database_url: str
) -> None:
    settings = settings_factory(database_url=database_url)
    log = _log_with_duplicates()
    topic = settings.topics.usage_accepted
    with ProjectorThread(settings, max_records=2):  # several transactions
        publish_accepted(settings, log[:4])
        wait_for_offsets(database_url, topic, 4)
        publish_accepted(settings, log[4:] + log[:3])  # redelivery after a commit, too
        wait_for_offsets(database_url, topic, len(log) + 3)
        # Caught up: nothing left to read on any partition (measured every 2 s).
        wait_for(lambda: [REGISTRY.get_sample_value("tally_projection_lag_records",
                                                    {"topic": topic, "partition": str(p)})
                          for p in range(settings.partitions)],
                 lambda lags: lags == [0] * settings.partitions, what="lag 0")

    events = [e for batch in log for e in batch]
    assert by_period(database_url) == expected_by_period(events)

    daily: dict[tuple[str, str, object], Counter] = {}
    seen = set()
    for e in events:
        if (e.tenant_id, e.event_id) not in seen:
            seen.add((e.tenant_id, e.event_id))
            c = daily.setdefault((e.tenant_id, e.meter, e.event_time.date()), Counter(
                e.tenant_id, e.meter, e.period_start, e.period_end, e.aggregation))  # type: ignore[arg-type]
            c.fold(e.quantity, e.unique_value, e.event_time)
    assert {(t, m, d): (q, n) for t, m, d, q, n in query(
        database_url, "SELECT tenant_id, meter, day, quantity, event_count FROM tally.usage_daily"
    )} == {k: (c.value, c.event_count) for k, c in daily.items()}
    assert query(database_url, "SELECT count(*) FROM tally.usage_events")[0][0] == len(seen)
    assert query(database_url, "SELECT count(*) FROM tally.projection_errors")[0][0] == 0


def test_bad_input_is_reported_once_and_the_good_rows_of_its_batch_still_land(
    settings_factory: Callable[..., Settings], database_url: str
) -> None:
    settings = settings_factory(database_url=database_url)
    migrate(database_url)
    # A constraint the projector's checks do not know: the database refuses the event
    # and the projector falls back to a savepoint per record, then per event.
    with psycopg.connect(database_url) as conn:
        conn.execute("ALTER TABLE tally.usage_events"
                     " ADD CONSTRAINT below_a_million CHECK (quantity < 1000000)")
    good = [accepted("acme", f"good-{i}", quantity="2") for i in range(5)]
    negative = accepted("acme", "negative", quantity="1").model_dump(mode="json")
    negative["quantity"] = "-3"  # a buggy producer writing straight to the topic
    no_meter = {k: v for k, v in good[0].model_dump(mode="json").items() if k != "meter"}
    huge = accepted("acme", "huge", quantity="5000000")
    topic = settings.topics.usage_accepted
    publish(settings, topic, [
        ("acme", dumps([*good[:2], negative, no_meter, good[2]])),
        ("acme", b"{not json"),
        ("acme", dumps([good[3], huge, good[4]])),
    ])
    with ProjectorThread(settings):
        wait_for_offsets(database_url, topic, 3)
        publish(settings, topic, [("acme", b"{not json")])  # a later, different record
        wait_for_offsets(database_url, topic, 4)

    assert by_period(database_url) == {("acme", "api_calls"): (Decimal(10), 5)}
    errors = query(database_url, "SELECT \"offset\", item, reason FROM tally.projection_errors"
                   " ORDER BY \"offset\", item")
    assert errors == [(0, 2, "constraint_violation"), (0, 3, "invalid_event"),
                      (1, -1, "unreadable_record"), (2, 1, "rejected_by_database"),
                      (3, -1, "unreadable_record")]
    reasons = {}
    for reason in ("constraint_violation", "invalid_event", "unreadable_record",
                   "rejected_by_database"):
        reasons[reason] = REGISTRY.get_sample_value(
            "tally_projection_errors_total", {"topic": topic, "reason": reason})
    assert reasons == {"constraint_violation": 1, "invalid_event": 1, "unreadable_record": 2,
                       "rejected_by_database": 1}


@pytest.mark.parametrize("meter", ["gpu_temp"])
def test_latest_ties_on_event_time_go_to_the_later_event_in_the_log(
    meter: str, settings_factory: Callable[..., Settings], database_url: str
) -> None:
    settings = settings_factory(database_url=database_url)
    at = PERIOD_START + timedelta(days=2)
    first = [accepted("acme", "a", meter, "5", at=at), accepted("acme", "b", meter, "7", at=at)]
    later = [accepted("acme", "c", meter, "9", at=at),
             accepted("acme", "d", meter, "1", at=at - timedelta(hours=1))]
    topic = settings.topics.usage_accepted
    with ProjectorThread(settings, max_records=1):
        publish_accepted(settings, [first, later])
        wait_for_offsets(database_url, topic, 2)
    assert by_period(database_url) == {("acme", meter): (Decimal(9), 4)}


def test_a_projector_whose_offsets_moved_under_it_re_seeks_and_stays_exact(
    settings_factory: Callable[..., Settings], database_url: str
) -> None:
    """What a rebuild swap (or a second projector) looks like to the live projector."""
    settings = settings_factory(database_url=database_url)
    topic = settings.topics.usage_accepted
    log = [[accepted("acme", f"e{b}-{i}", "api_calls", "2") for i in range(10)]
           for b in range(4)]
    fenced = REGISTRY.get_sample_value("tally_projection_fenced_total") or 0
    with ProjectorThread(settings):
        publish_accepted(settings, log[:2])
        wait_for_offsets(database_url, topic, 2)
        with psycopg.connect(database_url) as conn:  # rewind: replay from the start
            conn.execute("UPDATE tally.projection_offsets SET next_offset = 0")
        publish_accepted(settings, log[2:])
        wait_for_offsets(database_url, topic, 4)
    assert (REGISTRY.get_sample_value("tally_projection_fenced_total") or 0) > fenced
    assert by_period(database_url) == {("acme", "api_calls"): (Decimal(80), 40)}


def test_text_with_tabs_newlines_backslashes_and_microseconds_lands_verbatim(
    database_url: str
) -> None:
    migrate(database_url)
    at = PERIOD_START + timedelta(days=1, microseconds=123457)
    odd = accepted("ac\tme", "id\\1", "api_calls", "1.50", at=at, source="svc/\nweird\r",
                   dimensions={"path": "C:\\x\t\"y\""})
    staged = stage_accepted([(0, [(0, from_model(odd)), (1, from_model(odd))])])
    with psycopg.connect(database_url) as conn, conn.transaction():
        ensure_month_partitions(conn, staged, set())
        assert write_staged(conn, staged) == 1
    assert query(database_url, "SELECT tenant_id, event_id, source, dimensions, event_time,"
                 " quantity FROM tally.usage_events") == [
        ("ac\tme", "id\\1", "svc/\nweird\r", {"path": "C:\\x\t\"y\""}, at, Decimal("1.50"))]


def test_an_event_written_by_a_concurrent_transaction_fails_the_batch_not_counted_twice(
    database_url: str
) -> None:
    """The ledger finds new events by an anti-join on its keys. A key that another
    transaction commits after that statement started must make it fail, never let the
    event into the ledger and rollups twice. (The projector's advisory lock keeps its own
    transactions from racing like this.)"""
    migrate(database_url)
    staged = stage_accepted([(0, [(0, from_model(accepted("acme", "e1", "api_calls", "5")))])])
    with psycopg.connect(database_url) as conn, conn.transaction():
        ensure_month_partitions(conn, staged, set())
    errors: list[Exception] = []
    with psycopg.connect(database_url) as first, psycopg.connect(database_url) as late:
        assert write_staged(first, staged) == 1  # not committed yet

        def write_late() -> None:
            try:
                write_staged(late, staged)
            except psycopg.Error as e:
                errors.append(e)
            late.rollback()

        thread = threading.Thread(target=write_late)
        thread.start()
        wait_for(lambda: query(database_url, "SELECT wait_event_type FROM pg_stat_activity"
                               " WHERE pid = %s", (late.info.backend_pid,)),
                 lambda rows: rows == [("Lock",)], what="the late writer to wait for the first")
        first.commit()
        thread.join()
    assert [type(e) for e in errors] == [psycopg.errors.UniqueViolation]
    assert by_period(database_url) == {("acme", "api_calls"): (Decimal(5), 1)}
    assert query(database_url, "SELECT count(*) FROM tally.usage_events") == [(1,)]


def test_rows_postgres_cannot_store_become_dead_letters_and_the_projector_goes_on(
    settings_factory: Callable[..., Settings], database_url: str
) -> None:
    """Issue 17, defect 2: an accepted event with a NUL in a dimension, or a quantity of
    huge scale, was found only in projection_errors; a quota state of huge scale stopped
    the projector (NumericValueOutOfRange). Each is now a dead letter on tally.usage.dlq
    too, and the good rows around it land."""
    settings = settings_factory(database_url=database_url, partitions=1)
    good = [accepted("acme", f"good-{i}", quantity="2") for i in range(3)]
    nul = accepted("acme", "nul", dimensions={"region": "eu\x00west"})
    tiny = accepted("acme", "tiny").model_dump(mode="json")
    tiny["quantity"] = "1E-20000"  # written by a worker that did not hold the rules
    topic = settings.topics.usage_accepted
    publish(settings, topic, [("acme", dumps([good[0], nul, good[1], tiny, good[2]]))])
    state = {"tenant_id": "acme", "meter": "api_calls", "plan_id": "starter",
             "period_start": PERIOD_START.isoformat(),
             "period_end": (PERIOD_START + timedelta(days=30)).isoformat(),
             "used": "1E-20000", "included": None, "limit": None, "remaining": None,
             "state": "ok"}
    fine = {**state, "tenant_id": "globex", "used": "6"}
    publish(settings, settings.topics.quota_state,
            [("acme/api_calls", dumps(state)), ("globex/api_calls", dumps(fine))])

    with ProjectorThread(settings):
        wait_for_offsets(database_url, topic, 1)
        wait_for(lambda: query(database_url, "SELECT tenant_id, used FROM tally.quota_state"),
                 lambda rows: rows == [("globex", Decimal(6))], what="the good quota state")
        letters = wait_for(
            lambda: read_records(settings, settings.topics.usage_dlq),
            lambda got: len(got) >= 3, what="three dead letters")

    assert by_period(database_url) == {("acme", "api_calls"): (Decimal(6), 3)}
    found = sorted((loads(r.value)["source_topic"], loads(r.value)["index"],
                    dict(r.headers)["tally-dlq-reason"].decode()) for r in letters)
    assert found == sorted([(topic, 1, "constraint_violation"),
                            (topic, 3, "constraint_violation"),
                            (settings.topics.quota_state, None, "rejected_by_database")])
    errors = query(database_url, "SELECT topic, item, reason FROM tally.projection_errors")
    assert len(errors) == 3  # finance's view of the same problems
