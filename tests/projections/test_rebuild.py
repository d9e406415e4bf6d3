"""`tally projections rebuild` and `checksum`: a rebuild from offset 0 reproduces the
digests of the live read models, repairs a tampered one, and the live projector goes on
exactly once after the swap."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from projections.rebuild import checksum, prepare_shadow
from runtime.postgres import connect, migrate
from runtime.settings import Settings
from schemas.codec import dumps
from schemas.records import QuotaState
from tally.cli import main
from tests.helpers import record, subscription
from tests.kafka_helpers import publish, publish_seed_catalog
from tests.projections.support import (
    AGGREGATION_OF,
    PERIOD_END,
    PERIOD_START,
    accepted,
    by_period,
    expected_by_period,
    publish_accepted,
    query,
    wait_for_offsets,
)
from tests.services import ProjectorThread


def _digests(url: str) -> dict[str, tuple[int, str]]:
    with connect(url) as conn:
        return checksum(conn)


def _quota(tenant: str, meter: str, used: str) -> QuotaState:
    return QuotaState(tenant_id=tenant, meter=meter, plan_id="starter",
                      period_start=PERIOD_START, period_end=PERIOD_END, used=Decimal(used),
                      included=Decimal(100), limit=Decimal(200), remaining=None, state="ok")


def test_rebuild_reproduces_the_checksum_repairs_tampering_and_hands_over_to_the_live_projector(
    settings_factory: Callable[..., Settings], database_url: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    settings = settings_factory(database_url=database_url)
    t = settings.topics
    publish_seed_catalog(settings)
    plan_records = 1 + 4  # `_meters` and one record per plan of the seed catalog
    publish(settings, t.subscriptions, [
        ("acme", record(subscription("acme", "created", "starter", PERIOD_START, PERIOD_END,
                                     stripe_customer_id="cus_1"))),
        ("acme", record(subscription("acme", "plan_changed", "pro", PERIOD_START, PERIOD_END,
                                     time=PERIOD_START + timedelta(days=2)))),
    ])
    publish(settings, t.quota_state, [
        ("acme/api_calls", dumps(_quota("acme", "api_calls", "10"))),
        ("acme/api_calls", dumps(_quota("acme", "api_calls", "12"))),
        ("beta/api_calls", dumps(_quota("beta", "api_calls", "3"))),
        ("beta/api_calls", None),  # type: ignore[list-item]  # a tombstone: deletes the row
    ])
    log = [[accepted(tenant, f"{tenant}-{b}-{i}-{meter}", meter, str(i % 9),
                     at=PERIOD_START + timedelta(days=b, minutes=i))
            for i in range(50) for meter in AGGREGATION_OF]
           for tenant in ("acme", "beta") for b in range(3)]
    log.append(log[0])  # redelivered

    with ProjectorThread(settings, max_records=3):
        publish_accepted(settings, log)
        wait_for_offsets(database_url, t.usage_accepted, len(log))
        wait_for_offsets(database_url, t.quota_state, 4)
        wait_for_offsets(database_url, t.subscriptions, 2)
        wait_for_offsets(database_url, t.plans, plan_records)
        before = _digests(database_url)
        assert before["usage_events"][0] == 6 * 50 * 5
        assert query(database_url, "SELECT tenant_id, plan_id, stripe_customer_id"
                     " FROM tally.subscriptions") == [("acme", "pro", "cus_1")]
        assert query(database_url, "SELECT tenant_id, used FROM tally.quota_state") == [
            ("acme", Decimal(12))]

        with psycopg.connect(database_url) as conn:  # a read model goes wrong
            conn.execute("UPDATE tally.usage_by_period SET quantity = 0 WHERE tenant_id = 'acme'")
            conn.execute("DELETE FROM tally.plan_meters WHERE plan_id = 'free'")
            # Equal numbers, other bytes: the digest sees the scale, so must the swap.
            conn.execute("UPDATE tally.usage_by_period SET quantity = quantity + 0.00"
                         " WHERE tenant_id = 'beta'")
            # A ledger row twice (the ledger has no key of its own: the swap must see it).
            conn.execute("INSERT INTO tally.usage_events SELECT * FROM tally.usage_events"
                         " LIMIT 1")
        assert _digests(database_url) != before

        monkeypatch.setenv("TALLY_HOME", str(tmp_path))
        for key, value in settings.to_env().items():
            monkeypatch.setenv(key, value)
        assert main(["projections", "rebuild", "--max-records", "5"]) == 0
        assert _digests(database_url) == before
        printed, progress = capsys.readouterr()
        # Progress on stderr, the last line once the shadow read the whole log.
        assert re.fullmatch(r"rebuild: 100\.0% of the end offsets, 1,750 events \(18 records\)"
                            r" in [0-9.]+s, [0-9,]+ events/s", progress.splitlines()[-1]), progress
        for table, (rows, digest) in before.items():
            assert f"{table:<16} {rows:>12} {digest}" in printed

        # The live projector kept running through the swap and goes on exactly once.
        more = [[accepted("acme", f"after-{i}", "api_calls", "3") for i in range(20)]]
        publish_accepted(settings, [*more, log[1]])
        wait_for_offsets(database_url, t.usage_accepted, len(log) + 2)
    events = [e for batch in (*log, *more) for e in batch]
    assert by_period(database_url) == expected_by_period(events)

    assert main(["projections", "checksum"]) == 0
    assert "usage_by_period" in capsys.readouterr().out


def test_rebuild_refuses_at_once_when_the_live_offsets_lie_outside_the_log(
    settings_factory: Callable[..., Settings], database_url: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    settings = settings_factory(database_url=database_url)
    topic = settings.topics.usage_accepted
    log = [[accepted("acme", f"e-{b}-{i}", "api_calls", "1") for i in range(10)]
           for b in range(6)]
    with ProjectorThread(settings):
        publish_accepted(settings, log)
        wait_for_offsets(database_url, topic, len(log))
    # As after a broker that came back empty: the read models hold more than the log.
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE tally.projection_offsets SET next_offset = next_offset + 1000"
                     " WHERE topic = %s AND partition = 0", (topic,))
    before = _digests(database_url)
    monkeypatch.setenv("TALLY_HOME", str(tmp_path))
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)

    assert main(["projections", "rebuild"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"tally: error: the live offsets lie outside the log: {topic}/0 at")
    assert "would drop the rest, so nothing was changed" in error
    assert len(error.splitlines()) == 1
    assert _digests(database_url) == before


def test_the_shadow_rollups_keep_the_live_ones_room_for_updates_in_place(
    database_url: str,
) -> None:
    """A rebuild's projector upserts the shadow rollups as the live one does: they get the
    live tables' storage parameters (LIKE copies none), the fillfactor of migration 130."""
    migrate(database_url)
    with connect(database_url) as conn:
        prepare_shadow(conn)
        options = dict(conn.execute(
            "SELECT n.nspname || '.' || c.relname, c.reloptions FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relname IN ('usage_daily', 'usage_by_period') AND c.relkind = 'r'"
        ).fetchall())
    assert options == {f"{schema}.{table}": ["fillfactor=50"]
                       for schema in ("tally", "tally_rebuild")
                       for table in ("usage_daily", "usage_by_period")}
