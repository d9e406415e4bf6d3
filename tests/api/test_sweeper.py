"""The reservation sweeper (api/sweeper.py): a reservation whose event was never published
(the process killed between reserve and publish), or which the worker dead-lettered, stops
holding the limit; one whose event is on the log stays until the ledger counts it, then is
settled; nothing counts twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg

from api.sweeper import OnLog
from domain.periods import calendar_month
from runtime import kafka
from runtime.plans import publish_catalog
from runtime.postgres import migrate
from runtime.settings import Settings
from schemas.codec import decode_record, loads
from schemas.plans import Catalog, default_catalog_path, load_catalog, parse_catalog
from tests.api.conftest import TOKENS, ApiServer
from tests.conftest import WorkerProcess
from tests.kafka_helpers import publish_seed_catalog, read_records, wait_for


def reservations(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute(
            "SELECT event_id FROM tally.entitlement_reservations").fetchall()}


def published_ids(settings: Settings) -> list[str]:
    records = asyncio.run(kafka.read_topic(settings, settings.topics.usage))
    return [event["id"] for r in records for event in decode_record(r.value)]


def test_the_sweeper_releases_unpublished_uses_and_keeps_published_ones(
        settings_factory: Callable[..., Settings], database_url: str, tmp_path: Path,
        api_factory: Callable[[Settings], ApiServer]) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    settings = settings_factory(database_url=database_url, tokens_file=tokens,
                                api_sweep_interval_seconds=0.3,
                                api_reservation_grace_seconds=5)
    migrate(database_url)
    publish_seed_catalog(settings)
    api = api_factory(settings)
    client = httpx.Client(base_url=api.url, timeout=10, headers=api.headers())
    # What a process killed between reserve and publish leaves: a committed reservation of
    # the whole limit (1,000 api_calls on the default plan), its event never published.
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO tally.entitlement_reservations (tenant_id, event_id, meter,"
                     " event_time, quantity) VALUES ('acme', 'killed-1', 'api_calls', now(),"
                     " 1000)")
    check = {"tenant": "acme", "meter": "api_calls", "quantity": "1"}
    assert client.post("/v1/entitlements/check", json=check).json()["allowed"] is False
    # A use published but not counted yet (no worker, no projector here): on the log.
    use = {"tenant": "beta", "meter": "api_calls", "quantity": "700", "id": "pub-1"}
    assert client.post("/v1/entitlements/consume", json=use).status_code == 200

    wait_for(lambda: reservations(database_url), lambda ids: "killed-1" not in ids,
             what="the unpublished reservation released")
    assert reservations(database_url) == {"pub-1"}  # on the log: kept until counted
    assert client.post("/v1/entitlements/check", json={**check, "quantity": "1000"}
                       ).json()["allowed"] is True  # the limit is released
    metrics = httpx.get(f"{api.url}/metrics", timeout=10).text
    assert 'tally_api_reservations_swept_total{outcome="released"} 1.0' in metrics

    # The projector counts pub-1: the ledger has it, the sweeper settles its reservation,
    # and its 700 count once (ledger), not twice (ledger and reservation).
    period = calendar_month(datetime.now(UTC))
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO tally.usage_event_keys VALUES ('beta', 'pub-1')")
        conn.execute(
            "INSERT INTO tally.usage_by_period (tenant_id, meter, period_start, period_end,"
            " plan_id, quantity, event_count) VALUES ('beta', 'api_calls', %s, %s, 'free',"
            " 700, 1)", (period.start, period.end))
    wait_for(lambda: reservations(database_url), lambda ids: not ids,
             what="the counted reservation settled")
    beta = {"tenant": "beta", "meter": "api_calls"}
    assert client.post("/v1/entitlements/check", json={**beta, "quantity": "300"}).json()[
        "used"] == "700"
    assert client.post("/v1/entitlements/check", json={**beta, "quantity": "301"}).json()[
        "allowed"] is False

    # The killed use, consumed again with its id: a new decision, published once.
    again = client.post("/v1/entitlements/consume",
                        json={**check, "quantity": "1000", "id": "killed-1"})
    assert again.status_code == 200 and again.json()["duplicate"] is False
    assert sorted(published_ids(settings)) == ["killed-1", "pub-1"]


def test_a_key_is_dead_lettered_only_when_every_record_of_it_was() -> None:
    on_log = OnLog(
        positions={("a", "whole"): {(0, 5, None)},  # a one-event record, dead-lettered
                   ("a", "in-batch"): {(1, 7, 2)},  # event 2 of a batch record
                   ("a", "batch-dead"): {(1, 8, 0)},  # a batch record dead as a whole
                   ("a", "retried"): {(0, 9, None), (1, 10, 0)},  # one copy dead only
                   ("a", "neighbour"): {(1, 7, 1)}},  # beside a dead event of its batch
        dead={(0, 5, None), (1, 7, 2), (1, 8, None), (0, 9, None)})
    assert on_log.dead_lettered() == {("a", "whole"), ("a", "in-batch"), ("a", "batch-dead")}
    assert OnLog({("a", "x"): set()}, set()).dead_lettered() == set()


def with_gpu_meter(seed: Catalog) -> Catalog:
    """The seed catalog and one more meter, gpu_seconds, limited to 10 on the free plan."""
    doc = seed.model_dump(mode="json")
    doc["meters"]["gpu_seconds"] = {"aggregation": "sum", "unit": "second"}
    doc["plans"]["free"]["meters"]["gpu_seconds"] = {"included": 10, "hard_limit": 10}
    return parse_catalog(doc)


def test_the_sweeper_releases_a_use_the_worker_dead_lettered(
        settings_factory: Callable[..., Settings], database_url: str, tmp_path: Path,
        api_factory: Callable[[Settings], ApiServer],
        worker_factory: Callable[[Settings], WorkerProcess]) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    settings = settings_factory(database_url=database_url, tokens_file=tokens,
                                api_sweep_interval_seconds=0.3,
                                api_reservation_grace_seconds=3)
    migrate(database_url)
    seed = load_catalog(default_catalog_path())
    asyncio.run(publish_catalog(settings, with_gpu_meter(seed)))
    api = api_factory(settings)
    client = httpx.Client(base_url=api.url, timeout=10, headers=api.headers())
    gpu = {"tenant": "acme", "meter": "gpu_seconds"}
    wait_for(lambda: client.post("/v1/entitlements/check", json={**gpu, "quantity": "1"}
                                 ).status_code, lambda code: code == 200,
             what="the API following the catalog with gpu_seconds")
    # The whole limit consumed, and a use of a meter that stays in the catalog.
    assert client.post("/v1/entitlements/consume", json={**gpu, "quantity": "10", "id": "gpu-1"}
                       ).json()["allowed"] is True
    assert client.post("/v1/entitlements/consume", json={
        "tenant": "acme", "meter": "api_calls", "quantity": "5", "id": "calls-1"}
    ).json()["allowed"] is True
    assert client.post("/v1/entitlements/check", json={**gpu, "quantity": "1"}
                       ).json()["allowed"] is False

    # The catalog loses the meter before the worker reads gpu-1: the worker, starting now,
    # reads the whole plans topic (milliseconds) long before its group join (seconds) gives
    # it a usage partition, so it counts with the seed catalog and dead-letters gpu-1.
    publish_seed_catalog(settings)
    worker = worker_factory(settings)
    letters = wait_for(lambda: [loads(r.value) for r in read_records(
        settings, settings.topics.usage_dlq)], lambda found: bool(found),
        what="gpu-1 dead-lettered")
    assert [(d["reason"], loads(d["value"])["id"]) for d in letters] == [
        ("unknown_meter", "gpu-1")]
    wait_for(lambda: worker.counted(), lambda n: n == 1, what="calls-1 counted")

    wait_for(lambda: reservations(database_url), lambda ids: "gpu-1" not in ids,
             what="the dead-lettered reservation released")
    # calls-1 was counted by the worker (no projector here: not in the ledger): kept.
    assert reservations(database_url) == {"calls-1"}
    metrics = httpx.get(f"{api.url}/metrics", timeout=10).text
    assert 'tally_api_reservations_swept_total{outcome="dead_lettered"} 1.0' in metrics
    assert 'tally_api_reservations_swept_total{outcome="released"} 0.0' in metrics

    # The meter back in the catalog: its 10 units are available again.
    asyncio.run(publish_catalog(settings, with_gpu_meter(seed)))
    wait_for(lambda: client.post("/v1/entitlements/check", json={**gpu, "quantity": "10"}
                                 ).json(), lambda answer: answer.get("allowed") is True,
             what="the released units available again")
