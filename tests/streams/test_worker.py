"""The Faust worker against the real broker: exact counters, DLQ, crash recovery."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from runtime.settings import Settings
from schemas.codec import loads
from tests.conftest import WorkerProcess
from tests.helpers import record, subscription, usage
from tests.kafka_helpers import (
    publish,
    publish_seed_catalog,
    publish_stamped,
    read_compacted,
    read_records,
    wait_for,
)

NOW = datetime.now(UTC)


def counters_by_tenant(settings: Settings, meter: str = "api_calls") -> dict[str, Decimal]:
    totals: dict[str, Decimal] = {}
    for value in read_compacted(settings, settings.topics.counters).values():
        if value["meter"] == meter:
            totals[value["tenant_id"]] = totals.get(value["tenant_id"], Decimal(0)) + Decimal(
                value["value"])
    return totals


def test_duplicates_are_counted_once_and_bad_records_go_to_the_dlq(
    catalog_worker: tuple[Settings, WorkerProcess],
) -> None:
    settings, worker = catalog_worker
    expected: dict[str, Decimal] = {}
    records: list[tuple[str | None, bytes]] = []
    for t in range(5):
        tenant = f"tenant-{t}"
        events = [usage(tenant, quantity=str(i % 7 + 1), event_id=f"{tenant}-{i}", time=NOW)
                  for i in range(200)]
        expected[tenant] = sum((Decimal(e["data"]["quantity"]) for e in events), Decimal(0))
        records += [(tenant, record(*events[i:i + 50])) for i in range(0, 200, 50)]
        records += [(tenant, record(*events[:30]))]  # a retried batch: all duplicates
        records += [(tenant, record(events[5]))]  # a single-event duplicate
    bad = usage("tenant-0", quantity="-3", time=NOW)
    records += [("tenant-0", b"not json at all"),
                ("tenant-1", record(usage("tenant-1", quantity="2", event_id="ok-1", time=NOW),
                                    bad))]
    expected["tenant-1"] += 2
    publish(settings, settings.topics.usage, records)

    wait_for(lambda: counters_by_tenant(settings), lambda got: got == expected,
             what="exact counters")
    dlq = wait_for(lambda: read_records(settings, settings.topics.usage_dlq),
                   lambda got: len(got) == 2, what="two dead letters")
    reasons = sorted(dict(r.headers)["tally-dlq-reason"].decode() for r in dlq)
    assert reasons == ["invalid_json", "quantity_out_of_range"]
    body = loads(dlq[0].value)
    assert body["source_topic"] == settings.topics.usage and body["detail"]
    # All but the two records holding bad input reached the agent checked into rows.
    wait_for(lambda: (worker.metric("tally_worker_prebatch_records_total"),
                      worker.metric("tally_worker_prebatch_checked_total")),
             lambda got: got == (len(records), len(records) - 2),
             what="records checked by the pre-batching stage")


def test_worker_killed_mid_stream_restarts_with_exact_counters(
    settings_factory: Callable[..., Settings],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    settings = settings_factory()
    publish_seed_catalog(settings)
    tenants = [f"tenant-{t}" for t in range(8)]
    batches: list[tuple[str | None, bytes]] = []
    expected = dict.fromkeys(tenants, Decimal(0))
    for n in range(600):
        tenant = tenants[n % len(tenants)]
        events = [usage(tenant, quantity="1", event_id=f"{n}-{i}", time=NOW) for i in range(100)]
        expected[tenant] += 100
        batches.append((tenant, record(*events)))
    first = worker_factory(settings)
    wait_for(first.healthy, bool, what="the worker to be ready")

    killed = threading.Event()
    sent = [0]

    def trickle() -> None:  # a service publishing steadily until the worker dies
        while sent[0] < len(batches) and not killed.is_set():
            publish(settings, settings.topics.usage, batches[sent[0]:sent[0] + 5])
            sent[0] += 5
            time.sleep(0.1)

    publisher = threading.Thread(target=trickle)
    publisher.start()

    # Its metrics, not the counters topic: a reader of a topic being written reads on
    # until the writes pause.
    wait_for(first.counted, lambda c: c > 0, what="the worker to start counting")
    first.kill()  # SIGKILL mid-stream: its changelog may be ahead of its committed offsets
    killed.set()
    publisher.join()
    assert sent[0] < len(batches), "the crash should interrupt the stream, not follow it"
    publish(settings, settings.topics.usage, batches[sent[0]:])
    second = worker_factory(settings)
    wait_for(lambda: counters_by_tenant(settings), lambda got: got == expected, timeout=120,
             what="exact counters after the crash")
    assert second.stop() == 0


def test_hard_limit_turns_blocked_in_quota_state(
    catalog_worker: tuple[Settings, WorkerProcess],
) -> None:
    settings, _ = catalog_worker
    publish(settings, settings.topics.usage,
            [("t-free", record(*[usage("t-free", quantity="100", time=NOW) for _ in range(10)]))])

    def state() -> Any:
        return read_compacted(settings, settings.topics.quota_state).get("t-free/api_calls")

    final = wait_for(state, lambda s: s is not None and s["state"] == "blocked",
                     what="blocked quota state")
    assert Decimal(final["used"]) == 1000 and Decimal(final["remaining"]) == 0


def _at(day: str, time: str = "12:00") -> datetime:
    return datetime.fromisoformat(f"2026-{day}T{time}:00+00:00")


def test_periods_plan_changes_and_late_events_on_the_broker(
    settings_factory: Callable[..., Settings],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    """Upgrade and downgrade mid-period, rollover, a late event (counted in its period)
    and a too-late one (an adjustment in the open period), with ingestion times set on
    the records as the broker would stamp them."""
    settings = settings_factory()
    publish_seed_catalog(settings)
    oct1, nov1 = _at("10-01", "00:00"), _at("11-01", "00:00")
    publish(settings, settings.topics.subscriptions, [
        ("t1", record(subscription("t1", "created", "free", oct1, nov1, time=oct1))),
        ("t1", record(subscription("t1", "plan_changed", "starter", oct1, nov1,
                                   time=_at("10-15")))),
    ])
    worker_factory(settings)

    def usage_at(quantity: str, event_day: str, event_time: str, arrives: datetime) -> Any:
        event = usage("t1", quantity=quantity, time=_at(event_day, event_time))
        return ("t1", record(event), int(arrives.timestamp() * 1000))

    publish_stamped(settings, settings.topics.usage, [
        usage_at("900", "10-10", "12:00", _at("10-10")),
        usage_at("300", "10-20", "12:00", _at("10-20")),
        usage_at("5", "10-31", "23:59", _at("11-01", "00:30")),  # late, inside 1 h window
        usage_at("7", "10-31", "23:58", _at("11-01", "02:00")),  # too late: adjustment
        usage_at("10", "11-05", "12:00", _at("11-05")),
    ])
    expected = {"t1/api_calls/2026-10-01T00:00:00+00:00": Decimal(1205),
                "t1/api_calls/2026-11-01T00:00:00+00:00": Decimal(17)}

    def counters() -> dict[str, Decimal]:
        return {k: Decimal(v["value"]) for k, v in
                read_compacted(settings, settings.topics.counters).items()}

    wait_for(counters, lambda got: got == expected, what="counters per period")
    # Downgrade in the new period: limits switch at once, usage is kept.
    publish(settings, settings.topics.subscriptions, [
        ("t1", record(subscription("t1", "plan_changed", "free", nov1, _at("12-01", "00:00"),
                                   time=_at("11-06"))))])
    publish_stamped(settings, settings.topics.usage,
                    [usage_at("990", "11-07", "12:00", _at("11-07"))])

    def state() -> Any:
        return read_compacted(settings, settings.topics.quota_state).get("t1/api_calls")

    # Topics are consumed independently: wait for both the usage and the downgrade.
    final = wait_for(state, lambda s: s is not None and Decimal(s["used"]) == 1007
                     and s["plan_id"] == "free", what="quota state after the downgrade")
    assert (final["plan_id"], final["state"], Decimal(final["limit"])) == (
        "free", "blocked", Decimal(1000))
    accepted = [e for r in read_records(settings, settings.topics.usage_accepted)
                for e in loads(r.value)]
    flags = {e["quantity"]: (e["late"], e["adjustment"], e["period_start"][:10])
             for e in accepted}
    assert flags["5"] == (True, False, "2026-10-01")
    assert flags["7"] == (True, True, "2026-11-01")


def _children(pid: int) -> list[int]:
    """Live child processes of `pid` (from /proc: Linux)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_pre_batching_process_ends_with_the_worker_whether_stopped_or_killed(
    settings_factory: Callable[..., Settings],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    settings = settings_factory()
    publish_seed_catalog(settings)
    for end in ("SIGTERM", "SIGKILL"):
        worker = worker_factory(settings)
        wait_for(worker.healthy, bool, what="the worker to be ready")
        assert worker.proc is not None
        children = wait_for(lambda: _children(worker.proc.pid), bool,  # noqa: B023
                            what="the pre-batching child process")
        if end == "SIGTERM":
            assert worker.stop() == 0
        else:
            worker.kill()  # no chance to stop it: the child notices its closed stdin
        wait_for(lambda: all(_gone(c) for c in children), bool,  # noqa: B023
                 what=f"the pre-batching process to end after {end}")
